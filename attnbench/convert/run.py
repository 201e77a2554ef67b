"""Converting a trained teacher, one configuration and seed at a time.

For each (configuration, seed): build the student with the configuration's variant, load every
teacher weight that fits (same name and shape; the student's own new parameters start at zero or
at the variant's initialisation, ``convert.new_parameters``), then

1. **zero-shot**: test top-1 of the student as loaded;
2. **attention transfer** (``transfer_steps``): only the attention layers train, each to output
   what the teacher's layer outputs, given the teacher's input to that layer (per-layer MSE, the
   layers' own regularisation added), on training batches;
3. **fine-tuning** (``finetune_steps``): the task loss, all parameters or the attention layers',
   with :func:`attnbench.train.fit` (the experiment's ``train`` recipe over these updates,
   the last weights evaluated, castled where the variant castles).

Every top-1 here is of the inference form (after ``castle()``, on a copy mid-way). The recovery
curve is validation top-1 every ``eval_every`` updates across both stages (update 0: zero-shot);
the reported figures are on the test split. The teacher (:mod:`attnbench.convert.teacher`) is
the same weights for every configuration of a seed.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from typing import Any, Callable, Optional

import torch
from torch import nn

from attnbench import models, precision as precisions
from attnbench.convert.spec import ConvertSpec
from attnbench.train import (TrainConfig, TrainingDiverged, TrainResult, evaluate, fit, make_optimizer, optimizer_step,
                             resolve_device, run_settings, shuffled_batches, to_device)
from attnbench.train import _batches, _evaluate_checkpoint   # the loop's own pieces, shared rather than copied

__all__ = ["ConvertOutcome", "load_teacher_weights", "attention_mse", "transfer", "convert_student",
           "inference_top1", "MSE_PROBE_IMAGES"]

MSE_PROBE_IMAGES = 256   # validation images on which the per-layer attention MSE is reported


@dataclasses.dataclass
class ConvertOutcome:
    """One (configuration, seed) converted: the fine-tuning's result and the conversion's columns."""

    result: TrainResult
    columns: dict[str, Any]


def load_teacher_weights(student: nn.Module, teacher_state: dict[str, torch.Tensor], new_parameters: str) -> dict:
    """Load every teacher weight that fits ``student``; start its new parameters as asked.

    Returns ``{"loaded": n, "new": {key: "zero" | "init"}, "unused": [teacher keys not loaded]}``.
    """
    report = models.load_state(student, teacher_state, "teacher")
    own = student.state_dict()
    with torch.no_grad():
        for key in report["missing"]:
            if new_parameters == "zero" and own[key].is_floating_point():
                own[key].zero_()
    return {"loaded": len(report["loaded"]), "new": {k: new_parameters for k in report["missing"]},
            "unused": sorted(report["unexpected"] + report["mismatched"])}


class _LayerIO:
    """Forward hooks on a model's attention layers: each layer's last input and output, by name."""

    def __init__(self, model: nn.Module):
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = [layer.register_forward_hook(self._hook(name)) for name, layer in models.variant_layers(model)]

    def _hook(self, name: str):
        def hook(module, args, output):
            self.inputs[name], self.outputs[name] = args[0].detach(), output.detach()
        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def _layer_losses(teacher: nn.Module, student: nn.Module, x: torch.Tensor, precision: str,
                  device: torch.device) -> list[torch.Tensor]:
    """Per attention layer: MSE between the student's layer and the teacher's, both given the
    teacher's input to that layer."""
    io = _LayerIO(teacher)
    try:
        with torch.no_grad(), precisions.autocast(precision, device):
            teacher(x)
    finally:
        io.close()
    layers = dict(models.variant_layers(student))
    losses = []
    for name, inp in io.inputs.items():
        with precisions.autocast(precision, device):
            out = layers[name](inp)
        losses.append(torch.mean((out.float() - io.outputs[name].float()) ** 2))
    return losses


@torch.no_grad()
def attention_mse(teacher: nn.Module, student: nn.Module, x: torch.Tensor,
                  precision: str = precisions.DEFAULT_PRECISION) -> list[float]:
    """Per attention layer, in module order: the student's output MSE to the teacher's on ``x``
    (each given the teacher's input to the layer), both in eval mode."""
    was = student.training
    teacher.eval(), student.eval()
    try:
        return [float(v) for v in _layer_losses(teacher, student, x, precision, x.device)]
    finally:
        student.train(was)


def _trainable(model: nn.Module, only_attention: bool) -> dict[str, bool]:
    """Freeze every parameter outside the attention layers when ``only_attention``; returns the
    previous ``requires_grad`` of each, for :func:`_restore`."""
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    if only_attention:
        attention = {id(p) for _, layer in models.variant_layers(model) for p in layer.parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in attention)
    return before


def _restore(model: nn.Module, before: dict[str, bool]) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(before[name])


def inference_top1(model: nn.Module, ds, **evaluate_kw) -> float:
    """Top-1 of ``model``'s inference form (a castled copy: ``model`` is left as it is)."""
    return evaluate(models.castle(copy.deepcopy(model)), ds, **evaluate_kw)["top1"]


def transfer(teacher: nn.Module, student: nn.Module, splits, config: TrainConfig, steps: int, *,
             on_step: Optional[Callable[[int, nn.Module], None]] = None) -> float:
    """Attention transfer: ``steps`` updates of the student's attention layers alone, each to the
    teacher's layer output given the teacher's layer input (mean of the per-layer MSEs, plus the
    layers' regularisation). Batches and schedule follow ``config`` (no augmentation: the target
    is the teacher's function, not the task). Returns the training time in seconds.

    Raises:
        TrainingDiverged: the loss became NaN or infinite.
    """
    device = resolve_device(config.device)
    before = _trainable(student, only_attention=True)
    # threads and determinism as the recipe says (it nests in a caller's own settings)
    with run_settings(config, device):
        try:
            optimizer, scheduler = make_optimizer(student, config, steps)
            scaler = precisions.grad_scaler(config.precision, device)
            batches = shuffled_batches(to_device(splits.train, device), config.batch_size,
                                       torch.Generator().manual_seed(config.seed), device, config.num_workers)
            teacher.eval()
            student.train()
            start = time.perf_counter()
            for step in range(1, steps + 1):
                x, _ = next(batches)
                losses = _layer_losses(teacher, student, x, config.precision, device)
                loss = torch.stack(losses).mean() + models.regularization(student).float().to(device)
                if not torch.isfinite(loss).all():
                    raise TrainingDiverged(f"non-finite attention-transfer loss at update {step} "
                                           f"(lr {optimizer.param_groups[0]['lr']:.3g})")
                optimizer_step(student, loss, optimizer, scheduler, scaler, config, step)
                if on_step is not None:
                    on_step(step, student)
            return time.perf_counter() - start
        finally:
            _restore(student, before)


def _stage_config(base: TrainConfig, seed: int, device: str, steps: int, lr: Optional[float],
                  n_train: int) -> TrainConfig:
    """The experiment's recipe for a stage of ``steps`` updates (epochs enough to hold them)."""
    epochs = max(1, math.ceil(steps / max(1, math.ceil(n_train / base.batch_size))))
    return dataclasses.replace(base, seed=seed, device=device, epochs=epochs, max_steps=max(steps, 1),
                               checkpoint="last", time_budget_s=None, lr=base.lr if lr is None else lr)


def convert_student(teacher, student: nn.Module, splits, spec: ConvertSpec, train: TrainConfig, seed: int,
                    device: str) -> ConvertOutcome:
    """Convert ``teacher`` (a :class:`attnbench.convert.teacher.Teacher`) into ``student`` (built
    with the configuration's variant and this seed; changed in place: it ends fine-tuned, castled).

    Returns the fine-tuning's :class:`TrainResult` (``status="failed"`` with the reason if a stage
    diverged) and the conversion's columns (:mod:`attnbench.results.schema`).
    """
    keys = load_teacher_weights(student, teacher.model.state_dict(), spec.new_parameters)
    # no weight decay in transfer: the target is the teacher's layer, and decay would move even a
    # layer that already matches it (softmax into softmax: transfer must change nothing)
    transfer_config = dataclasses.replace(
        _stage_config(train, seed, device, spec.transfer_steps, spec.transfer_lr, len(splits.train)), weight_decay=0.0)
    finetune_config = _stage_config(train, seed, device, spec.finetune_steps, spec.finetune_lr, len(splits.train))
    run_device = resolve_device(device)
    evaluate_kw = dict(batch_size=finetune_config.eval_batch_size, device=run_device,
                       num_workers=finetune_config.num_workers, precision=finetune_config.precision)
    steps, val_top1 = [], []

    def record(step: int, model: nn.Module) -> None:
        if step % spec.eval_every == 0 or step == spec.total_steps or step == spec.transfer_steps:
            if not steps or steps[-1] != step:
                steps.append(step)
                val_top1.append(inference_top1(model, val_ds, **evaluate_kw))

    columns: dict[str, Any] = {"teacher_top1": teacher.test_top1, "teacher_val_top1": teacher.val_top1,
                               "teacher_checkpoint": teacher.path, "convert_keys": json.dumps(keys, sort_keys=True),
                               "convert_config": json.dumps(dataclasses.asdict(spec), sort_keys=True, default=str)}
    with run_settings(finetune_config, run_device):
        torch.manual_seed(seed)
        student.to(run_device)
        teacher.model.to(run_device)
        val_ds, test_ds = to_device(splits.val, run_device), to_device(splits.test, run_device)
        probe = next(_batches(val_ds, MSE_PROBE_IMAGES, None, run_device))[0]   # the first validation images
        models.set_progress(student, 0.0)
        record(0, student)
        columns["top1_zero_shot"] = inference_top1(student, test_ds, **evaluate_kw)
        columns["attention_mse_zero_shot"] = _mean(attention_mse(teacher.model, student, probe,
                                                                 finetune_config.precision))
        transfer_time = 0.0
        try:
            if spec.transfer_steps:
                transfer_time = transfer(teacher.model, student, splits, transfer_config, spec.transfer_steps,
                                         on_step=record)
        except TrainingDiverged as err:
            return ConvertOutcome(TrainResult(status="failed", error=str(err)), columns)
        columns["top1_after_transfer"] = inference_top1(student, test_ds, **evaluate_kw)
        columns["attention_mse_after_transfer"] = _mean(attention_mse(teacher.model, student, probe,
                                                                      finetune_config.precision))
    if spec.finetune_steps:
        before = _trainable(student, only_attention=spec.finetune == "attention")
        try:
            result = fit(student, splits, finetune_config, progress=False,
                         on_step=lambda step, model: record(spec.transfer_steps + step, model))
        finally:
            _restore(student, before)
    else:
        result = _evaluated_as_is(student, splits, finetune_config, evaluate_kw)
    columns.update(recovery_steps=steps, recovery_val_top1=val_top1, steps=spec.total_steps,
                   train_time_s=transfer_time + result.train_time_s)
    return ConvertOutcome(result, columns)


def _evaluated_as_is(model: nn.Module, splits, config: TrainConfig, evaluate_kw: dict) -> TrainResult:
    """A :class:`TrainResult` for weights that are not trained further (no fine-tuning)."""
    device = evaluate_kw["device"]
    val_ds, test_ds = to_device(splits.val, device), to_device(splits.test, device)
    val = evaluate(model, val_ds, **evaluate_kw)
    best = {"state": {k: v.detach().clone() for k, v in model.state_dict().items()}, "epoch": -1, "step": 0,
            "progress": 0.0, "val_top1": val["top1"], "val_loss": val["loss"]}
    result = TrainResult(status="ok", checkpoint="last", device=str(device), config=dataclasses.asdict(config))
    with run_settings(config, device):
        _evaluate_checkpoint(model, best, test_ds, val_ds, evaluate_kw, result)
    result.best_epoch = -1   # no epoch was trained
    return result


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan
