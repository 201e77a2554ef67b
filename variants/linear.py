"""Kernelised linear attention with a positive feature map and row normalisation."""
from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from attnbench.precision import run_in_float32
from attnbench.variant import AttentionVariant

FEATURE_MAPS = {
    "relu": F.relu,                      # EfficientViT
    "elu": lambda x: F.elu(x) + 1.0,     # Katharopoulos et al. 2020
}


@dataclasses.dataclass(frozen=True)
class LinearOptions:
    feature_map: Literal["relu", "elu"] = dataclasses.field(
        default="elu", metadata={"help": "phi: relu (EfficientViT) or elu+1 (Katharopoulos)"})
    eps: float = dataclasses.field(default=1e-6, metadata={"help": "added to the row normaliser", "gt": 0})


class LinearAttention(AttentionVariant):
    """Linear attention: phi(q) (phi(k)^T v) / (phi(q) . sum phi(k) + eps)."""

    Options = LinearOptions

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        # float32 inside: the (d, d) state phi(k)^T v and the normaliser are sums over all N
        # tokens (float16 overflows them, the known fp16 NaN of linear attention; bfloat16's 8
        # bits blur the normaliser). O(N d^2), cheap beside the projections.
        return run_in_float32(self._attend, q, k, v).to(v.dtype)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        phi = FEATURE_MAPS[self.options.feature_map]
        q, k = phi(q), phi(k)
        kv = k.transpose(-2, -1) @ v                                  # (B, h, d, d)
        normaliser = q @ k.sum(dim=-2, keepdim=True).transpose(-2, -1)  # (B, h, N, 1)
        return (q @ kv) / (normaliser + self.options.eps)

    def core_matmuls(self, batch: int, num_tokens: int):
        return self.matmul_shapes(batch, num_tokens, "linear")

    def core_macs(self, num_tokens: int) -> int:
        # K^T V and Q (K^T V): N d^2 per head each; the normaliser Q k_sum: N d per head.
        return 2 * num_tokens * self.dim * self.head_dim + num_tokens * self.dim
