"""The ``tune:`` block of an experiment file, validated.

::

    tune:
      trials: 8                                  # tuning trainings per configuration (each the same)
      lr: {low: 0.001, high: 0.01}               # default: train.lr / 5 .. train.lr x 5, log scale
      weight_decay: {low: 0.01, high: 0.2}       # optional: tuned too when given
      seed: 5                                    # the tuning trainings' seed (default: max(seeds) + 1)
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from attnbench.train import TrainConfig

__all__ = ["FIELDS", "RANGE_FIELDS", "Range", "TuneSpec", "parse_tune", "TUNED"]

FIELDS = ("trials", "lr", "weight_decay", "seed")
RANGE_FIELDS = ("low", "high", "log")
TUNED = ("lr", "weight_decay")   # the TrainConfig fields a tune block may search
_LR_SPAN = 5.0                   # the default lr range: train.lr / 5 .. x 5
_MAX_TRIALS = 1000


@dataclasses.dataclass(frozen=True)
class Range:
    low: float
    high: float
    log: bool = True


@dataclasses.dataclass(frozen=True)
class TuneSpec:
    """A validated ``tune:`` block.

    Attributes:
        trials: tuning trainings per configuration (and per point of ``across``), the same for all.
        ranges: TrainConfig field -> the range searched (``lr``, and ``weight_decay`` when asked).
        seed: the seed of every tuning training (model initialisation, batch order); by default
            one no evaluated seed uses, so no reported run is the one the value was chosen on.
    """

    trials: int
    ranges: dict[str, Range]
    seed: int


def parse_tune(r, raw: Any, train: TrainConfig, seeds: tuple[int, ...]) -> Optional[TuneSpec]:
    """The ``tune`` block (None when absent); ``r`` is the experiment's reader, ``train`` the
    experiment's parsed ``train``."""
    from attnbench.experiment import MAX_SEED

    if raw is None:
        return None
    spec = r.mapping(raw, "tune", FIELDS)
    if "trials" not in spec:
        r.fail("tune.trials", "missing; expected the number of tuning trainings per configuration (e.g. 8)")
    trials = r.integer(spec["trials"], "tune.trials", minimum=2, maximum=_MAX_TRIALS)
    lr = train.lr
    ranges = {"lr": _range(r, spec.get("lr"), "tune.lr", Range(lr / _LR_SPAN, lr * _LR_SPAN))}
    if "weight_decay" in spec:
        ranges["weight_decay"] = _range(r, spec["weight_decay"], "tune.weight_decay", None)
    seed = r.integer(spec.get("seed", max(seeds) + 1), "tune.seed", minimum=0, maximum=MAX_SEED)
    return TuneSpec(trials=trials, ranges=ranges, seed=seed)


def _range(r, raw: Any, field: str, default: Optional[Range]) -> Range:
    if raw is None and default is not None:
        return default
    if raw is None:
        r.fail(field, "expected {low: ..., high: ...} (log scale unless log: false)")
    spec = r.mapping(raw, field, RANGE_FIELDS)
    for key in ("low", "high"):
        if key not in spec:
            r.fail(f"{field}.{key}", "missing; expected {low: ..., high: ...}")
    low, high = r.number(spec["low"], f"{field}.low"), r.number(spec["high"], f"{field}.high")
    log = r.boolean(spec.get("log", True), f"{field}.log")
    if not low < high:
        r.fail(field, f"expected low < high, got low {low:g}, high {high:g}")
    if low < 0 or (log and low <= 0):
        r.fail(f"{field}.low", f"expected a number {'> 0 (log scale)' if log else '>= 0'}, got {low:g}")
    return Range(low, high, log)
