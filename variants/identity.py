"""A no-attention control: every token keeps its own value vector."""
from __future__ import annotations

from typing import Optional

import torch

from attnbench.variant import AttentionVariant


class IdentityAttention(AttentionVariant):
    """No-attention control: output = proj(v), no token mixing."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        return v

    def core_matmuls(self, batch: int, num_tokens: int):
        return []   # no token mixing: the projections are the whole floor

    def core_macs(self, num_tokens: int) -> int:
        return 0
