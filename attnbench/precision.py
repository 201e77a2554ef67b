"""Numeric precision: the allowed settings, their torch dtypes, and how a run uses them.

A precision is a name: ``float32`` (the default: plain float32), ``bfloat16`` or ``float16``
(``torch.autocast`` to that dtype around the forward; weights, optimiser state and gradients
stay float32). Training (``TrainConfig.precision``), sweeps (``train.precision``) and
``attnbench bench --dtype`` all take these names and mean the same thing by them.

Variants whose arithmetic breaks in half precision (norms, arccos, sums over tokens) run
those parts through :func:`run_in_float32`, or, where only float16 breaks it (bfloat16 has
float32's exponent range), through :func:`run_in_float32_or_bfloat16`, which keeps bfloat16
inference in bfloat16.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Union

import torch
from torch import nn

from attnbench.precision_names import DEFAULT_PRECISION, PRECISION_NAMES, Precision

__all__ = ["Precision", "PRECISIONS", "DEFAULT_PRECISION", "HALF_DTYPES", "check_precision", "torch_dtype", "autocast",
           "grad_scaler", "AutocastModule", "run_in_float32",
           "run_in_float32_or_bfloat16"]

#: Every allowed precision and its torch dtype, in the order they are documented.
PRECISIONS: dict[str, torch.dtype] = {name: getattr(torch, name) for name in PRECISION_NAMES}
#: The dtypes autocast computes in (everything in PRECISIONS but float32).
HALF_DTYPES = tuple(dtype for dtype in PRECISIONS.values() if dtype != torch.float32)


def check_precision(name: Any, what: str = "precision") -> str:
    """``name`` if it is an allowed precision, else ValueError naming ``what`` and the allowed values."""
    if name not in PRECISIONS:
        raise ValueError(f"{what} must be one of {', '.join(PRECISIONS)}, got {name!r}")
    return name


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a precision name (ValueError for an unknown one)."""
    return PRECISIONS[check_precision(name)]


def _device_type(device: Union[str, torch.device]) -> str:
    return torch.device(device).type


def autocast(precision: str, device: Union[str, torch.device]) -> contextlib.AbstractContextManager:
    """The context a forward runs in: nothing for ``float32``, else ``torch.autocast`` to that dtype
    on ``device``'s type (CPU and CUDA both)."""
    dtype = torch_dtype(precision)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(_device_type(device), dtype=dtype)


def grad_scaler(precision: str, device: Union[str, torch.device]) -> torch.amp.GradScaler:
    """A ``torch.amp.GradScaler``, enabled for ``float16`` only: float16 gradients underflow
    without loss scaling; bfloat16 has float32's exponent range and needs none. Disabled, its
    methods pass through (``scale`` returns the loss, ``step`` steps)."""
    return torch.amp.GradScaler(_device_type(device), enabled=check_precision(precision) == "float16")


class AutocastModule(nn.Module):
    """``module`` whose forward runs under :func:`autocast` (for timing and memory measurement)."""

    def __init__(self, module: nn.Module, precision: str, device: Union[str, torch.device]):
        super().__init__()
        self.module = module
        self.precision = check_precision(precision)
        self.device_type = _device_type(device)

    def forward(self, *args, **kwargs):
        with autocast(self.precision, self.device_type):
            return self.module(*args, **kwargs)


def at_precision(module: nn.Module, precision: str, device: Union[str, torch.device]) -> nn.Module:
    """``module`` whose forward runs in ``precision`` (float32: the module itself), for measuring
    the inference form in the precision it was trained in."""
    return module if check_precision(precision) == DEFAULT_PRECISION else AutocastModule(module, precision, device)


def _as_float32(value: Any) -> Any:
    return value.float() if isinstance(value, torch.Tensor) and value.dtype in HALF_DTYPES else value


def run_in_float32(fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` in float32: every float16/bfloat16 tensor argument cast to float32
    (differentiably) and autocast off inside (else autocast would run fn's matmuls in half
    again). Without half tensors and without autocast on, it is just ``fn(*args, **kwargs)``.

    The result is fn's, in float32; the caller casts back what it returns to the layer.
    """
    tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    device_type = tensors[0].device.type if tensors else "cpu"
    if not torch.is_autocast_enabled(device_type) and not any(t.dtype in HALF_DTYPES for t in tensors):
        return fn(*args, **kwargs)
    with torch.autocast(device_type, enabled=False):   # restored on exit
        return fn(*(_as_float32(a) for a in args), **{k: _as_float32(v) for k, v in kwargs.items()})


def _as_bfloat16(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dtype != torch.bfloat16 and value.is_floating_point():
        return value.to(torch.bfloat16)
    return value


def run_in_float32_or_bfloat16(fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` in bfloat16 when that is the work's precision and it is inference,
    else :func:`run_in_float32`.

    Inference: no tensor argument needs a gradient, or gradients are off. bfloat16: a tensor
    argument is bfloat16 (as under bfloat16 autocast, or in a model cast to it) and none is
    float16. Then every floating tensor argument is cast to bfloat16 and autocast is off inside,
    so ``fn``'s matmuls run in bfloat16 (accumulating in float32, as the CPU and GPU libraries
    do) and its elementwise passes read and write half the bytes. For an ``fn`` whose only
    half-precision hazard is float16's range (norms of squares, sums over tokens): bfloat16 has
    float32's exponent, and its 8-bit mantissa costs what the half-precision tolerance allows.
    Training keeps float32 inside, where the gradients' sums need it.
    """
    tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    dtypes = {t.dtype for t in tensors}
    inference = not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors)
    if not (inference and torch.bfloat16 in dtypes and torch.float16 not in dtypes):
        return run_in_float32(fn, *args, **kwargs)
    with torch.autocast(tensors[0].device.type, enabled=False):   # restored on exit
        return fn(*(_as_bfloat16(a) for a in args), **{k: _as_bfloat16(v) for k, v in kwargs.items()})
