"""The castled linear-angular core on CPU as hand-written C (``linear_angular_cpu.c``) around two matmuls.

Inference only (no gradient), the official constant, with or without the output normalisation
and the token DWConv, float32 or bfloat16: the form a castled Castling or linear-angular layer
runs. It is the ``compile`` implementation's path there (:mod:`attnbench_variants.ops.linear_angular`);
anything else, or a machine where the C file does not build, runs the ``torch.compile`` path.

Why hand-written: under ``torch.compile`` the core is two Inductor loops beside the matmuls, and
in bfloat16 those loops cost more than the layer's matmuls (docs/performance.md). These two
loops read q, k and v once, reduce each row of 64 in float32 in registers, and write the output
in (B, N, h, d) order, so the heads merge with a view instead of a copy. The same numbers as
:func:`~attnbench_variants.ops.linear_angular.linear_angular_naive` within float rounding (tests).
"""
from __future__ import annotations

import ctypes
import math
import warnings
from importlib import resources
from pathlib import Path
from typing import Optional

import torch

from attnbench import native

__all__ = ["supports", "linear_angular_cpu", "build_failed"]

_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
_failure: Optional[str] = None
_libraries: dict[tuple[int, int], ctypes.CDLL] = {}     # (head width, taps) -> the built library
_pointer, _int64, _float, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int


def build_failed() -> Optional[str]:
    """Why the C core did not build in this process (one line), or None."""
    return _failure


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, constant: str, extra, residual,
             conv_weight: Optional[torch.Tensor], return_prenorm: bool) -> bool:
    """Whether :func:`linear_angular_cpu` computes this call of the core (it never raises otherwise)."""
    tensors = [t for t in (q, k, v, conv_weight) if t is not None]
    return (_failure is None and constant == "official" and extra is None and residual is None
            and not return_prenorm and q.dim() == 4 and all(t.device.type == "cpu" for t in tensors)
            and q.dtype in _DTYPES and q.dtype == k.dtype == v.dtype and q.shape == k.shape == v.shape
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))


def _library(head_dim: int, taps: int):
    global _failure
    if (head_dim, taps) in _libraries:
        return _libraries[head_dim, taps]
    source = Path(str(resources.files("attnbench_variants.ops") / "linear_angular_cpu.c"))
    try:
        library = native.load_library(source, {"D": head_dim, "K": taps})
    except native.NativeBuildError as err:
        _failure = str(err)
        warnings.warn(f"the C core of castled linear-angular attention did not build ({err}); "
                      "using torch.compile's", RuntimeWarning, stacklevel=4)
        return None
    for name in _DTYPES.values():
        getattr(library, f"prepare_{name}").argtypes = [_pointer] * 3 + [_int64] * 6 + [_float] + [_pointer] * 3 + [_int]
        getattr(library, f"finish_{name}").argtypes = [_pointer] * 3 + [_int64] * 3 + [_float] * 2 + [_int, _pointer, _int]
    _libraries[head_dim, taps] = library
    return library


def linear_angular_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, eps: float = 1e-6,
                       normalize_output: bool = True,
                       conv_weight: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """The official core's output, (B, h, N, d) with (B, N, h, d) memory order; None where the C
    core did not build (it warned once). Call only where :func:`supports` says so."""
    B, H, N, D = q.shape
    taps = 0 if conv_weight is None else conv_weight.shape[-2]
    library = _library(D, taps)
    if library is None:
        return None
    if not (q.stride() == k.stride() == v.stride() and q.stride(-1) == 1):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    name = _DTYPES[q.dtype]
    threads = torch.get_num_threads()
    q_hat, k_hat, v_rows = (torch.empty((B * H, N, D), dtype=q.dtype) for _ in range(3))   # the matmuls' operands
    stride_b, stride_h, stride_n, _ = q.stride()
    getattr(library, f"prepare_{name}")(q.data_ptr(), k.data_ptr(), v.data_ptr(), B, H, N, stride_b, stride_h,
                                        stride_n, eps, q_hat.data_ptr(), k_hat.data_ptr(), v_rows.data_ptr(),
                                        threads)
    context = torch.bmm(k_hat.transpose(1, 2), v_rows)         # (B h, d, d)
    product = torch.bmm(q_hat, context, out=k_hat)               # k^ is not needed any more
    if conv_weight is not None:
        conv_weight = conv_weight.detach().reshape(H, taps)
        conv_weight = conv_weight.contiguous() if conv_weight.dtype == torch.float32 else conv_weight.float()
    out = q_hat.view(B, N, H, D)       # q^ is spent: the output reuses its memory (one buffer less at the peak)
    getattr(library, f"finish_{name}")(v_rows.data_ptr(), product.data_ptr(),
                                       None if conv_weight is None else conv_weight.data_ptr(), B, H, N,
                                       2.0 / math.pi, 2.0 * eps, int(normalize_output), out.data_ptr(), threads)
    return out.transpose(1, 2)
