"""The teacher of a conversion study: trained once (or once a seed) and kept, or read from a file.

A trained teacher is kept under the study's results folder as
``teacher/teacher-seed-S-HASH.safetensors`` with its figures beside it (``.json``); HASH covers
everything that decides its weights (architecture, model keywords, data, variant, recipe, seed),
so a changed recipe trains a new one and a resumed study reuses the old. Workers sharing the
folder take a file lock around training, so a teacher is trained once however many start together.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Optional

from torch import nn

from attnbench import checkpoints, models
from attnbench.train import TrainingDiverged, evaluate, fit, resolve_device, to_device

__all__ = ["Teacher", "TEACHER_DIR", "teacher_seed", "get_teacher"]

TEACHER_DIR = "teacher"   # under results/<study>/


@dataclasses.dataclass
class Teacher:
    """A trained teacher on the run's device, castled, in eval mode, and its figures (top-1, %).

    ``path``: its file, relative to the study's results folder when attnbench trained it there,
    else as the experiment gives it.
    """

    model: nn.Module
    test_top1: float
    val_top1: float
    path: str
    seed: Optional[int]
    train_time_s: float = math.nan


_LOADED: dict[tuple, Teacher] = {}   # this process's teachers: one study's trials reuse them


def teacher_seed(experiment, seed: int) -> int:
    """The seed of the teacher a conversion of ``seed`` starts from."""
    return seed if experiment.convert.teacher_per_seed else experiment.seeds[0]


def _fingerprint(experiment, arch: str, model_kwargs: dict, seed: int) -> str:
    spec = experiment.convert
    decisive = {"arch": arch, "model_kwargs": model_kwargs, "dataset": experiment.dataset,
                "data_root": experiment.data_root, "data_options": experiment.data_options,
                "variant": spec.teacher_variant, "options": spec.teacher_options, "train": dataclasses.asdict(spec.teacher_train),
                "seed": seed}
    return hashlib.sha256(json.dumps(decisive, sort_keys=True, default=str).encode()).hexdigest()[:12]


@contextlib.contextmanager
def _locked(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(experiment, arch: str, model_kwargs: dict, seed: int) -> nn.Module:
    spec = experiment.convert
    return models.create_model(arch, spec.teacher_variant, spec.teacher_options, seed=seed, **model_kwargs)


def get_teacher(experiment, results: Path, splits, arch: str, model_kwargs: dict, device: str, seed: int) -> Teacher:
    """The teacher for conversions of ``seed``: from this process, the study's folder, the
    experiment's checkpoint, or trained now (and kept).

    Raises:
        TrainingDiverged: training the teacher failed.
    """
    spec = experiment.convert
    tseed = teacher_seed(experiment, seed)
    key = (str(results), spec.teacher_checkpoint, _fingerprint(experiment, arch, model_kwargs, tseed), device)
    if key not in _LOADED:
        if spec.teacher_checkpoint is not None:
            _LOADED[key] = _from_checkpoint(experiment, splits, arch, model_kwargs, device)
        else:
            _LOADED[key] = _trained(experiment, results, splits, arch, model_kwargs, device, tseed)
    return _LOADED[key]


def _from_checkpoint(experiment, splits, arch: str, model_kwargs: dict, device: str) -> Teacher:
    path = experiment.convert.teacher_checkpoint
    model = _build(experiment, arch, model_kwargs, seed=0)
    models.load_state(model, checkpoints.read_state_dict(path), path)   # checked to fit before the sweep
    return _ready(model, splits, device, path, None, math.nan)


def _ready(model: nn.Module, splits, device: str, path: str, seed: Optional[int], train_time_s: float,
           figures: Optional[dict] = None) -> Teacher:
    run_device = resolve_device(device)
    model = models.castle(model.to(run_device)).eval()
    if figures is None:
        kw = dict(device=run_device)
        figures = {"test_top1": evaluate(model, to_device(splits.test, run_device), **kw)["top1"],
                   "val_top1": evaluate(model, to_device(splits.val, run_device), **kw)["top1"]}
    for p in model.parameters():
        p.requires_grad_(False)
    return Teacher(model, figures["test_top1"], figures["val_top1"], path, seed, train_time_s)


def _trained(experiment, results: Path, splits, arch: str, model_kwargs: dict, device: str, seed: int) -> Teacher:
    folder = Path(results) / TEACHER_DIR
    name = f"teacher-seed-{seed}-{_fingerprint(experiment, arch, model_kwargs, seed)}"
    weights = folder / f"{name}{checkpoints.default_suffix()}"
    figures_file = folder / f"{name}.json"
    relative = f"{TEACHER_DIR}/{weights.name}"
    with _locked(folder):
        if weights.is_file() and figures_file.is_file():
            figures = json.loads(figures_file.read_text())
            model = _build(experiment, arch, model_kwargs, seed)
            models.load_state(model, checkpoints.read_state_dict(weights), str(weights))
            return _ready(model, splits, device, relative, seed, figures["train_time_s"], figures)
        model = _build(experiment, arch, model_kwargs, seed)
        config = dataclasses.replace(experiment.convert.teacher_train, seed=seed, device=device)
        result = fit(model, splits, config, progress=False)
        if not result.ok:
            raise TrainingDiverged(f"the teacher (seed {seed}): {result.error}")
        checkpoints.save_state_dict(model.state_dict(), weights)
        figures = {"test_top1": result.test_top1_castled, "val_top1": result.val_top1_castled,
                   "train_time_s": result.train_time_s, "steps": result.steps, "best_epoch": result.best_epoch,
                   "config": result.config}
        _write_json(figures_file, figures)
        return _ready(model, splits, device, relative, seed, result.train_time_s, figures)


def _write_json(path: Path, value: Any) -> None:
    scratch = path.with_name(f".{path.name}.tmp")
    scratch.write_text(json.dumps(value, indent=1, sort_keys=True, default=str))
    os.replace(scratch, path)
