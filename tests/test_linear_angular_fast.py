"""The fast linear-angular core and Castling's fast branch against their plain references (issue 9).

float32 throughout: outputs and input gradients within 1e-5 elementwise, weight gradients
within 1e-5 relative to their norm (see :func:`assert_grad_close`). The slow per-token references of
``tests/references.py`` check the module itself (test_variants.py); here the fast paths are
compared with the plain formulations they replace, on more shapes and edge cases.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from attnbench.registry import build_attention
from attnbench_variants.ops import IMPLS, get_impl, set_impl, use_impl
from attnbench_variants.ops import castling as cs
from attnbench_variants.ops import linear_angular as la
from attnbench_variants.ops import masked_softmax as ms

TOL = dict(rtol=1e-5, atol=1e-5)


def assert_grad_close(got, expected, name=""):
    """Within 1e-5, elementwise; for weights (sums over batch, tokens and d, whose float32
    rounding alone moves single entries by ~1e-5) within 1e-5 of the gradient's norm."""
    if name in ("conv_weight",) or name.startswith(("qkv.", "proj.", "dconv.")):
        error = torch.linalg.vector_norm(got - expected).item()
        assert error <= 1e-5 * max(1.0, torch.linalg.vector_norm(expected).item()), f"grad of {name}: {error}"
    else:
        torch.testing.assert_close(got, expected, **TOL, msg=lambda m: f"grad of {name}: {m}")


def _qkv(shape, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).requires_grad_(requires_grad) for _ in range(3)]


def _grads_of(fn, inputs, seed=1):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    (out * weight).sum().backward()
    return out.detach(), [t.grad for t in inputs]


# ------------------------------------------------------------------------ the core, functions

CORE_OPTIONS = [
    {},
    {"constant": "faithful"},
    {"normalize_output": False},
    {"constant": "faithful", "normalize_output": False},
    {"eps": 1e-3},
]


@pytest.mark.parametrize("shape", [(2, 3, 1, 8), (1, 2, 2, 4), (2, 3, 17, 16), (1, 3, 197, 64)])
@pytest.mark.parametrize("options", CORE_OPTIONS, ids=str)
@pytest.mark.parametrize("conv", [False, True], ids=["no-conv", "dwconv"])
@pytest.mark.parametrize("extra", [False, True], ids=["", "extra"])
def test_fast_core_matches_reference_forward_and_backward(shape, options, conv, extra):
    q, k, v = _qkv(shape)
    inputs = [q, k, v]
    names = ["q", "k", "v"]
    if conv:
        inputs.append(0.3 * torch.randn(shape[1], 1, 9, 1, generator=torch.Generator().manual_seed(5)))
        names.append("conv_weight")
    if extra:
        inputs.append(0.5 * torch.randn(shape, generator=torch.Generator().manual_seed(6)))
        names.append("extra")

    def call(fn):
        def run(q, k, v, *rest):
            kw = dict(zip(names[3:], rest))
            return fn(q, k, v, **options, **kw)
        return run

    out_fast, grads_fast = _grads_of(call(la.linear_angular_fast), inputs)
    out_ref, grads_ref = _grads_of(call(la.linear_angular_naive), inputs)
    torch.testing.assert_close(out_fast, out_ref, **TOL)
    for name, g_fast, g_ref in zip(names, grads_fast, grads_ref):
        assert_grad_close(g_fast, g_ref, name)
    with torch.inference_mode():  # the in-place path
        torch.testing.assert_close(call(la.linear_angular_fast)(*inputs), out_ref, **TOL)


def test_fast_core_does_not_modify_its_inputs():
    q, k, v = _qkv((2, 3, 33, 16))
    extra, weight = torch.randn(2, 3, 33, 16), torch.randn(3, 1, 9, 1)
    before = [t.clone() for t in (q, k, v, extra, weight)]
    for options in CORE_OPTIONS:
        with torch.inference_mode():
            la.linear_angular_fast(q, k, v, extra=extra, conv_weight=weight, **options)
    for t, b in zip((q, k, v, extra, weight), before):
        assert torch.equal(t, b)


def test_zero_tokens_give_no_nan():
    q, k, v = _qkv((1, 2, 12, 8))
    q.data[:, :, 0] = 0
    k.data[:, :, 3] = 0
    v.data[:, :, 5] = 0
    q.data[:, :, 5] = 0
    weight = torch.randn(2, 1, 9, 1)
    for options in CORE_OPTIONS:
        def run(fn, options=options):
            return lambda q, k, v, w: fn(q, k, v, conv_weight=w, **options)
        out_fast, grads_fast = _grads_of(run(la.linear_angular_fast), [q, k, v, weight])
        out_ref, grads_ref = _grads_of(run(la.linear_angular_naive), [q, k, v, weight])
        assert torch.isfinite(out_fast).all() and all(torch.isfinite(g).all() for g in grads_fast)
        torch.testing.assert_close(out_fast, out_ref, **TOL)
        for g_fast, g_ref in zip(grads_fast, grads_ref):
            # at an exactly zero q or k the gradient is scaled by 1/eps = 1e6: relative tolerance
            torch.testing.assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-5)
    # an all-zero input: output 0 + conv(0) = 0, not NaN
    zeros = torch.zeros(1, 2, 5, 8)
    with torch.inference_mode():
        assert torch.equal(la.linear_angular_fast(zeros, zeros, zeros, conv_weight=weight), zeros)


@pytest.mark.parametrize("size", [1, 3, 9])
@pytest.mark.parametrize("tokens", [1, 2, 4, 5, 30])
def test_in_place_token_conv_equals_conv2d(size, tokens):
    v = torch.randn(2, 3, tokens, 8)
    weight = torch.randn(3, 1, size, 1)
    base = torch.randn(2, 3, tokens, 8)
    expected, (g_base, g_v, g_w) = _grads_of(lambda b, v, w: b + la.dwconv_tokens(v, w), [base, v, weight])
    got, (h_base, h_v, h_w) = _grads_of(lambda b, v, w: la.add_dwconv_tokens_(b * 1.0, v, w), [base, v, weight])
    torch.testing.assert_close(got, expected, **TOL)
    for name, a, b in (("base", h_base, g_base), ("v", h_v, g_v), ("conv_weight", h_w, g_w)):
        assert_grad_close(a, b, name)


# ------------------------------------------------------------------------- the layers

DIM, HEADS = 48, 3


def _layer_grads(name, options, x, impl, progress=0.3, train=True):
    torch.manual_seed(0)
    layer = build_attention(name, DIM, HEADS, qkv_bias=True, **options)
    with torch.no_grad():  # non-trivial conv weights, so the residual shows up
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    layer.train(train)
    layer.set_progress(progress)
    x = x.clone().requires_grad_(True)
    with use_impl(impl):
        y = layer(x)
        loss = (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(2))).sum() + layer.regularization()
    grads = torch.autograd.grad(loss, [x, *layer.parameters()])
    return layer, y.detach(), dict(zip(["x"] + [n for n, _ in layer.named_parameters()], grads))


LAYER_CASES = [
    ("linear-angular", {"residual": "none"}),
    ("linear-angular", {"residual": "dwconv"}),
    ("linear-angular", {"residual": "dwconv2d"}),
    ("linear-angular", {"constant": "faithful"}),
    ("linear-angular", {"normalize_output": False}),
    ("castling", {}),                                            # branch on: the training form
    ("castling", {"mask_schedule": "gate_cosine"}),              # gate < 1
    ("castling", {"mask_schedule": "l1_ramp", "threshold": 0.01}),  # penalty through the row sums
    ("castling", {"residual": "dwconv2d", "constant": "faithful"}),
    ("castling-no-norm", {}),
]


@pytest.mark.parametrize("tokens", [1, 17, 50])   # 17, 50: a class token + a square grid
@pytest.mark.parametrize("name,options", LAYER_CASES, ids=[f"{n}-{o}" for n, o in LAYER_CASES])
def test_layer_fast_matches_reference_forward_and_backward(name, options, tokens):
    x = torch.randn(2, tokens, DIM, generator=torch.Generator().manual_seed(1))
    fast, y_fast, g_fast = _layer_grads(name, options, x, "fast")
    ref, y_ref, g_ref = _layer_grads(name, options, x, "reference")
    torch.testing.assert_close(y_fast, y_ref, **TOL)
    for pname in g_ref:
        assert_grad_close(g_fast[pname], g_ref[pname], pname)
    torch.testing.assert_close(fast.regularization(), ref.regularization(), **TOL)
    stats_fast, stats_ref = fast.diagnostics(), ref.diagnostics()
    assert stats_fast.keys() == stats_ref.keys()
    for key in stats_ref:
        assert math.isclose(stats_fast[key], stats_ref[key], rel_tol=1e-5, abs_tol=1e-6), key


@pytest.mark.parametrize("name", ["linear-angular", "castling"])
def test_inference_mode_fast_matches_reference(name):
    torch.manual_seed(0)
    layer = build_attention(name, DIM, HEADS).eval()
    with torch.no_grad():
        layer.dconv.weight.normal_()
    x = torch.randn(3, 65, DIM)
    for castled in (False, True):
        if castled:
            layer.castle()
        with torch.inference_mode():
            y_fast = layer(x)
            with use_impl("reference"):
                y_ref = layer(x)
        torch.testing.assert_close(y_fast, y_ref, **TOL)


BRANCH_FORMS = {  # (SPARSE_MIN_TOKENS, SPARSE_MAX_DENSITY)
    "dense": (10 ** 9, 1.0),         # small N: S kept for the backward
    "dense-rebuilt": (1, 0.0),       # large N, too many entries pass: S rebuilt from A
    "sparse": (1, 1.0),
}


def _use_branch_form(monkeypatch, form):
    min_tokens, max_density = BRANCH_FORMS[form]
    monkeypatch.setattr(ms, "SPARSE_MIN_TOKENS", min_tokens)
    monkeypatch.setattr(ms, "SPARSE_MAX_DENSITY", max_density)


@pytest.mark.parametrize("size", [1, 63, 64, 1000, 4099])
def test_screened_entries_equal_nonzero(size):
    """The blockwise screen finds exactly nonzero's entries, the tail past the last block too."""
    x = torch.rand(size, generator=torch.Generator().manual_seed(size))
    expected = torch.nonzero(x > 0.97).squeeze(1)
    torch.testing.assert_close(ms._entries_above(x, 0.97, limit=size), expected)
    if expected.numel():
        assert ms._entries_above(x, 0.97, limit=expected.numel() - 1) is None


@pytest.mark.parametrize("form", list(BRANCH_FORMS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_castling_branch_fast_matches_reference_with_gate_and_row_sums(form, dtype, monkeypatch):
    _use_branch_form(monkeypatch, form)
    q, k, v = [t.to(dtype) for t in _qkv((2, 3, 40, 16))]
    q.data *= 2  # peakier softmax: some entries pass the threshold

    def run(fn, which):
        def f(q, k, v):
            sv, rows, density = fn(q, k, v, threshold=0.03, gate=0.7, need_row_sums=True)
            run.density[which] = float(density)
            return torch.cat([sv, rows.unsqueeze(-1)], dim=-1)
        return f

    run.density = {}
    out_fast, grads_fast = _grads_of(run(ms.masked_softmax_attention_fast, "fast"), [q, k, v])
    out_ref, grads_ref = _grads_of(run(ms.masked_softmax_attention_naive, "ref"), [q, k, v])
    torch.testing.assert_close(out_fast, out_ref, **TOL)
    for name, g_fast, g_ref in zip("qkv", grads_fast, grads_ref):
        assert_grad_close(g_fast, g_ref, name)
    assert 0 < run.density["fast"] < 1 and run.density["fast"] == pytest.approx(run.density["ref"])


def test_castling_branch_takes_the_sparse_form_when_few_entries_pass():
    q, k, v = _qkv((1, 2, 300, 16), requires_grad=True)
    sv, _, density = ms.masked_softmax_attention_fast(q, k, v, threshold=0.02)
    assert 0 < float(density) <= ms.SPARSE_MAX_DENSITY
    assert sv.grad_fn.sparse, "the sparse form was not taken"

    def run(fn):  # many rows keep nothing: their row sums must be 0
        def f(q, k, v):
            sv, rows, _ = fn(q, k, v, threshold=0.02, gate=0.6, need_row_sums=True)
            assert (rows == 0).any()
            return torch.cat([sv, rows.unsqueeze(-1)], dim=-1)
        return f

    out_ref, grads_ref = _grads_of(run(ms.masked_softmax_attention_naive), [q, k, v])
    out_fast, grads_fast = _grads_of(run(ms.masked_softmax_attention_fast), [q, k, v])
    torch.testing.assert_close(out_fast, out_ref, **TOL)
    for name, a, b in zip("qkv", grads_fast, grads_ref):
        assert_grad_close(a, b, name)


# ------------------------------------------------------- Castling's fused training op

FUSED_CASES = [
    dict(gate=1.0, need_row_sums=False, normalize_output=True, conv=True),
    dict(gate=0.6, need_row_sums=True, normalize_output=True, conv=True),
    dict(gate=0.3, need_row_sums=True, normalize_output=False, conv=False),
]


@pytest.mark.parametrize("form", list(BRANCH_FORMS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", FUSED_CASES, ids=str)
def test_fused_castling_matches_the_composed_reference(form, dtype, case, monkeypatch):
    """One Function (branch + core, gradients added into each other) against the plain ops step by step."""
    _use_branch_form(monkeypatch, form)
    case = dict(case)
    conv = case.pop("conv")
    # q, k, v as a layer makes them: non-contiguous views of one qkv tensor
    qkv = torch.randn(2, 40, 3, 3, 16, generator=torch.Generator().manual_seed(3), dtype=dtype)
    qkv[:, :, 0] *= 2                       # peakier softmax: some entries pass the threshold
    qkv[:, 5, 0, 1] = 0                     # a zero query and a zero key: the eps floors
    qkv[:, 7, 1, 2] = 0
    weight = 0.3 * torch.randn(3, 1, 9, 1, generator=torch.Generator().manual_seed(4), dtype=dtype)

    def run(impl):
        def f(qkv, weight):
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            with use_impl(impl):
                result = cs.castling_attention(q, k, v, threshold=0.03, conv_weight=weight if conv else None,
                                               **case)
            assert (type(result.out.grad_fn).__name__ == "_CastlingTrainingBackward") == (impl == "fast")
            run.stats[impl] = (float(result.prenorm), float(result.branch_norm), float(result.density))
            rows = result.row_sums if result.row_sums is not None else torch.zeros(result.out.shape[:-1], dtype=dtype)
            return torch.cat([result.out, rows.unsqueeze(-1)], dim=-1)
        return f

    run.stats = {}
    out_fast, grads_fast = _grads_of(run("fast"), [qkv, weight])
    out_ref, grads_ref = _grads_of(run("reference"), [qkv, weight])
    torch.testing.assert_close(out_fast, out_ref, **TOL)
    # at the zero key the gradient is scaled by 1/eps = 1e6: relative tolerance there, as in test_zero_tokens_give_no_nan
    torch.testing.assert_close(grads_fast[0], grads_ref[0], rtol=1e-4, atol=1e-5)
    if conv:
        assert_grad_close(grads_fast[1], grads_ref[1], "conv_weight")
    for fast, ref in zip(run.stats["fast"], run.stats["reference"]):
        assert math.isclose(fast, ref, rel_tol=1e-5, abs_tol=1e-6)
    assert 0 < run.stats["fast"][2] < 1


def test_fused_castling_is_composed_where_it_cannot_fuse():
    q, k, v = _qkv((1, 3, 20, 8), requires_grad=True)
    weight = torch.randn(3, 1, 9, 1)
    fused = cs.castling_attention(q, k, v, threshold=0.02, conv_weight=weight)
    assert type(fused.out.grad_fn).__name__ == "_CastlingTrainingBackward"
    for kwargs in ({"constant": "faithful"}, {"dropout": torch.nn.Dropout(0.0)}):
        out = cs.castling_attention(q, k, v, threshold=0.02, conv_weight=weight, **kwargs).out
        assert type(out.grad_fn).__name__ != "_CastlingTrainingBackward", kwargs
    with torch.no_grad():                    # no autograd: the in-place inference ops
        torch.testing.assert_close(cs.castling_attention(q, k, v, threshold=0.02, conv_weight=weight).out,
                                   fused.out.detach(), **TOL)


def test_fused_castling_backward_twice_gives_the_same_gradients():
    """The backward writes into buffers of its own, never into what it saved: retain_graph works."""
    q, k, v = _qkv((1, 3, 20, 8), requires_grad=True)
    out = cs.castling_attention(q, k, v, threshold=0.02).out
    out.sum().backward(retain_graph=True)
    first = q.grad.clone()
    q.grad = None
    out.sum().backward()
    torch.testing.assert_close(q.grad, first)


def test_castling_dropout_uses_the_reference_branch():
    torch.manual_seed(0)
    layer = build_attention("castling", DIM, HEADS, attn_drop=0.5).train()
    layer(torch.randn(2, 17, DIM))  # runs (dropout on S), and the fast branch is not used for it
    assert 0 < layer.diagnostics()["mask_density"] <= 1


# ----------------------------------------------------------------------------- switches

def test_impl_switch():
    assert get_impl() in IMPLS
    with pytest.raises(ValueError, match="unknown"):
        set_impl("bogus")
    before = get_impl()
    with use_impl("reference"):
        assert get_impl() == "reference"
    assert get_impl() == before


def test_compile_failure_falls_back_to_eager(monkeypatch):
    def broken_compile(*args, **kwargs):
        raise RuntimeError("no C compiler here")

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(la, "_compiled", None)
    monkeypatch.setattr(la, "_compile_failed", False)
    monkeypatch.setattr(la.linear_angular_cpu, "supports", lambda *args, **kwargs: False)   # not the C core
    q, k, v = _qkv((1, 2, 9, 8))
    with use_impl("compile"), pytest.warns(RuntimeWarning, match="using the eager fast path"):
        out = la.linear_angular(q, k, v)
    torch.testing.assert_close(out, la.linear_angular_naive(q, k, v), **TOL)
    with use_impl("compile"), warnings.catch_warnings():
        warnings.simplefilter("error")      # warned once only
        la.linear_angular(q, k, v)


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_compiled_core_matches_reference_forward_and_backward(grad, monkeypatch):
    """The compiled path really compiles here (a fallback warning fails the test) and agrees."""
    monkeypatch.setattr(la, "_compiled", None)
    monkeypatch.setattr(la, "_compile_failed", False)
    q, k, v = _qkv((2, 3, 17, 16), seed=4)
    weight = 0.3 * torch.randn(3, 1, 9, 1, generator=torch.Generator().manual_seed(5))
    extra = torch.randn(2, 3, 17, 16, generator=torch.Generator().manual_seed(6))

    def core(impl):
        def run(q, k, v):
            with use_impl(impl):
                return la.linear_angular(q, k, v, extra=extra, conv_weight=weight)
        return run

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        if grad:
            out, grads = _grads_of(core("compile"), (q, k, v))
        else:
            with torch.inference_mode():
                out = core("compile")(q, k, v)
    assert la._compiled is not None and not la._compile_failed
    expected, expected_grads = _grads_of(core("reference"), (q, k, v))
    torch.testing.assert_close(out, expected, **TOL)
    if grad:
        for name, got, want in zip("qkv", grads, expected_grads):
            assert_grad_close(got, want, name)


# ------------------------------------------------------------------------- coarse speed

@pytest.mark.perf
def test_fast_core_is_faster_than_the_reference_at_3137_tokens():
    """One process, interleaved, a coarse ratio (measured 5-12x with the DWConv): never absolute times."""
    from attnbench.measure import time_interleaved

    q, k, v = _qkv((2, 3, 3137, 64))
    weight = torch.randn(3, 1, 9, 1)
    times = time_interleaved({
        "fast": (lambda q, k, v: la.linear_angular_fast(q, k, v, conv_weight=weight), (q, k, v)),
        "reference": (lambda q, k, v: la.linear_angular_naive(q, k, v, conv_weight=weight), (q, k, v)),
    }, threads=1, warmup=1, repeats=5, min_block_ms=5)   # 1 thread: 2 threads on shared cores swing 10x
    assert times["fast"].median_ms < times["reference"].median_ms
