"""Hydra attention (Bolya et al., "Hydra Attention: Efficient Attention with Many Heads",
ECCV 2022 workshops, arXiv:2209.07484) as an attnbench variant plugin.

Hydra takes multi-head attention to its limit: as many heads as channels. With a cosine kernel
(q and k L2-normalised per token) each one-channel head is linear attention, and summing over
keys first gives, for every token n and channel c,

    y[n, c] = q^[n, c] * sum_m k^[m, c] * v[m, c]

O(N C) work and memory, against O(N^2 C) for softmax attention.
"""
from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import torch

from attnbench import AttentionVariant

__all__ = ["HydraAttention", "HydraOptions"]
__version__ = "0.1.0"


@dataclasses.dataclass(frozen=True)
class HydraOptions:
    """Typed options: what `attnbench variants` lists and an experiment may sweep.

    Every field declares ``help``; numeric limits (``gt``, ``ge``, ``lt``, ``le``) in the metadata
    are enforced by attnbench and shown by ``attnbench variants hydra``.
    """

    normalize: Literal["all", "head"] = dataclasses.field(
        default="all",
        metadata={"help": "L2-normalise q and k over all C channels of a token (paper) "
                          "or within each of the layer's num_heads groups"})
    eps: float = dataclasses.field(default=1e-6, metadata={"help": "floor of the L2 norm", "gt": 0})


class HydraAttention(AttentionVariant):
    """Hydra attention: one head per channel, y = q^ * sum_n (k^_n * v_n), cosine kernel."""

    Options = HydraOptions

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        # q, k, v: (B, h, N, d) with h * d = C. "all" normalises over (h, d), i.e. all C channels.
        dims = (1, 3) if self.options.normalize == "all" else (3,)
        q = q / torch.linalg.vector_norm(q, dim=dims, keepdim=True).clamp_min(self.options.eps)
        k = k / torch.linalg.vector_norm(k, dim=dims, keepdim=True).clamp_min(self.options.eps)
        # sum over tokens of k * v, one dot product per channel, written as a batched matmul
        # (B, h, d, 1, N) @ (B, h, d, N, 1) so that MAC counters see the contraction.
        kv = k.transpose(-2, -1).unsqueeze(-2) @ v.transpose(-2, -1).unsqueeze(-1)
        return q * kv.reshape(q.shape[0], q.shape[1], 1, q.shape[3])      # (B, h, N, d)

    def core_macs(self, num_tokens: int) -> int:
        # The token reduction sum_n k^_n * v_n: N MACs per channel, N C in all. The gating
        # q^ * kv (N C multiplies) and the normalisations are elementwise and, by attnbench's
        # convention (as the counters), not counted.
        return num_tokens * self.dim
