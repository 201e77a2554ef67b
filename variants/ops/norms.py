"""The floored normalisation x / max(|x|, eps) that every built-in variant uses, with one rule
for its gradient.

Forward it is ``F.normalize``. Backward differs at one kind of point: a vector whose norm is at
most the floor (in practice an exactly zero token) passes no gradient. ``F.normalize`` gives it
the floor's gain 1/eps there (1e6 at eps = 1e-6, 1e12 where two floors meet, as at a zero token
of linear-angular attention, whose output is zero too): an artefact of the floor, not of the
method, that swamps a float32 step and overflows float16 gradients (max 65504).
"""
from __future__ import annotations

import torch

__all__ = ["normalize", "stop_floored"]


def stop_floored(x: torch.Tensor, norm: torch.Tensor, floor: float) -> torch.Tensor:
    """x, detached in the rows whose ``norm`` (the norm of that row of x, floored or not) is at most ``floor``."""
    return torch.where(norm > floor, x, x.detach())


def normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / max(|x|, eps) over the last dim; rows with |x| <= eps pass no gradient (module docstring)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return stop_floored(x, norm, eps) / norm.clamp_min(eps)
