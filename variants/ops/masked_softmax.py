"""Castling's auxiliary branch (docs/method.md, "The auxiliary branch"): S v, plain reference and fast path.

    A = softmax(q k^T / sqrt(d))  on the raw q, k          (B, h, N, N)
    S = gate * 1[A > threshold] * A                        (no gradient through the comparison)
    returns S v, and optionally the row sums of S (the L1 penalty) and the fraction of kept entries

- reference (:func:`masked_softmax_attention_naive`): autograd through softmax, a float mask and
  two products, as the official block writes it; also the only path with attention dropout.
- fast (:func:`masked_softmax_attention_fast`): one autograd Function over
  :func:`branch_forward` and :func:`branch_backward` (which Castling's fused training op,
  ``ops/castling.py``, also uses). Forward: the scores matmul with 1/sqrt(d) folded in, softmax
  in place, ``threshold`` (x if x > t else 0: the mask and the product in one op, no float
  mask), gate on the (N, d) result, not on the (N, N) matrix. Dense form: it keeps only A for
  the backward, which rebuilds S from A in the one (N, N) buffer it needs anyway and then
  writes dS, the mask's and the softmax's backward into it in place: one (N, N) buffer kept
  per layer and one per backward, against about six with autograd; six (N, N, d) matmuls in
  all. Sparse form (CPU, from 256 tokens, when at most 2.5 % of the entries pass the
  threshold, as is usual there): the kept entries found by a blockwise screen
  (:func:`_entries_above`), S as a CSR matrix, never dense, and three dense (N, N, d) matmuls
  in all (see :func:`_branch_backward_sparse`).

The implementation follows :func:`attnbench_variants.ops.set_impl` (``reference`` or not).
"""
from __future__ import annotations

import warnings
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from attnbench.torch_compat import softmax_inplace_
from attnbench_variants.ops import get_impl

__all__ = ["masked_softmax_attention", "masked_softmax_attention_naive", "masked_softmax_attention_fast",
           "BranchSaved", "branch_forward", "branch_backward"]


def masked_softmax_attention_naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, threshold: float,
                                   gate: float = 1.0, dropout: Optional[Callable] = None,
                                   need_row_sums: bool = False):
    """The reference: returns (S v, row sums of S or None, kept fraction) for q, k, v (B, h, N, d).

    ``dropout`` (e.g. the layer's ``attn_drop``) is applied to S, as the official block does.
    """
    attn = torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1), dim=-1)
    keep = (attn.detach() > threshold).to(attn.dtype)
    s = attn * keep * gate
    if dropout is not None:
        s = dropout(s)
    density = (s.detach() > 0).float().mean()
    return s @ v, (s.sum(dim=-1) if need_row_sums else None), density


def _softmax_(x: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim, in place on CPU (the kernel reads each row before writing it)."""
    return softmax_inplace_(x)


_SAME_SIZE_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _count_positive(x: torch.Tensor) -> torch.Tensor:
    """Non-zero entries of x >= 0 (no -0.0): on the bits as integers, twice as fast as on floats."""
    int_dtype = _SAME_SIZE_INT.get(x.element_size())
    return torch.count_nonzero(x.view(int_dtype) if int_dtype is not None and x.is_contiguous() else x)


#: The sparse form (CPU, float32/64) runs from this many tokens and up to this fraction of kept
#: entries; measured on a 2-core EPYC at 785 tokens: backward 52 vs 87 ms at 1 % kept, 78 vs 88
#: ms at 3 %, 140 vs 90 ms at 9 %.
SPARSE_MIN_TOKENS = 256
SPARSE_MAX_DENSITY = 0.025


#: Entries per block of the screening pass of :func:`_entries_above`.
SCREEN_BLOCK = 64


def _entries_above(x: torch.Tensor, threshold: float, limit: int) -> Optional[torch.Tensor]:
    """Sorted flat indices of the entries of contiguous ``x`` above ``threshold``, or None if more than ``limit``.

    ``torch.nonzero`` over the whole (B h N N) matrix costs about 1.6 ns an entry on CPU (12 ms
    at 785 tokens, more than the scores matmul), so one fast max per block of
    :data:`SCREEN_BLOCK` entries screens first, and nonzero runs on the few blocks that pass.
    """
    flat = x.view(-1)
    whole = flat.numel() // SCREEN_BLOCK * SCREEN_BLOCK
    blocks = flat[:whole].view(-1, SCREEN_BLOCK)
    hit = torch.nonzero(blocks.amax(dim=1) > threshold).squeeze(1)
    if hit.numel() > limit:                       # each passing block holds at least one entry
        return None
    local = torch.nonzero(blocks[hit] > threshold)
    tail = torch.nonzero(flat[whole:] > threshold).squeeze(1) + whole
    found = torch.cat([hit[local[:, 0]] * SCREEN_BLOCK + local[:, 1], tail])
    return None if found.numel() > limit else found


def _csr(crow, col, values, size):
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, col, values, (size, size))


class BranchSaved(NamedTuple):
    """What the branch's backward needs (see :func:`branch_forward`)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    probs: torch.Tensor                   # A, (B, h, N, N)
    kept: tuple                           # dense: () or (S,); sparse: (crow, cols, values, rows) of S
    threshold: float
    scale: float

    @property
    def sparse(self) -> bool:
        return len(self.kept) == 4


def branch_forward(q, k, v, threshold: float, need_row_sums: bool):
    """Forward of S v (gate 1): returns (S v, row sums of S or None, kept fraction, BranchSaved).

    q, k, v are (B, h, N, d) and contiguous. Dense form: keeps A, (N, N); the backward rebuilds
    S from it. Sparse form, when few entries pass the threshold: also S's kept entries as one
    block-diagonal (B h N, B h N) CSR matrix.
    """
    B, h, n, d = q.shape
    scale = d ** -0.5
    scores = torch.baddbmm(q.new_empty(B * h, n, n), q.view(-1, n, d), k.view(-1, n, d).transpose(1, 2),
                           beta=0.0, alpha=scale)      # 1/sqrt(d) folded into the matmul
    probs = _softmax_(scores).view(B, h, n, n)
    flat = None
    if q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64) and n >= SPARSE_MIN_TOKENS:
        flat = _entries_above(probs, threshold, int(SPARSE_MAX_DENSITY * probs.numel()))
    if flat is not None:   # the sparse form: S's kept entries only, never S dense
        density = torch.tensor(flat.numel() / probs.numel())
        rows = flat // n                              # global row in (B h N), sorted
        cols = flat % n + (rows // n) * n             # block-diagonal: same (b, head) block
        values = probs.view(-1)[flat]
        del flat
        crow = torch.zeros(B * h * n + 1, dtype=torch.int64, device=q.device)
        torch.cumsum(torch.bincount(rows, minlength=B * h * n), 0, out=crow[1:])
        sv = torch.sparse.mm(_csr(crow, cols, values, B * h * n), v.reshape(-1, d)).view(B, h, n, d)
        row_sums = torch.segment_reduce(values, "sum", offsets=crow).view(B, h, n) if need_row_sums else None
        saved = BranchSaved(q, k, v, probs, (crow, cols, values, rows), threshold, scale)
    else:
        s = F.threshold(probs, threshold, 0.0)        # A where A > threshold, else 0
        density = _count_positive(s) / s.numel()      # kept entries are > threshold > 0
        sv = s @ v
        row_sums = s.sum(dim=-1) if need_row_sums else None
        # Below SPARSE_MIN_TOKENS S is small and kept (the backward skips rebuilding it: 5% of a
        # Castling step at 197 tokens); above, the backward rebuilds it from A, in the one
        # (N, N) buffer it needs anyway, so that a layer holds one (N, N) matrix, not two.
        saved = BranchSaved(q, k, v, probs, (s,) if n < SPARSE_MIN_TOKENS else (), threshold, scale)
    return sv, row_sums, density, saved


def branch_backward(saved: BranchSaved, grad_sv: torch.Tensor, grad_rows: Optional[torch.Tensor],
                    alpha: float, needs: tuple[bool, bool, bool], into: Optional[tuple] = None,
                    rows_alpha: Optional[float] = None) -> tuple:
    """Gradients of q, k, v for the outputs ``alpha * S v`` and ``rows_alpha * row sums of S``.

    ``rows_alpha`` defaults to ``alpha``. ``into``: optional (grad_q, grad_k, grad_v) buffers,
    contiguous, that the gradients are added to in place (by the matmuls themselves in the
    dense form); else new tensors. Dense form: S (kept, or rebuilt from A), dv = alpha S^T g;
    then dS = alpha g v^T (in a rebuilt S's buffer), the mask's and the softmax's backward in place there,
    dq = dS k / sqrt(d), dk = dS^T q / sqrt(d). Sparse form: see :func:`_branch_backward_sparse`.
    """
    into = into or (None, None, None)
    rows_alpha = alpha if rows_alpha is None else rows_alpha
    if saved.sparse:
        grads = _branch_backward_sparse(saved, grad_sv, grad_rows, alpha, rows_alpha, needs)
        return tuple(g if acc is None or g is None else acc.add_(g) for g, acc in zip(grads, into))
    q, k, v, probs = saved.q, saved.k, saved.v, saved.probs
    B, h, n, d = q.shape
    g3 = grad_sv.reshape(-1, n, d)
    probs3, v3 = probs.view(-1, n, n), v.view(-1, n, d)
    if saved.kept:                                    # S kept by the forward: dS gets a new buffer
        s3, grad = saved.kept[0].view(-1, n, n), torch.empty_like(probs3)
    else:                                             # S rebuilt in the buffer that dS then reuses
        s3 = grad = F.threshold(probs3, saved.threshold, 0.0) if needs[2] else torch.empty_like(probs3)
    grad_v = _baddbmm_into(into[2], s3.transpose(1, 2), g3, alpha) if needs[2] else None
    grad_q = grad_k = None
    if needs[0] or needs[1]:   # dS into S's buffer, the backward's one (N, N) buffer
        torch.baddbmm(grad, g3, v3.transpose(1, 2), beta=0.0, alpha=alpha, out=grad)
        if grad_rows is not None:
            grad.add_(grad_rows.reshape(-1, n, 1), alpha=rows_alpha)
        # dA = dS on kept entries, 0 elsewhere; then the softmax backward; both in place
        torch.ops.aten.threshold_backward.grad_input(grad, probs3, saved.threshold, grad_input=grad)
        if grad.device.type == "cpu":
            torch.ops.aten._softmax_backward_data.out(grad, probs3, -1, probs.dtype, grad_input=grad)
        else:
            grad = torch.ops.aten._softmax_backward_data(grad, probs3, -1, probs.dtype)
        if needs[0]:
            grad_q = _baddbmm_into(into[0], grad, k.view(-1, n, d), saved.scale)
        if needs[1]:
            grad_k = _baddbmm_into(into[1], grad.transpose(1, 2), q.view(-1, n, d), saved.scale)
    return tuple(None if g is None else g.view(B, h, n, d) for g in (grad_q, grad_k, grad_v))


def _baddbmm_into(acc: Optional[torch.Tensor], a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """acc += alpha a b in place (acc viewed as a's batch), or alpha a b in a new tensor."""
    if acc is None:
        return torch.baddbmm(a.new_empty(a.shape[0], a.shape[1], b.shape[2]), a, b, beta=0.0, alpha=alpha)
    out = acc.view(a.shape[0], a.shape[1], b.shape[2])
    return torch.baddbmm(out, a, b, alpha=alpha, out=out)


def _branch_backward_sparse(saved: BranchSaved, grad_sv, grad_rows, alpha: float, rows_alpha: float,
                            needs) -> tuple:
    """The sparse form's backward: two dense (N, N) products instead of four, because
    dscores = A * dA - c A with dA zero off the mask and c = rowsum(A * dA), so
    dq = scale (T k - c (A k)), dk = scale (T^T q - A^T (c q)) with T = S * dS sparse.
    """
    q, k, v, probs = saved.q, saved.k, saved.v, saved.probs
    crow, cols, values, rows = saved.kept
    B, h, n, d = q.shape
    size = B * h * n
    g = (grad_sv * alpha if alpha != 1.0 else grad_sv).reshape(size, d)
    s = _csr(crow, cols, values, size)
    grad_v = torch.sparse.mm(s.t(), g).view(B, h, n, d) if needs[2] else None
    grad_q = grad_k = None
    if needs[0] or needs[1]:
        # dA on the kept entries only: alpha g_sv . v_j + rows_alpha g_rows
        d_kept = torch.sparse.sampled_addmm(s, g, v.reshape(size, d).t(), beta=0.0).values()
        if grad_rows is not None:
            d_kept = d_kept.add_(grad_rows.reshape(-1)[rows], alpha=rows_alpha)
        t_values = d_kept.mul_(values)                # T = A * dA on the kept entries
        c = torch.segment_reduce(t_values, "sum", offsets=crow).view(B, h, n, 1)
        t = _csr(crow, cols, t_values, size)
        if needs[0]:
            grad_q = torch.sparse.mm(t, k.reshape(size, d)).view(B, h, n, d)
            grad_q = grad_q.sub_(c * (probs @ k)).mul_(saved.scale)
        if needs[1]:
            grad_k = torch.sparse.mm(t.t(), q.reshape(size, d)).view(B, h, n, d)
            grad_k = grad_k.sub_(probs.transpose(-2, -1) @ (c * q)).mul_(saved.scale)
    return grad_q, grad_k, grad_v


class _MaskedSoftmaxAV(torch.autograd.Function):
    """S v (and row sums of S) with S = gate * 1[A > t] * A, A = softmax(q k^T / sqrt(d))."""

    @staticmethod
    def forward(ctx, q, k, v, threshold: float, gate: float, need_row_sums: bool):
        q, k, v = (t.contiguous() for t in (q, k, v))
        sv, row_sums, density, saved = branch_forward(q, k, v, threshold, need_row_sums)
        ctx.mark_non_differentiable(density)
        ctx.gate, ctx.sparse, ctx.branch = gate, saved.sparse, saved._replace(q=None, k=None, v=None, probs=None,
                                                                               kept=())
        ctx.save_for_backward(q, k, v, saved.probs, *saved.kept)
        if gate != 1.0:
            sv.mul_(gate)
            if row_sums is not None:
                row_sums.mul_(gate)
        return sv, row_sums, density

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_sv, grad_rows, _grad_density):
        q, k, v, probs, *kept = ctx.saved_tensors
        if grad_sv is None:
            grad_sv = torch.zeros_like(v)
        saved = ctx.branch._replace(q=q, k=k, v=v, probs=probs, kept=tuple(kept))
        grads = branch_backward(saved, grad_sv, grad_rows, ctx.gate, tuple(ctx.needs_input_grad[:3]))
        return (*grads, None, None, None)


def masked_softmax_attention_fast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, threshold: float,
                                  gate: float = 1.0, need_row_sums: bool = False):
    """As :func:`masked_softmax_attention_naive` without dropout, faster and leaner."""
    return _MaskedSoftmaxAV.apply(q, k, v, float(threshold), float(gate), bool(need_row_sums))


def masked_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, threshold: float,
                             gate: float = 1.0, dropout: Optional[Callable] = None, need_row_sums: bool = False):
    """(S v, row sums of S or None, kept fraction); the fast path unless ``reference`` or dropout is on."""
    if get_impl() == "reference" or dropout is not None:
        return masked_softmax_attention_naive(q, k, v, threshold=threshold, gate=gate, dropout=dropout,
                                              need_row_sums=need_row_sums)
    return masked_softmax_attention_fast(q, k, v, threshold=threshold, gate=gate, need_row_sums=need_row_sums)
