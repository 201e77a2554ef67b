"""Linear-angular attention, the Castling-ViT inference block (docs/method.md, "Linear-angular attention").

    Y = proj(merge(normalize(0.5 v + (1/pi) q^ (k^^T v)) + DWConv(v)))

with q^ = q/|q|, k^ = k/|k| per token and head. The core lives in ``ops/linear_angular.py``: a
fast path (default) beside the plain reference. No Python loop over heads or tokens.
"""
from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from attnbench.precision import run_in_float32_or_bfloat16
from attnbench.variant import AttentionVariant, token_grid
from attnbench_variants.ops.linear_angular import compile_fell_back, linear_angular


@dataclasses.dataclass(frozen=True)
class LinearAngularOptions:
    residual: Literal["none", "dwconv", "dwconv2d"] = dataclasses.field(
        default="dwconv", metadata={"help": "stand-in for the high-order residual: none, "
                                             "depthwise conv along tokens (official), 2-D over the grid"})
    kernel_size: int = dataclasses.field(default=9, metadata={"help": "dwconv taps along tokens (odd)", "ge": 1})
    grid_kernel_size: int = dataclasses.field(default=3, metadata={"help": "dwconv2d kernel side (odd)", "ge": 1})
    num_prefix_tokens: int = dataclasses.field(
        default=-1, metadata={"help": "dwconv2d: class/register tokens before the grid; -1 infers "
                                      "N - isqrt(N)^2. They get no conv term."})
    normalize_output: bool = dataclasses.field(default=True, metadata={"help": "y / |y| per token and head"})
    constant: Literal["official", "faithful"] = dataclasses.field(
        default="official", metadata={"help": "official: 0.5 v, no row normaliser; faithful: "
                                               "0.5 sum(v) and division by the kernel row sum"})
    eps: float = dataclasses.field(default=1e-6, metadata={"help": "norm floor (the official code has none)",
                                                                 "gt": 0})

    def __post_init__(self):
        for name in ("kernel_size", "grid_kernel_size"):
            size = getattr(self, name)
            if size < 1 or size % 2 == 0:
                raise ValueError(f"option '{name}' must be a positive odd integer, got {size}")


class LinearAngularAttention(AttentionVariant):
    """Linear-angular attention (official Castling-ViT inference block): 0.5 v + q^(k^^T v)/pi, normalised, + DWConv."""

    Options = LinearAngularOptions
    kernel_implementations = ("fast", "reference", "compile")

    @classmethod
    def kernel_ran(cls, requested: str) -> str:
        ran = super().kernel_ran(requested)
        return "fast" if ran == "compile" and compile_fell_back() else ran

    def __init__(self, dim: int, num_heads: int = 8, **kwargs):
        super().__init__(dim, num_heads=num_heads, **kwargs)
        opts = self.options
        if opts.residual == "dwconv":
            size = opts.kernel_size
            # Official: one filter per head along the token axis, shared over the d channels.
            self.dconv = nn.Conv2d(num_heads, num_heads, (size, 1), padding=(size // 2, 0),
                                   groups=num_heads, bias=False)
        elif opts.residual == "dwconv2d":
            size = opts.grid_kernel_size
            self.dconv = nn.Conv2d(dim, dim, size, padding=size // 2, groups=dim, bias=False)
        else:
            self.dconv = None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        return self.core(q, k, v)

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """normalize(linear term of the angular kernel applied to v) + residual(v).

        Runs the implementation selected by :mod:`attnbench.kernels` (fast by default, the
        plain reference with ``kernels.use("reference")``).
        """
        # float32 inside, for training and float16: the norms (|q|^2 overflows float16), the
        # (d, d) context k^^T v, a sum over all N tokens, and the faithful row sum. bfloat16
        # inference stays in bfloat16 (float32's range; the matmuls accumulate in float32):
        # there the float32 core cost more than the layer's matmuls (docs/performance.md).
        return run_in_float32_or_bfloat16(linear_angular, q, k, v, **self.core_options(v)).to(v.dtype)

    def core_options(self, v: torch.Tensor) -> dict:
        """Keyword options of the core ops for this layer: eps, constant, normalisation, residual."""
        o = self.options
        return dict(eps=o.eps, constant=o.constant, normalize_output=o.normalize_output,
                    conv_weight=self.dconv.weight if o.residual == "dwconv" else None,
                    residual=self.conv_residual(v) if o.residual == "dwconv2d" else None)

    def conv_residual(self, v: torch.Tensor) -> torch.Tensor:
        if self.options.residual == "dwconv":
            return self.dconv(v)                      # (B, h, N, d) is (batch, channels, H, W)
        B, h, N, d = v.shape
        prefix, side = self.token_grid(N)
        grid = v[:, :, prefix:].permute(0, 1, 3, 2).reshape(B, h * d, side, side)
        out = self.dconv(grid).reshape(B, h, d, side * side).permute(0, 1, 3, 2)
        return F.pad(out, (0, 0, prefix, 0))          # prefix tokens get no conv term

    def token_grid(self, num_tokens: int) -> tuple[int, int]:
        """(number of prefix tokens, side of the square token grid) for ``dwconv2d``."""
        try:
            return token_grid(num_tokens, self.options.num_prefix_tokens)
        except ValueError as err:
            raise ValueError(f"variant '{self._label()}': residual 'dwconv2d' needs a square token grid: {err}") from None

    def core_matmuls(self, batch: int, num_tokens: int):
        # Castling castled is this layer; its DWConv is a convolution, not part of the matmul floor
        return self.matmul_shapes(batch, num_tokens, "linear")

    def core_macs(self, num_tokens: int) -> int:
        n, c = num_tokens, self.dim
        macs = 2 * n * c * self.head_dim                     # k^^T v and q^ (k^^T v)
        if self.options.constant == "faithful":
            macs += n * c                                    # q^ . sum(k^), the row sum
        if self.options.residual == "dwconv":
            macs += self.options.kernel_size * n * c
        elif self.options.residual == "dwconv2d":
            prefix, side = self.token_grid(n)
            macs += self.options.grid_kernel_size ** 2 * side * side * c
        return macs
