"""Castling's training form as one op: the auxiliary branch joined to the linear-angular core.

    2 y = v + (2/pi) (q (k^^T v)) / |q| + 2 gate S v,    S = 1[A > t] A,  A = softmax(q k^T / sqrt(d))
    out = 2 y / |2 y| + DWConv(v)

- composed (:func:`castling_attention_composed`): the branch op
  (:mod:`~attnbench_variants.ops.masked_softmax`) then the core
  (:mod:`~attnbench_variants.ops.linear_angular`) with ``extra = S v``; each follows the
  implementation switch, so with ``reference`` this is the plain formulation step by step.
- fused (:class:`_CastlingTraining`, the fast path in training with the official constant): one
  autograd Function. Its backward hands the core's d(2 y) straight to the branch, whose matmuls
  add their gradients into the core's q, k, v gradient buffers (``baddbmm``) with 2 gate and
  1/sqrt(d) folded in: no autograd accumulation of three (B, h, N, d) gradients, no separate
  scaling passes, one node instead of two. It also makes the q, k, v views contiguous once.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from attnbench.torch_compat import dispatch_mode_active
from attnbench_variants.ops import get_impl
from attnbench_variants.ops.linear_angular import (CoreSaved, _needs_grad, core_backward, core_forward,
                                                   linear_angular)
from attnbench_variants.ops.masked_softmax import BranchSaved, branch_backward, branch_forward, masked_softmax_attention

__all__ = ["CastlingOutput", "castling_attention", "castling_attention_composed"]


class CastlingOutput(NamedTuple):
    """The core's output and the branch's statistics."""

    out: torch.Tensor                     # (B, h, N, d)
    prenorm: torch.Tensor                 # |y| before the output normalisation (detached)
    branch_norm: torch.Tensor             # |gate S v| (detached)
    row_sums: Optional[torch.Tensor]      # gate * row sums of S, (B, h, N), differentiable; or None
    density: torch.Tensor                 # fraction of entries that pass the threshold


def castling_attention_composed(q, k, v, *, threshold: float, gate: float = 1.0, need_row_sums: bool = False,
                                dropout: Optional[Callable] = None, **core) -> CastlingOutput:
    """The branch, then the core with ``extra = S v``; ``core``: keyword options of ``linear_angular``."""
    sv, row_sums, density = masked_softmax_attention(q, k, v, threshold=threshold, gate=gate, dropout=dropout,
                                                     need_row_sums=need_row_sums)
    out, prenorm = linear_angular(q, k, v, extra=sv, return_prenorm=True, **core)
    return CastlingOutput(out, prenorm, sv.detach().norm(), row_sums, density)


def castling_attention(q, k, v, *, threshold: float, gate: float = 1.0, need_row_sums: bool = False,
                       dropout: Optional[Callable] = None, eps: float = 1e-6, constant: str = "official",
                       normalize_output: bool = True, conv_weight: Optional[torch.Tensor] = None,
                       residual: Optional[torch.Tensor] = None) -> CastlingOutput:
    """Castling's core with the auxiliary branch on, q, k, v (B, h, N, d); fused where it can be.

    The fused Function runs in training (autograd on) with the ``fast`` or ``compile``
    implementation, the ``official`` constant, no attention dropout and no dispatch mode (MAC
    counters see the composed ops); everything else runs composed.
    """
    fused = (get_impl() != "reference" and dropout is None and constant == "official"
             and _needs_grad(q, k, v, conv_weight) and not dispatch_mode_active())
    if not fused:
        return castling_attention_composed(
            q, k, v, threshold=threshold, gate=gate, need_row_sums=need_row_sums, dropout=dropout, eps=eps,
            constant=constant, normalize_output=normalize_output, conv_weight=conv_weight, residual=residual)
    out, prenorm, branch_norm, row_sums, density = _CastlingTraining.apply(
        q, k, v, conv_weight, float(threshold), float(gate), float(eps), bool(normalize_output),
        bool(need_row_sums))
    if residual is not None:
        out = out + residual
    return CastlingOutput(out, prenorm, branch_norm, row_sums, density)


class _CastlingTraining(torch.autograd.Function):
    """The branch and the core in one node (see the module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, conv_weight, threshold: float, gate: float, eps: float, normalize_output: bool,
                need_row_sums: bool):
        q, k, v = (t.contiguous() for t in (q, k, v))
        sv, row_sums, density, branch = branch_forward(q, k, v, threshold, need_row_sums)
        out, prenorm, core = core_forward(q, k, v, sv, conv_weight, eps, normalize_output, extra_alpha=gate)
        branch_norm = sv.norm() * gate
        if row_sums is not None and gate != 1.0:
            row_sums.mul_(gate)
        ctx.mark_non_differentiable(prenorm, branch_norm, density)
        ctx.gate, ctx.eps, ctx.threshold, ctx.scale = gate, eps, branch.threshold, branch.scale
        ctx.kept = len(branch.kept)
        ctx.save_for_backward(k, branch.probs, *branch.kept, *core[:-1])   # k: the branch's, not k^
        return out, prenorm, branch_norm, row_sums, density

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, _grad_prenorm, _grad_branch_norm, grad_rows, _grad_density):
        k, probs, *rest = ctx.saved_tensors
        kept, core_tensors = tuple(rest[:ctx.kept]), rest[ctx.kept:]
        core = CoreSaved(*core_tensors, ctx.eps)
        needs = ctx.needs_input_grad
        grad_q, grad_k, grad_v, grad_y, grad_w = core_backward(core, grad, (True, True, True, needs[3]))
        branch = BranchSaved(core.q, k, core.v, probs, kept, ctx.threshold, ctx.scale)
        branch_backward(branch, grad_y, grad_rows, 2.0 * ctx.gate, (True, True, True),
                        into=(grad_q, grad_k, grad_v), rows_alpha=ctx.gate)
        return grad_q, grad_k, grad_v, grad_w, None, None, None, None, None
