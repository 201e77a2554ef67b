"""Fit and evaluate one model: the Castling training loop and the switch.

:func:`fit` trains with AdamW (timm's ``create_optimizer_v2``), a per-update warm-up + cosine
schedule (timm's ``CosineLRScheduler``) and label smoothing, seeded and deterministic. Every
step it tells each attention layer the training progress (``set_progress(step / total)``) and
adds every layer's ``regularization()`` to the loss; per layer it logs ``diagnostics()``
(Castling: mask density and |S v| / |y before normalisation|). It validates after every
epoch, keeps the best-validation weights in memory, and evaluates that checkpoint on the test
split twice: in the training form and after ``castle()``. The difference is the switch cost.
Where ``castle()`` changes nothing (:func:`attnbench.models.castle_changes`), the second pass
is skipped and the castled figures are the training form's.

A non-finite loss ends the run with ``status="failed"`` and the reason in ``error``; it is
never silent (:meth:`TrainResult.raise_for_status` turns it into :class:`TrainingDiverged`).

``attnbench train --help`` runs one or several variants from the command line.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from typing import Any, Callable, Literal, Optional, Union

import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.utils.data import DataLoader, Dataset

from attnbench import models, precision as precisions
from attnbench.data import DataSplits
from attnbench.data.augment import Augmentation, BatchAugmenter
from attnbench.fields import field_kinds
from attnbench.precision_names import Precision

__all__ = ["CURVES", "TrainConfig", "TrainResult", "TrainingDiverged", "fit", "evaluate", "resolve_device",
           "default_arch", "make_optimizer", "optimizer_step", "shuffled_batches", "run_settings", "to_device"]

#: The per-epoch history values kept as learning curves (result columns ``curve_<name>``).
CURVES = ("train_loss", "train_top1", "val_top1", "val_loss", "lr")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message says where."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run (stored with every result); frozen: a changed
    recipe is a new one (``dataclasses.replace``).

    Attributes:
        epochs: passes over the training split (the schedule spans them, or ``max_steps``).
        batch_size: training batch size (the last batch of an epoch may be smaller).
        lr: peak learning rate, reached after the warm-up.
        weight_decay: AdamW weight decay (timm leaves biases, norms and position/class
            embeddings undecayed).
        warmup_fraction: fraction of all updates spent warming up linearly from ``warmup_lr``.
        warmup_lr: learning rate at the first update.
        min_lr: learning rate at the end of the cosine decay.
        label_smoothing: of the training cross-entropy (validation/test losses use none).
        augment: batch augmentation (:class:`attnbench.data.augment.Augmentation`, all off by
            default; a mapping of its fields is accepted).
        clip_grad: gradient-norm clipping; None for none.
        opt: timm optimiser name (``adamw``).
        seed: seeds dropout, drop-path and batch order (seed the model with
            ``create_model(seed=...)``).
        device: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda``, ``cuda:1``, ...
        max_steps: cap on the number of updates; the schedule then spans exactly these.
        time_budget_s: stop training after this much time (the run is marked ``stopped``;
            schedules that end at progress 1 have then not ended).
        log_every: log per-layer diagnostics every this many updates (0: at each epoch's end).
        checkpoint: which weights are evaluated: ``best_val`` (highest validation top-1,
            ties to the lower validation loss) or ``last``.
        eval_batch_size: batch size for validation and test.
        deterministic: ``torch.use_deterministic_algorithms(True, warn_only=True)`` during
            the run (restored after).
        num_threads: torch CPU threads during the run (restored after); None keeps the current.
        num_workers: DataLoader workers for data sets read from disk on demand.
        precision: ``float32``, or ``bfloat16`` / ``float16``: forward and loss under
            ``torch.autocast`` to that dtype (CPU or CUDA), validation and test too; weights
            and optimiser stay float32; ``float16`` scales the loss (``torch.amp.GradScaler``).
    """

    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1
    warmup_lr: float = 1e-5
    min_lr: float = 1e-5
    label_smoothing: float = 0.1
    augment: Augmentation = dataclasses.field(default_factory=Augmentation)
    clip_grad: Optional[float] = 1.0
    opt: str = "adamw"
    seed: int = 0
    device: str = "auto"
    max_steps: Optional[int] = None
    time_budget_s: Optional[float] = None
    log_every: int = 0
    checkpoint: Literal["best_val", "last"] = "best_val"
    eval_batch_size: int = 512
    deterministic: bool = True
    num_threads: Optional[int] = None
    num_workers: int = 0
    precision: Precision = precisions.DEFAULT_PRECISION

    def __post_init__(self):
        if isinstance(self.augment, dict):
            object.__setattr__(self, "augment", Augmentation(**self.augment))
        _check_types(self)
        finite = lambda value: value is None or math.isfinite(value)  # noqa: E731
        checks = [(self.epochs >= 1, "epochs must be >= 1"), (self.batch_size >= 1, "batch_size must be >= 1"),
                  (self.lr > 0 and finite(self.lr), "lr must be a finite number > 0"),
                  (self.weight_decay >= 0 and finite(self.weight_decay), "weight_decay must be a finite number >= 0"),
                  (0 <= self.warmup_fraction < 1, "warmup_fraction must be in [0, 1)"),
                  (self.warmup_lr >= 0 and finite(self.warmup_lr), "warmup_lr must be a finite number >= 0"),
                  (self.min_lr >= 0 and finite(self.min_lr), "min_lr must be a finite number >= 0"),
                  (self.min_lr <= self.lr, "min_lr must not exceed lr"),
                  (0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
                  (self.clip_grad is None or (self.clip_grad > 0 and finite(self.clip_grad)),
                   "clip_grad must be a finite number > 0, or none"),
                  (0 <= self.seed < 2**32, "seed must be an integer in [0, 2**32)"),
                  (self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1"),
                  (self.time_budget_s is None or (self.time_budget_s >= 0 and finite(self.time_budget_s)),
                   "time_budget_s must be a finite number of seconds >= 0, or none"),
                  (self.checkpoint in ("best_val", "last"), "checkpoint must be 'best_val' or 'last'"),
                  (self.log_every >= 0, "log_every must be >= 0"),
                  (self.eval_batch_size >= 1, "eval_batch_size must be >= 1"),
                  (self.num_threads is None or self.num_threads >= 1, "num_threads must be >= 1, or none"),
                  (self.num_workers >= 0, "num_workers must be >= 0")]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"TrainConfig: {message}")
        from timm.optim import list_optimizers

        known = list_optimizers()
        if self.opt.lower() not in known:
            from attnbench.suggest import did_you_mean

            raise ValueError(f"TrainConfig: opt '{self.opt}' is not a timm optimiser{did_you_mean(self.opt, known)}")
        precisions.check_precision(self.precision, "TrainConfig: precision")


def _check_types(config: "TrainConfig") -> None:
    """Each number field holds a number of its type (an int field a whole number: ``epochs: 1.5``
    would run one epoch and store 1.5), each text field text; ``None`` only where it may. Choices
    and the augmentation have their own checks."""
    for name, kind in field_kinds(TrainConfig).items():
        value = getattr(config, name)
        if kind.kind in ("int", "float", "str") and not kind.accepts(value):
            raise ValueError(f"TrainConfig: {name} must be {kind.expected()}, got {value!r}"[:200])


@dataclasses.dataclass
class TrainResult:
    """The outcome of :func:`fit`. Accuracies are top-1 in percent, on the test split unless named.

    Attributes:
        status: ``ok`` or ``failed`` (then ``error`` says why and the metrics are NaN).
        checkpoint: which weights were evaluated (``best_val`` or ``last``).
        test_top1: the checkpoint in the training form (schedules at the checkpoint's progress).
        test_top1_castled: the same weights after ``castle()``.
        switch_cost: ``test_top1 - test_top1_castled`` in points (positive: castling loses).
        switch_flips: fraction of test images whose prediction changes across the switch.
        val_top1, val_top1_castled: the same on the validation split.
        best_epoch, best_step, best_progress: where the checkpoint was taken.
        history: one record per epoch (loss, top-1, lr, validation, time).
        diagnostics: per-layer records over training (step, epoch, progress, layer, and the
            layer's ``diagnostics()``, e.g. ``mask_density``, ``branch_ratio``).
        layer_diagnostics: per layer, the diagnostics averaged over the test split for the
            checkpoint in the training form.
        mask_density, branch_ratio: their means over layers in ``layer_diagnostics`` (NaN when
            the variant reports none).
    """

    status: str
    error: Optional[str] = None
    checkpoint: str = "best_val"
    test_top1: float = math.nan
    test_top1_castled: float = math.nan
    switch_cost: float = math.nan
    switch_flips: float = math.nan
    test_loss: float = math.nan
    val_top1: float = math.nan
    val_top1_castled: float = math.nan
    best_epoch: int = -1
    best_step: int = -1
    best_progress: float = math.nan
    epochs_run: int = 0
    steps: int = 0
    total_steps: int = 0
    stopped: Optional[str] = None
    train_time_s: float = 0.0
    train_cpu_s: float = 0.0
    wall_time_s: float = 0.0
    device: str = "cpu"
    num_threads: int = 0
    mask_density: float = math.nan
    branch_ratio: float = math.nan
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    diagnostics: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    layer_diagnostics: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    config: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def raise_for_status(self) -> "TrainResult":
        """Raise :class:`TrainingDiverged` if the run failed; return self otherwise."""
        if not self.ok:
            raise TrainingDiverged(self.error or "training failed")
        return self

    def curves(self) -> dict[str, list[float]]:
        """The learning curves: for each of :data:`CURVES`, one value per epoch trained, epoch 0 first."""
        return {name: [float(record[name]) for record in self.history] for name in CURVES}

    @property
    def still_improving(self) -> Optional[bool]:
        """Whether the highest validation top-1 (ties: the lower validation loss, then the later
        epoch, as the ``best_val`` checkpoint) came at the last epoch trained; None before any epoch."""
        if not self.history:
            return None
        peak = max(range(len(self.history)),
                   key=lambda i: (self.history[i]["val_top1"], -self.history[i]["val_loss"], i))
        return peak == len(self.history) - 1

    def summary(self) -> dict[str, Any]:
        """The scalar fields (no history or logs), for a result row or a table."""
        skip = {"history", "diagnostics", "layer_diagnostics", "config"}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else as torch reads it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# --- batches ------------------------------------------------------------------------------------

def to_device(ds: Dataset, device: torch.device) -> Dataset:
    return ds.to(device) if hasattr(ds, "batch") and hasattr(ds, "to") else ds


def _batches(ds: Dataset, batch_size: int, order: Optional[torch.Tensor], device: torch.device,
             num_workers: int = 0):
    """(x, y) batches in ``order`` (None: dataset order), on ``device``."""
    n = len(ds)
    if order is None:
        order = torch.arange(n)
    if hasattr(ds, "batch"):
        index_device = ds.labels.device if hasattr(ds, "labels") else torch.device("cpu")
        for start in range(0, n, batch_size):
            x, y = ds.batch(order[start:start + batch_size].to(index_device))
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        return
    loader = DataLoader(ds, batch_size=batch_size, sampler=order.tolist(), num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    for x, y in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def _layer_means(sums: dict[str, dict[str, float]], count: int) -> dict[str, dict[str, float]]:
    return {layer: {k: v / max(count, 1) for k, v in d.items()} for layer, d in sums.items()}


@torch.no_grad()
def evaluate(model: nn.Module, ds: Dataset, *, batch_size: int = 512, device: Union[str, torch.device] = "cpu",
             num_workers: int = 0, precision: str = precisions.DEFAULT_PRECISION) -> dict[str, Any]:
    """Top-1 (percent), mean cross-entropy, predictions and per-layer diagnostics on ``ds``.

    The model is put in eval mode; the variant layers keep whatever progress they were given.
    ``precision``: the forward's autocast (:mod:`attnbench.precision`).
    """
    device = torch.device(device)
    model.eval()
    correct, loss_sum, n = 0, 0.0, 0
    preds = []
    diag_sums: dict[str, dict[str, float]] = {}
    for x, y in _batches(ds, batch_size, None, device, num_workers):
        with precisions.autocast(precision, device):
            logits = model(x)
        loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        pred = logits.argmax(dim=1)
        correct += int((pred == y).sum())
        n += y.shape[0]
        preds.append(pred.cpu())
        for layer, d in models.diagnostics(model).items():
            acc = diag_sums.setdefault(layer, {})
            for k, v in d.items():
                acc[k] = acc.get(k, 0.0) + float(v) * y.shape[0]
    return {"top1": 100.0 * correct / max(n, 1), "loss": loss_sum / max(n, 1),
            "pred": torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long),
            "diagnostics": _layer_means(diag_sums, n)}


# --- the run ------------------------------------------------------------------------------------

@contextlib.contextmanager
def run_settings(config: TrainConfig, device: torch.device):
    """Deterministic algorithms, thread count and random state for the run; all restored afterwards
    (the process environment included: cuBLAS reads ``CUBLAS_WORKSPACE_CONFIG`` when the run's
    first matmul creates its workspace, so it is set only for the run)."""
    det, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    threads = torch.get_num_threads()
    cudnn_benchmark = torch.backends.cudnn.benchmark
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            if config.deterministic:
                if device.type == "cuda":
                    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
                    torch.backends.cudnn.benchmark = False
                torch.use_deterministic_algorithms(True, warn_only=True)
            if config.num_threads:
                torch.set_num_threads(config.num_threads)
            yield
        finally:
            torch.use_deterministic_algorithms(det, warn_only=warn_only)
            torch.set_num_threads(threads)
            torch.backends.cudnn.benchmark = cudnn_benchmark
            if workspace is None:
                os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
            else:
                os.environ["CUBLAS_WORKSPACE_CONFIG"] = workspace


class _Bar:
    """A Rich progress display for epochs and steps, or nothing."""

    def __init__(self, progress: Union[bool, Any], epochs: int, steps: int, label: str):
        self._own = None
        self.progress = None
        if progress is True:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)
            self._own = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 transient=True)
            self.progress = self._own
        elif progress not in (False, None):
            self.progress = progress          # a caller's rich.progress.Progress, shared
        if self.progress is not None:
            if self._own is not None:
                self._own.start()
            self.epoch_task = self.progress.add_task(f"{label} epochs", total=epochs, info="")
            self.step_task = self.progress.add_task(f"{label} steps", total=steps, info="")

    def step(self, info: str = "") -> None:
        if self.progress is not None:
            self.progress.update(self.step_task, advance=1, info=info)

    def epoch(self, info: str = "") -> None:
        if self.progress is not None:
            self.progress.update(self.epoch_task, advance=1, info=info)

    def close(self) -> None:
        if self.progress is not None:
            if self._own is not None:
                self._own.stop()
            else:
                self.progress.remove_task(self.epoch_task)
                self.progress.remove_task(self.step_task)


def _finite(value: torch.Tensor) -> bool:
    return bool(torch.isfinite(value).all())


def fit(model: nn.Module, splits: DataSplits, config: Optional[TrainConfig] = None, *,
        progress: Union[bool, Any] = True, callback: Optional[Callable[[dict[str, Any]], None]] = None,
        label: str = "", on_step: Optional[Callable[[int, nn.Module], None]] = None,
        test: bool = True) -> TrainResult:
    """Train ``model`` on ``splits`` and evaluate its best-validation checkpoint, before and after castling.

    The model is changed in place: it ends with the evaluated checkpoint's weights, castled
    (the inference form, ready to be measured), in eval mode.

    Args:
        model: a model from :func:`attnbench.models.create_model` (any nn.Module works; the
            variant hooks apply to its :class:`AttentionVariant` layers).
        splits: from :func:`attnbench.data.load_dataset`.
        config: a :class:`TrainConfig` (defaults when None).
        progress: True for a Rich progress bar, False for none, or a ``rich.progress.Progress``
            to add this run's bars to.
        callback: called with each epoch's history record after validation (an Optuna
            pruning hook may raise from it; the exception propagates).
        label: prefix of the progress bar descriptions.
        on_step: called with (updates so far, model) after each update, the model in training
            mode (it must leave it so, and leave the random state alone: evaluate a copy).
        test: evaluate the test split; False (tuning a recipe) never touches it: the test
            figures stay NaN and the inference form is scored on the validation split only.

    Returns:
        A :class:`TrainResult`; ``status="failed"`` with the reason when the loss became NaN
        or infinite.
    """
    config = config or TrainConfig()
    wall_start = time.perf_counter()
    augmenter = BatchAugmenter(config.augment, splits.num_classes, splits.mean, splits.std,
                               label_smoothing=config.label_smoothing, seed=config.seed,
                               flips_preserve_labels=splits.flips_preserve_labels)
    device = resolve_device(config.device)
    n_train = len(splits.train)
    if n_train == 0:
        raise ValueError("fit: the training split is empty")
    steps_per_epoch = math.ceil(n_train / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    epochs = math.ceil(total_steps / steps_per_epoch)
    result = TrainResult(status="ok", checkpoint=config.checkpoint, total_steps=total_steps, device=str(device),
                         config=dataclasses.asdict(config))

    with run_settings(config, device):
        result.num_threads = torch.get_num_threads()
        torch.manual_seed(config.seed)
        if device.type == "cuda":
            torch.cuda.manual_seed_all(config.seed)
        shuffle = torch.Generator().manual_seed(config.seed)
        model.to(device)
        train_ds, val_ds = (to_device(ds, device) for ds in (splits.train, splits.val))
        test_ds = to_device(splits.test, device) if test else None

        optimizer, scheduler = make_optimizer(model, config, total_steps)
        criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        if augmenter.soft_targets:   # mixed batches: the smoothing is in the soft targets already
            criterion = SoftTargetCrossEntropy()
        evaluate_kw = dict(batch_size=config.eval_batch_size, device=device, num_workers=config.num_workers,
                           precision=config.precision)
        scaler = precisions.grad_scaler(config.precision, device)   # float16 only; else passes through

        best: Optional[dict[str, Any]] = None
        step = 0
        bar = _Bar(progress, epochs, total_steps, label)
        train_start, cpu_start = time.perf_counter(), time.process_time()
        try:
            for epoch in range(epochs):
                model.train()
                loss_sum = reg_sum = 0.0
                correct = seen = 0
                order = torch.randperm(n_train, generator=shuffle)
                for x, y in _batches(train_ds, config.batch_size, order, device, config.num_workers):
                    if step >= total_steps:
                        break
                    models.set_progress(model, step / total_steps)
                    x, target = augmenter(x, y)
                    with precisions.autocast(config.precision, device):
                        logits = model(x)
                    task_loss = criterion(logits.float(), target)   # the loss in float32 whatever the precision
                    reg = models.regularization(model).float().to(task_loss.device)
                    loss = task_loss + reg
                    if not _finite(loss):
                        kind = "NaN" if torch.isnan(loss).any() else "infinite"
                        raise TrainingDiverged(
                            f"{kind} loss at step {step} (epoch {epoch}, progress {step / total_steps:.3f}): "
                            f"task loss {float(task_loss.detach()):.4g}, regularization {float(reg.detach()):.4g}, "
                            f"lr {optimizer.param_groups[0]['lr']:.3g}")
                    step += 1
                    optimizer_step(model, loss, optimizer, scheduler, scaler, config, step)
                    batch = y.shape[0]
                    loss_sum += float(task_loss.detach()) * batch
                    reg_sum += float(reg.detach()) * batch
                    correct += int((logits.argmax(1) == y).sum())
                    seen += batch
                    last_of_epoch = step == total_steps or seen == n_train
                    if (config.log_every and step % config.log_every == 0) or (not config.log_every and last_of_epoch):
                        _log_diagnostics(result.diagnostics, model, step, epoch, (step - 1) / total_steps)
                    bar.step(f"loss {float(task_loss.detach()):.3f}")
                    if on_step is not None:
                        on_step(step, model)
                    if config.time_budget_s is not None and time.perf_counter() - train_start > config.time_budget_s:
                        result.stopped = "time_budget"
                        break

                done = step / total_steps
                models.set_progress(model, done)
                val = evaluate(model, val_ds, **evaluate_kw)
                record = {"epoch": epoch, "step": step, "progress": done, "lr": optimizer.param_groups[0]["lr"],
                          "train_loss": loss_sum / max(seen, 1), "train_reg": reg_sum / max(seen, 1),
                          "train_top1": 100.0 * correct / max(seen, 1), "val_loss": val["loss"],
                          "val_top1": val["top1"], "time_s": time.perf_counter() - train_start}
                result.history.append(record)
                result.epochs_run = epoch + 1
                bar.epoch(f"val {val['top1']:.1f}%")
                better = best is None or (val["top1"], -val["loss"]) >= (best["val_top1"], -best["val_loss"])
                if config.checkpoint == "last" or better:
                    best = {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
                            "epoch": epoch, "step": step, "progress": done, "val_top1": val["top1"],
                            "val_loss": val["loss"]}
                if callback is not None:
                    callback(record)
                if result.stopped or step >= total_steps:
                    break
        except TrainingDiverged as err:
            result.status, result.error = "failed", str(err)
        finally:
            bar.close()
            result.steps = step
            result.train_time_s = time.perf_counter() - train_start
            result.train_cpu_s = time.process_time() - cpu_start

        if result.ok:
            _evaluate_checkpoint(model, best, test_ds, val_ds, evaluate_kw, result)
    result.wall_time_s = time.perf_counter() - wall_start
    return result


def make_optimizer(model: nn.Module, config: TrainConfig, total_steps: int):
    """(AdamW by timm's rules, warm-up + cosine over ``total_steps`` updates) for ``model``'s
    parameters that require gradients."""
    optimizer = create_optimizer_v2(model, opt=config.opt, lr=config.lr, weight_decay=config.weight_decay)
    warmup = int(round(config.warmup_fraction * total_steps))
    scheduler = CosineLRScheduler(optimizer, t_initial=max(total_steps - warmup, 1), lr_min=config.min_lr,
                                  warmup_t=warmup, warmup_lr_init=config.warmup_lr, warmup_prefix=True,
                                  t_in_epochs=False)
    return optimizer, scheduler


def optimizer_step(model: nn.Module, loss: torch.Tensor, optimizer, scheduler, scaler, config: TrainConfig,
                   step: int) -> None:
    """One update from ``loss``: backward (scaled for float16), clip, step; the schedule set for update ``step``."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if config.clip_grad is not None:
        scaler.unscale_(optimizer)   # clip the true gradients, not the scaled ones
        nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
    scaler.step(optimizer)   # float16: skipped when a gradient overflowed
    scaler.update()
    scheduler.step_update(num_updates=step)


def shuffled_batches(ds: Dataset, batch_size: int, generator: torch.Generator, device: torch.device,
                     num_workers: int = 0):
    """Endless (x, y) training batches: epoch after epoch, each in a fresh order drawn from ``generator``."""
    while True:
        yield from _batches(ds, batch_size, torch.randperm(len(ds), generator=generator), device, num_workers)


def _log_diagnostics(log: list, model: nn.Module, step: int, epoch: int, progress: float) -> None:
    for layer, values in models.diagnostics(model).items():
        if values:
            log.append({"step": step, "epoch": epoch, "progress": progress, "layer": layer,
                        **{k: float(v) for k, v in values.items()}})


def _castle_and_validate(model, best, val_ds, evaluate_kw, result: TrainResult) -> bool:
    """Castle the kept checkpoint and set its validation top-1; whether castling changed anything
    (where it did not, the same weights, structure and state give the same predictions: the
    training form's figures stand, without a second pass)."""
    changed = models.castle_changes(model)
    result.val_top1_castled = evaluate(model, val_ds, **evaluate_kw)["top1"] if changed else best["val_top1"]
    return changed


def _evaluate_checkpoint(model, best, test_ds, val_ds, evaluate_kw, result: TrainResult) -> None:
    """Test the kept checkpoint in the training form, then castle it and test again (unless
    castling changed nothing: then the inference form's figures are the training form's).
    Without a test split (``test_ds`` None), only the inference form's validation top-1."""
    model.load_state_dict(best["state"])
    models.set_progress(model, best["progress"])
    result.best_epoch, result.best_step, result.best_progress = best["epoch"], best["step"], best["progress"]
    result.val_top1 = best["val_top1"]
    if test_ds is None:   # tuning: the inference form on the validation split only
        _castle_and_validate(model, best, val_ds, evaluate_kw, result)
        return
    before = evaluate(model, test_ds, **evaluate_kw)
    result.test_top1, result.test_loss = before["top1"], before["loss"]
    result.layer_diagnostics = before["diagnostics"]
    for key in ("mask_density", "branch_ratio"):
        values = [d[key] for d in before["diagnostics"].values() if key in d]
        setattr(result, key, sum(values) / len(values) if values else math.nan)
    changed = _castle_and_validate(model, best, val_ds, evaluate_kw, result)
    after = evaluate(model, test_ds, **evaluate_kw) if changed else before
    result.test_top1_castled = after["top1"]
    result.switch_cost = result.test_top1 - result.test_top1_castled
    n = before["pred"].numel()
    result.switch_flips = float((before["pred"] != after["pred"]).sum()) / n if n else 0.0


# --- defaults ----------------------------------------------------------------------------------

def default_arch(splits: DataSplits) -> str:
    """The small registered ViT that fits a data set's image size (8 -> patch 2, else 32 / patch 4)."""
    return "vit_pico_patch2_8" if splits.img_size <= 16 else "vit_pico_patch4_32"
