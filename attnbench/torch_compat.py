"""The torch internals attnbench cannot avoid, in one place, each with why and for which versions.

Everything else uses torch's public API only. Each helper degrades to a safe answer where the
internal is missing, so a torch release that drops one costs speed or a limit, never a crash.
"""
from __future__ import annotations

import torch

__all__ = ["dispatch_mode_active", "softmax_inplace_", "raise_recompile_limit"]


def dispatch_mode_active() -> bool:
    """Whether a ``TorchDispatchMode`` (e.g. ``torch.utils.flop_counter.FlopCounterMode``) is on.

    The fused linear-angular path then runs its eager ops so the counter sees them. torch has no
    public query for this; ``torch._C._len_torch_dispatch_stack`` exists from torch 2.0 through
    2.14 at least. Without it: False (the compiled path, whose MACs a counter does not see).
    """
    length = getattr(torch._C, "_len_torch_dispatch_stack", None)
    return bool(length()) if length is not None else False


def softmax_inplace_(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim written into ``x`` itself (CPU): one N x N buffer less per head.

    ``torch.softmax`` has no ``out=``; the aten op ``torch._softmax(x, dim, half_to_float, out=)``
    does, in every torch from 1.x to 2.14. Elsewhere, or without it: ``torch.softmax`` (a copy).
    """
    if x.device.type == "cpu" and hasattr(torch, "_softmax"):
        return torch._softmax(x, -1, False, out=x)
    return torch.softmax(x, dim=-1)


def raise_recompile_limit(shapes: int) -> None:
    """Let Dynamo compile one function for ``shapes`` input shapes (its default is 8; past that it
    runs the rest eager, and a benchmark would time them so). Called in benchmark worker
    processes only, which own their Dynamo settings.

    ``torch._dynamo.config`` is the only place the limit is set: ``recompile_limit`` from torch
    2.7 on, ``cache_size_limit`` before (an alias of it since).
    """
    import torch._dynamo.config as config

    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), shapes))
