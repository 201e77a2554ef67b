"""The linear-angular attention core (docs/method.md, "Linear-angular attention"): plain reference and fast path.

Per head, on q, k, v of shape (B, h, N, d)::

    y   = 0.5 v + (1/pi) q^ (k^^T v)          (+ extra, e.g. Castling's S v)
    out = y / max(|y|, eps)                     (if normalize_output)
          + DWConv_tokens(v) or another residual (added after the normalisation)

with x^ = x / max(|x|, eps) per token (:func:`~attnbench_variants.ops.norms.normalize`: ``F.normalize``,
except that a vector at the floor passes no gradient; the official code has no eps). The
``faithful`` constant replaces y by (0.5 sum_n v_n + (1/pi) q^ (k^^T v)) / (0.5 N + (1/pi) q^ . sum_n k^_n).

Three implementations of the same numbers, chosen by :mod:`attnbench.kernels` (`ops.set_impl` /
``use_impl``) or the environment variable ``ATTNBENCH_OPS`` (default ``fast``):

- ``reference`` (:func:`linear_angular_naive`): the formula as written: k^ and q^ materialised,
  ``normalize`` three times, ``F.conv2d`` for the residual. Tests compare against it.
- ``fast`` (:func:`linear_angular_fast`): the same algebra in fewer passes over memory and
  fewer kernels: q^ G = diag(1/|q|) q G, so q^ is never built and 0.5 v + (1/pi) q^ G is one
  ``addcdiv`` of 2 y = v + (2/pi) (q G) / |q|, whose factor 2 cancels in the normalisation
  (with the floor 2 eps, exactly x / max(|x|, eps)); the norms are single reductions; the DWConv is K
  shifted multiply-adds straight into the output (``F.conv2d`` with a (K, 1) depthwise kernel
  is one of PyTorch's slowest CPU paths). Without autograd (inference) every step after k^
  writes into that one (B, h, N, d) buffer, which becomes the output. In training, the
  official constant runs one autograd Function with a hand-written backward
  (:func:`core_forward`, :func:`core_backward`; Castling's fused op uses them too); the
  faithful constant takes autograd through out-of-place steps where a backward needs the value.
- ``compile``: the fast path through ``torch.compile``, its DWConv written as a sum of shifted
  slices (:func:`_conv_shifted`) so that Inductor fuses the norms, the ``addcdiv``, the output
  normalisation and all K taps into one loop after each matmul: two passes over memory besides
  the matmuls. Shapes are static (a dynamic-shape kernel measured 20% slower), so each new shape
  compiles once (seconds), up to Dynamo's recompile limit, past which that shape runs eager. If
  compiling fails (no C compiler, unsupported backend) it warns once and runs ``fast``. The
  castled form on CPU (inference, official constant, float32 or bfloat16) runs the same two
  passes as hand-written C instead (:mod:`~attnbench_variants.ops.linear_angular_cpu`), which
  also writes the output in the order the heads merge in; if that does not build, it warns once
  and runs ``torch.compile``'s.

No Python loop over heads or tokens (the DWConv loops over its K taps).
"""
from __future__ import annotations

import math
import warnings
from typing import Literal, NamedTuple, Optional

import torch
import torch.nn.functional as F

from attnbench.torch_compat import dispatch_mode_active
from attnbench_variants.ops import IMPLS, get_impl, linear_angular_cpu, set_impl, use_impl
from attnbench_variants.ops.norms import normalize, stop_floored

__all__ = ["IMPLS", "get_impl", "set_impl", "use_impl", "linear_angular", "linear_angular_naive",
           "linear_angular_fast", "compile_fell_back", "dwconv_tokens", "add_dwconv_tokens_", "CoreSaved", "core_forward",
           "core_backward"]

Constant = Literal["official", "faithful"]


# --- the plain reference --------------------------------------------------------------------

def dwconv_tokens(v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Depthwise filter along tokens, one per head, shared over d: weight (h, 1, K, 1), zero padded."""
    return F.conv2d(v, weight, padding=(weight.shape[-2] // 2, 0), groups=weight.shape[0])


def linear_angular_naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, eps: float = 1e-6,
                         constant: Constant = "official", normalize_output: bool = True,
                         extra: Optional[torch.Tensor] = None, conv_weight: Optional[torch.Tensor] = None,
                         residual: Optional[torch.Tensor] = None, return_prenorm: bool = False):
    """The reference formulation, step by step as docs/method.md states it.

    Args:
        q, k, v: (B, h, N, d).
        eps: norm floor, x / max(|x|, eps) (:func:`~attnbench_variants.ops.norms.normalize`).
        constant: ``official`` (0.5 v) or ``faithful`` (0.5 sum v and the kernel row sum).
        normalize_output: divide y by its norm per token and head.
        extra: (B, h, N, d) added to y before the normalisation (Castling's S v).
        conv_weight: (h, 1, K, 1) DWConv along tokens on v, added after the normalisation.
        residual: any (B, h, N, d) tensor added after the normalisation.
        return_prenorm: also return |y| (Frobenius, detached) before the normalisation.

    Returns:
        out, or (out, |y|) with ``return_prenorm``.
    """
    q_hat = normalize(q, eps)
    k_hat = normalize(k, eps)
    context = k_hat.transpose(-2, -1) @ v                         # (B, h, d, d), no 1/N
    if constant == "official":
        y = 0.5 * v + (q_hat @ context) / math.pi
    else:
        numerator = 0.5 * v.sum(dim=-2, keepdim=True) + (q_hat @ context) / math.pi
        row_sum = 0.5 * v.shape[-2] + (q_hat @ k_hat.sum(dim=-2, keepdim=True).transpose(-2, -1)) / math.pi
        y = numerator / row_sum
    if extra is not None:
        y = y + extra
    prenorm = y.detach().norm() if return_prenorm else None
    if normalize_output:
        y = normalize(y, eps)
    if conv_weight is not None:
        y = y + dwconv_tokens(v, conv_weight)
    if residual is not None:
        y = y + residual
    return (y, prenorm) if return_prenorm else y


# --- the fast path -------------------------------------------------------------------------

def _norm_floor(x: torch.Tensor, floor: float, inplace: bool) -> torch.Tensor:
    """max(|x|, floor) over the last dim, keepdim (``F.normalize``'s denominator): one reduction pass."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return norm.clamp_min_(floor) if inplace else norm.clamp_min(floor)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _conv_taps_(out: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, skip_center: bool = False) -> torch.Tensor:
    """out += DWConv_tokens(v, weight) in place: K shifted multiply-adds, no padded copy of v."""
    size, n = weight.shape[-2], v.shape[-2]
    taps = weight.reshape(weight.shape[0], size, 1, 1)     # taps[:, t] is (h, 1, 1)
    for t in range(size):                                 # a loop over taps, not tokens
        shift = t - size // 2
        if shift == 0:
            if not skip_center:
                out.addcmul_(v, taps[:, t])
        elif 0 < shift < n:                               # out[i] += w_t v[i + shift]
            out[..., :n - shift, :].addcmul_(v[..., shift:, :], taps[:, t])
        elif 0 < -shift < n:
            out[..., -shift:, :].addcmul_(v[..., :n + shift, :], taps[:, t])
    return out


def _conv_taps(base: torch.Tensor, v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """base + DWConv_tokens(v, weight) in a new tensor (the centre tap writes it)."""
    centre = weight.reshape(weight.shape[0], -1, 1, 1)[:, weight.shape[-2] // 2]
    return _conv_taps_(torch.addcmul(base, v, centre), v, weight, skip_center=True)


def _conv_shifted(v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """DWConv_tokens(v, weight) as a sum of shifted slices of zero-padded v, with no in-place step:
    the form ``torch.compile`` fuses into one loop (the in-place taps become K scatters there)."""
    size, n = weight.shape[-2], v.shape[-2]
    padded = F.pad(v, (0, 0, size // 2, size // 2))
    taps = weight.reshape(weight.shape[0], size, 1, 1)
    out = taps[:, 0] * padded[..., :n, :]
    for t in range(1, size):
        out = out + taps[:, t] * padded[..., t:t + n, :]
    return out


def _conv_weight_grad(grad: torch.Tensor, v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """d loss / d weight of DWConv_tokens(v, weight) given its output gradient ``grad``.

    dw_t = sum over batch, tokens and d of grad[i] v[i + t - K//2]: per (batch, head), the K
    windows of zero-padded v at token offsets t, (K, N d) as one strided view, times grad as
    an (N d) vector: one ``bmm`` (3x faster than K dot products at 785 tokens).
    """
    B, h, n, d = v.shape
    size = weight.shape[-2]
    padded = F.pad(v, (0, 0, size // 2, size // 2)).reshape(B * h, -1)
    windows = padded.unfold(1, n * d, d)                  # (B h, K, N d), rows d apart
    dots = torch.bmm(windows, grad.reshape(B * h, n * d, 1))
    return dots.view(B, h, size).sum(dim=0).reshape(weight.shape)


class _AddDWConvTokens(torch.autograd.Function):
    """out += DWConv_tokens(v, weight) in place, with a backward of K shifted multiply-adds too.

    (Autograd through the in-place taps would record K CopySlices nodes, whose backward clones
    and zero-fills the gradient once per tap.)
    """

    @staticmethod
    def forward(ctx, out, v, weight):
        ctx.mark_dirty(out)
        ctx.save_for_backward(v, weight)
        return _conv_taps_(out, v, weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        v, weight = ctx.saved_tensors
        grad_v = grad_w = None
        if ctx.needs_input_grad[1]:   # the transposed filter: the same taps, mirrored
            grad_v = _conv_taps_(torch.zeros_like(v), grad.contiguous(), weight.flip(-2))
        if ctx.needs_input_grad[2]:
            grad_w = _conv_weight_grad(grad, v, weight)
        return grad, grad_v, grad_w


class CoreSaved(NamedTuple):
    """What the training core's backward needs (see :func:`core_forward`)."""

    q: torch.Tensor
    k_hat: torch.Tensor
    v: torch.Tensor
    context: torch.Tensor                 # G = k^^T v, (B, h, d, d)
    q_norm: torch.Tensor                  # max(|q|, eps), (B, h, N, 1)
    k_norm: torch.Tensor
    out: torch.Tensor                     # the output before the DWConv
    y_norm: Optional[torch.Tensor]        # max(|2 y|, 2 eps), or None without the normalisation
    conv_weight: Optional[torch.Tensor]
    eps: float


def core_forward(q, k, v, extra, conv_weight, eps: float, normalize_output: bool, extra_alpha: float = 1.0):
    """Forward of the official core, keeping what :func:`core_backward` needs.

    Returns (out, |y| before the normalisation, CoreSaved); ``extra_alpha * extra`` joins y.
    """
    c = 2.0 / math.pi
    k_norm = _norm_floor(k, eps, inplace=True)
    k_hat = k / k_norm
    context = k_hat.transpose(-2, -1) @ v
    q_norm = _norm_floor(q, eps, inplace=True)
    y = torch.addcdiv(v, q @ context, q_norm, value=c)   # 2 y
    if extra is not None:
        y.add_(extra, alpha=2.0 * extra_alpha)
    if normalize_output:
        y_norm = torch.linalg.vector_norm(y, dim=-1, keepdim=True)
        prenorm = y_norm.square().sum().sqrt() / 2.0
        out = y.div_(y_norm.clamp_min_(2.0 * eps))
    else:
        y_norm = None
        out = y.mul_(0.5)
        prenorm = out.norm()
    saved = CoreSaved(q, k_hat, v, context, q_norm, k_norm, out, y_norm, conv_weight, eps)
    if conv_weight is not None:
        out = _conv_taps(out, v, conv_weight)             # a new tensor: the saved one stays
    return out, prenorm, saved


def core_backward(saved: CoreSaved, grad: torch.Tensor, needs: tuple[bool, bool, bool, bool]) -> tuple:
    """(grad_q, grad_k, grad_v, grad_y, grad_w) with grad_y = d loss / d(2 y), so d extra = 2 grad_y.

    ``needs``: whether q, k, v, the conv weight need gradients (grad_y is always returned). With
    2 y = v + c (q G) / |q| (+ 2 extra), c = 2/pi, G = k^^T v, o = 2y / |2y|::

        grad_y = (g - o (o . g)) / |2y|
        dG = c q^^T grad_y           dv = grad_y + k^ dG (+ the DWConv's transposed taps)
        P = grad_y G^T               dq = (c / |q|) (P - q^ (q^ . P))
        P_k = v dG^T                 dk = (P_k - k^ (k^ . P_k)) / |k|

    where a row whose norm is floored at eps gets no gradient (``ops.norms.normalize``).
    """
    q, k_hat, v, context, q_norm, k_norm, out, y_norm, weight, eps = saved
    c = 2.0 / math.pi
    if y_norm is not None:
        along = torch.linalg.vecdot(out, grad).unsqueeze(-1).masked_fill_(y_norm <= 2.0 * eps, 0.0)
        grad_y = torch.addcmul(grad, out, along, value=-1.0).div_(y_norm).masked_fill_(y_norm <= 2.0 * eps, 0.0)
    else:
        grad_y = grad * 0.5
    q_hat = q / q_norm
    grad_context = (q_hat.transpose(-2, -1) @ grad_y).mul_(c)
    grad_q = grad_k = grad_v = grad_w = None
    if needs[0]:
        p = grad_y @ context.transpose(-2, -1)
        along = torch.linalg.vecdot(q_hat, p).unsqueeze(-1).masked_fill_(q_norm <= eps, 0.0)
        grad_q = torch.addcmul(p, q_hat, along, value=-1.0).mul_(c / q_norm).masked_fill_(q_norm <= eps, 0.0)
    if needs[1]:
        p = v @ grad_context.transpose(-2, -1)
        along = torch.linalg.vecdot(k_hat, p).unsqueeze(-1).masked_fill_(k_norm <= eps, 0.0)
        grad_k = torch.addcmul(p, k_hat, along, value=-1.0).div_(k_norm).masked_fill_(k_norm <= eps, 0.0)
    if needs[2]:
        grad_v = torch.matmul(k_hat, grad_context).add_(grad_y)
        if weight is not None:   # the transposed filter: the same taps, mirrored
            _conv_taps_(grad_v, grad, weight.flip(-2))
    if needs[3]:
        grad_w = _conv_weight_grad(grad, v, weight)
    return grad_q, grad_k, grad_v, grad_y, grad_w


class _LinearAngularTraining(torch.autograd.Function):
    """The training form of the official core, with a hand-written backward (:func:`core_backward`).

    Autograd through the fast forward records some forty elementwise nodes whose backward makes
    about five times the forward's passes over memory; this keeps k^, the (d, d) context, the two
    norms and the normalised output, and writes each input's gradient in a few passes.
    """

    @staticmethod
    def forward(ctx, q, k, v, extra, conv_weight, eps: float, normalize_output: bool):
        out, prenorm, saved = core_forward(q, k, v, extra, conv_weight, eps, normalize_output)
        ctx.mark_non_differentiable(prenorm)
        ctx.eps = eps
        ctx.save_for_backward(*saved[:-1])
        return out, prenorm

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, _grad_prenorm):
        saved = CoreSaved(*ctx.saved_tensors, ctx.eps)
        needs = ctx.needs_input_grad
        grad_q, grad_k, grad_v, grad_y, grad_w = core_backward(saved, grad, (*needs[:3], needs[4]))
        grad_extra = grad_y.mul_(2.0) if needs[3] else None
        return grad_q, grad_k, grad_v, grad_extra, grad_w, None, None


def add_dwconv_tokens_(out: torch.Tensor, v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """out += DWConv_tokens(v, weight), in place (differentiable): equal to ``out + dwconv_tokens(v, weight)``.

    ``out`` must not be needed by the backward of the op that made it.
    """
    if _needs_grad(out, v, weight):
        return _AddDWConvTokens.apply(out, v, weight)
    return _conv_taps_(out, v, weight)


ConvForm = Literal["taps", "conv2d", "shifted"]


def _fast(q, k, v, eps, constant, normalize_output, extra, conv_weight, residual, return_prenorm,
          inplace: bool, conv: ConvForm = "taps"):
    """The fast path. ``inplace`` (no autograd): k^'s buffer is reused for every later step.
    ``conv``: how the DWConv is added: ``taps`` (K multiply-adds in place, eager), ``conv2d``
    (what MAC counters can see) or ``shifted`` (no in-place step, for ``torch.compile``)."""
    c = 2.0 / math.pi
    k_norm = _norm_floor(k, eps, inplace)
    q_norm = _norm_floor(q, eps, inplace)
    if not inplace:   # rows at the norm floor pass no gradient (ops.norms)
        k, q = stop_floored(k, k_norm, eps), stop_floored(q, q_norm, eps)
    k_hat = k / k_norm                                    # the one (B, h, N, d) scratch
    context = k_hat.transpose(-2, -1) @ v                 # (B, h, d, d)
    if constant == "official":
        # 2 y = v + 2/pi (q (k^^T v)) / max(|q|, eps)
        if inplace:
            y = torch.addcdiv(v, torch.matmul(q, context, out=k_hat), q_norm, value=c, out=k_hat)
        else:
            y = torch.addcdiv(v, q @ context, q_norm, value=c)
        scale = 2.0                                       # y holds 2 y
    else:
        # y = (sum v + 2/pi (q (k^^T v)) / |q|) / (N + 2/pi (q . sum k^) / |q|)
        row_sum = (q @ k_hat.sum(dim=-2, keepdim=True).transpose(-2, -1)).div_(q_norm).mul_(c).add_(v.shape[-2])
        v_sum = v.sum(dim=-2, keepdim=True)
        if inplace:
            y = torch.addcdiv(v_sum, torch.matmul(q, context, out=k_hat), q_norm, value=c, out=k_hat).div_(row_sum)
        else:
            y = torch.addcdiv(v_sum, q @ context, q_norm, value=c) / row_sum
        scale = 1.0
    if extra is not None:
        y.add_(extra, alpha=scale)                        # add keeps nothing for backward: safe
    if normalize_output:
        norm = torch.linalg.vector_norm(y, dim=-1, keepdim=True)
        prenorm = norm.detach().square().sum().sqrt() / scale if return_prenorm else None
        # x / max(|x|, eps) == (s x) / max(|s x|, s eps)
        if inplace:
            out = y.div_(norm.clamp_min_(scale * eps))
        else:
            out = stop_floored(y, norm, scale * eps) / norm.clamp_min(scale * eps)
    else:
        prenorm = y.detach().norm() / scale if return_prenorm else None
        out = y.mul_(1.0 / scale) if scale != 1.0 else y
    # out is the fresh output of div/mul/addcdiv, whose backward does not need it: add in place.
    if conv_weight is not None:
        if conv == "taps":
            add_dwconv_tokens_(out, v, conv_weight)
        else:
            out = out + (dwconv_tokens if conv == "conv2d" else _conv_shifted)(v, conv_weight)
    if residual is not None:
        out.add_(residual)
    return out, prenorm


def linear_angular_fast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, eps: float = 1e-6,
                        constant: Constant = "official", normalize_output: bool = True,
                        extra: Optional[torch.Tensor] = None, conv_weight: Optional[torch.Tensor] = None,
                        residual: Optional[torch.Tensor] = None, return_prenorm: bool = False):
    """Same arguments and result as :func:`linear_angular_naive` (within float rounding), faster."""
    inplace = not _needs_grad(q, k, v, extra, conv_weight, residual)
    # Under a dispatch mode (torch's FlopCounterMode, ptflops' aten backend) the DWConv runs as
    # F.conv2d, so that MAC counters see its multiply-adds (the K shifted adds are elementwise).
    counted = dispatch_mode_active()
    if not inplace and not counted and constant == "official":
        out, prenorm = _LinearAngularTraining.apply(q, k, v, extra, conv_weight, float(eps), bool(normalize_output))
        if residual is not None:
            out = out + residual
        return (out, prenorm) if return_prenorm else out
    out, prenorm = _fast(q, k, v, eps, constant, normalize_output, extra, conv_weight, residual,
                         return_prenorm, inplace, "conv2d" if counted else "taps")
    return (out, prenorm) if return_prenorm else out


_compiled = None
_compile_failed = False


def compile_fell_back() -> bool:
    """Whether ``compile`` has failed in this process, so that it runs the eager ``fast`` path."""
    return _compile_failed


def _linear_angular_compiled(q, k, v, *, eps: float = 1e-6, constant: Constant = "official",
                             normalize_output: bool = True, extra=None, conv_weight=None, residual=None,
                             return_prenorm: bool = False):
    """The fast path under ``torch.compile``; falls back to eager ``fast`` (warning once) on failure."""
    global _compiled, _compile_failed
    args = (eps, constant, normalize_output, extra, conv_weight, residual, return_prenorm)
    counting = dispatch_mode_active()   # MAC counters see the eager ops; tracing (export) the torch ops
    if not (counting or torch.compiler.is_compiling()) and linear_angular_cpu.supports(
            q, k, v, constant=constant, extra=extra, residual=residual, conv_weight=conv_weight,
            return_prenorm=return_prenorm):
        out = linear_angular_cpu.linear_angular_cpu(q, k, v, eps=eps, normalize_output=normalize_output,
                                                    conv_weight=conv_weight)
        if out is not None:
            return out
    if not _compile_failed and not counting:
        try:
            if _compiled is None:
                _compiled = torch.compile(_fast, dynamic=False)
            out, prenorm = _compiled(q, k, v, *args, False, "shifted")
            return (out, prenorm) if return_prenorm else out
        except Exception as err:  # noqa: BLE001 - no C compiler, unsupported device or backend, ...
            _compile_failed = True
            first_line = str(err).splitlines()[0] if str(err) else ""
            warnings.warn(f"torch.compile of linear-angular attention failed ({type(err).__name__}: "
                          f"{first_line}); using the eager fast path", RuntimeWarning, stacklevel=3)
    return linear_angular_fast(q, k, v, eps=eps, constant=constant, normalize_output=normalize_output,
                               extra=extra, conv_weight=conv_weight, residual=residual,
                               return_prenorm=return_prenorm)


def linear_angular(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs):
    """Dispatch to the implementation chosen by :func:`attnbench.kernels.requested`."""
    impl = get_impl()
    if impl == "reference":
        return linear_angular_naive(q, k, v, **kwargs)
    if impl == "compile":
        return _linear_angular_compiled(q, k, v, **kwargs)
    return linear_angular_fast(q, k, v, **kwargs)
