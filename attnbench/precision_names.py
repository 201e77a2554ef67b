"""The precision names, torch-free: the command line offers them before it imports torch, and
``TrainConfig.precision`` is typed by them. :mod:`attnbench.precision` maps each to its dtype."""
from __future__ import annotations

import typing
from typing import Literal

__all__ = ["Precision", "PRECISION_NAMES", "DEFAULT_PRECISION"]

#: Every allowed precision, in the order they are documented.
Precision = Literal["float32", "bfloat16", "float16"]
PRECISION_NAMES: tuple[str, ...] = typing.get_args(Precision)
DEFAULT_PRECISION: Precision = "float32"
