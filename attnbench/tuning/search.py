"""The tuning of one configuration: ``trials`` trainings on the validation split, one value chosen.

Each configuration (at each point of ``across``) gets its own small Optuna study of exactly
``tune.trials`` trainings, seeded from the tuning seed and the configuration's name, so that a
rerun chooses the same value. The test split is never evaluated while tuning
(:func:`attnbench.train.fit` with ``test=False``); the objective is the inference form's
validation top-1 of the checkpoint the training keeps.
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from attnbench.train import TrainConfig

__all__ = ["Tuned", "tune_recipe"]


@dataclasses.dataclass(frozen=True)
class Tuned:
    """What tuning chose, and every tuning training: ``[{lr, weight_decay?, val_top1, status}]``."""

    values: dict[str, float]
    trials: list[dict[str, Any]]


def tune_recipe(spec, train: TrainConfig, build: Callable[[int], Any], splits, device: str, name: str) -> Tuned:
    """Search ``spec.ranges`` for the configuration ``build`` makes (called with the seed).

    Args:
        spec: the experiment's :class:`attnbench.tuning.TuneSpec`.
        train: the TrainConfig fields of the configuration's recipe (the study's, at its point).
        build: seed -> a fresh model of the configuration.
        name: names the configuration (and point): seeds its sampler, so each is tuned alike.

    Raises:
        RuntimeError: every tuning training failed (diverged).
    """
    import optuna

    from attnbench.train import fit

    sampler_seed = (zlib.crc32(name.encode()) ^ spec.seed) % 2**32
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(
        seed=sampler_seed, n_startup_trials=min(10, max(2, spec.trials // 2))))
    trials = []
    for _ in range(spec.trials):
        trial = study.ask()
        values = {field: trial.suggest_float(field, r.low, r.high, log=r.log) for field, r in spec.ranges.items()}
        config = dataclasses.replace(train, **values, seed=spec.seed, device=device)
        result = fit(build(spec.seed).to(device), splits, config, progress=False, test=False)
        score = result.val_top1_castled if result.ok else math.nan
        trials.append({**values, "val_top1": score, "status": result.status})
        if result.ok and math.isfinite(score):
            study.tell(trial, score)
        else:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
    done = [t for t in trials if t["status"] == "ok" and math.isfinite(t["val_top1"])]
    if not done:
        raise RuntimeError(f"tuning: all {spec.trials} tuning trainings failed ({trials[-1]['status']})")
    best = max(done, key=lambda t: t["val_top1"])   # ties: the first sampled
    return Tuned({field: best[field] for field in spec.ranges}, trials)
