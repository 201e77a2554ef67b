"""Schedules for Castling's auxiliary masked-softmax branch over training progress p in [0, 1].

The paper says only that the masks "are regularized to gradually become zeros"; these are the
choices attnbench sweeps. Every schedule except ``fixed`` ends with the branch exactly empty
(:func:`branch_state` returns None) from ``schedule_end`` on, so castling then costs nothing.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Literal, Optional

#: The schedules, once: Castling's ``mask_schedule`` option is typed by it.
MaskSchedule = Literal["none", "fixed", "threshold_ramp", "gate_linear", "gate_cosine", "gate_step", "l1_ramp"]
MASK_SCHEDULES: tuple[str, ...] = typing.get_args(MaskSchedule)


@dataclasses.dataclass(frozen=True)
class BranchState:
    """How the branch runs at one point of training.

    Attributes:
        threshold: keep softmax probabilities strictly above this.
        gate: factor on the kept probabilities, in (0, 1].
        l1_weight: weight of the L1 penalty on S added to the loss.
    """

    threshold: float
    gate: float = 1.0
    l1_weight: float = 0.0


def ramp(progress: float, start: float, end: float) -> float:
    """0 before ``start``, 1 from ``end`` on, linear in between."""
    if progress >= end:
        return 1.0
    if progress <= start:
        return 0.0
    return (progress - start) / (end - start)


def branch_state(kind: str, progress: float, *, threshold: float, start: float, end: float,
                 gate_steps: int, l1_weight: float) -> Optional[BranchState]:
    """The branch at ``progress`` under schedule ``kind``; None when it is exactly empty."""
    if kind == "none":
        return None
    if kind == "fixed":
        return BranchState(threshold)
    r = ramp(progress, start, end)
    if r >= 1.0:
        return None
    if kind == "threshold_ramp":
        return BranchState(threshold + (1.0 - threshold) * r)
    if kind == "gate_linear":
        return BranchState(threshold, gate=1.0 - r)
    if kind == "gate_cosine":
        return BranchState(threshold, gate=0.5 * (1.0 + math.cos(math.pi * r)))
    if kind == "gate_step":
        return BranchState(threshold, gate=1.0 - math.floor(r * gate_steps) / gate_steps)
    if kind == "l1_ramp":
        return BranchState(threshold, l1_weight=l1_weight * r)
    raise ValueError(f"unknown mask schedule {kind!r} (known: {', '.join(MASK_SCHEDULES)})")
