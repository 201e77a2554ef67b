"""Exact angular attention (quadratic): Sim(q, k) = 1 - arccos(cos(q, k)) / pi."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from attnbench.precision import run_in_float32
from attnbench.variant import AttentionVariant
from attnbench_variants.ops.norms import normalize


def taylor_coefficient(i: int) -> float:
    """c_i = (2i)! / (4^i (i!)^2 (2i+1)), the coefficient of x^(2i+1) in arcsin(x)."""
    return math.comb(2 * i, i) / (4 ** i * (2 * i + 1))


def angular_similarity(cos: torch.Tensor, order: int = 0) -> torch.Tensor:
    """1 - arccos(cos)/pi, or its Taylor series truncated after x^order (order odd, 0 = exact).

    The exact form clamps cos to (-1, 1) by 1e-6 so that arccos's gradient stays finite.
    """
    if order == 0:
        return 1.0 - torch.arccos(cos.clamp(-1.0 + 1e-6, 1.0 - 1e-6)) / math.pi
    series = cos.clone()
    power = cos
    square = cos * cos
    for i in range(1, (order - 1) // 2 + 1):
        power = power * square
        series = series + taylor_coefficient(i) * power
    return 0.5 + series / math.pi


@dataclasses.dataclass(frozen=True)
class AngularOptions:
    order: int = dataclasses.field(
        default=0, metadata={"help": "0 = exact arccos; odd n truncates the Taylor series after x^n",
                             "ge": 0})
    eps: float = dataclasses.field(default=1e-6, metadata={"help": "floor of |q|, |k| in the cosine", "gt": 0})

    def __post_init__(self):
        if self.order < 0 or (self.order and self.order % 2 == 0):
            raise ValueError(f"option 'order' must be 0 (exact) or odd (1, 3, 5, ...), got {self.order}")


class AngularAttention(AttentionVariant):
    """Angular attention, quadratic: row-normalised 1 - arccos(cos)/pi (optionally Taylor-truncated)."""

    Options = AngularOptions
    supports_attn_mask = True

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        # float32 inside: the norms (|q|^2 overflows float16), arccos (its clamp 1 - 1e-6 rounds
        # to 1 in half precision, where arccos' gradient is infinite) and the row sums.
        return run_in_float32(self._attend, q, k, v, attn_mask).to(v.dtype)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        eps = self.options.eps
        cos = normalize(q, eps) @ normalize(k, eps).transpose(-2, -1)
        sim = angular_similarity(cos, self.options.order)   # >= 0: a valid attention weight
        if attn_mask is not None:
            if attn_mask.dtype != torch.bool:
                raise ValueError("variant 'angular' takes only a boolean attn_mask (True = attend)")
            sim = sim * attn_mask
        sim = self.attn_drop(sim / sim.sum(dim=-1, keepdim=True).clamp_min(eps))
        return sim @ v

    def core_matmuls(self, batch: int, num_tokens: int):
        return self.matmul_shapes(batch, num_tokens, "quadratic")   # the angular weights are N x N too

    def core_macs(self, num_tokens: int) -> int:
        return 2 * num_tokens * num_tokens * self.dim
