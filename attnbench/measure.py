"""All measuring lives here: MACs, parameters, latency, memory.

MACs are multiply-accumulates (1 MAC = 2 FLOPs). CPU SDPA is one fused op that counters see
as zero, so every count runs under the SDPA math backend, which decomposes it into matmuls.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_macs", "count_macs_reference", "count_params"]


@contextlib.contextmanager
def _countable():
    # Count with autograd enabled (inference_mode can take fused fast paths), in eval mode.
    with sdpa_kernel(SDPBackend.MATH), torch.enable_grad():
        yield


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """MACs of one forward of ``model`` on a zero-batch-dim input of ``input_shape``.

    ptflops' ``aten`` backend (its default ``pytorch`` backend misses ``@``, einsum and timm's
    qkv/proj), under the SDPA math backend. Batch size 1 is prepended. Bias adds are counted.
    """
    from ptflops import get_model_complexity_info  # lazy: only measuring needs it

    was_training = model.training
    model.eval()
    try:
        with _countable():
            macs, _ = get_model_complexity_info(
                model, tuple(input_shape), as_strings=False, backend="aten",
                print_per_layer_stat=False, verbose=False)
    finally:
        model.train(was_training)
    if macs is None:
        raise RuntimeError(f"ptflops could not count {type(model).__name__} on input {tuple(input_shape)}")
    return int(macs)


def count_macs_reference(model: nn.Module, input_shape: Sequence[int]) -> int:
    """MACs from torch's FlopCounterMode (FLOPs / 2; biases not counted), the cross-check."""
    was_training = model.training
    model.eval()
    param = next(model.parameters(), None)
    x = torch.zeros(1, *input_shape, device=param.device if param is not None else None)
    try:
        with _countable(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those requiring grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
