"""Softmax attention through ``F.scaled_dot_product_attention`` (timm's default path)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from attnbench.variant import AttentionVariant


class SoftmaxAttention(AttentionVariant):
    """Softmax attention (SDPA); equals timm's Attention given the same weights."""

    supports_attn_mask = True

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        dropout = self.attn_drop.p if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)

    def core_matmuls(self, batch: int, num_tokens: int):
        return self.matmul_shapes(batch, num_tokens, "quadratic")

    def core_macs(self, num_tokens: int) -> int:
        # Q K^T and A V: N^2 d each per head.
        return 2 * num_tokens * num_tokens * self.dim
