"""The castled linear-angular core in hand-written C (ops/linear_angular_cpu) against the plain reference.

Inference only, float32 and bfloat16, with the DWConv of several widths or none, with and without
the output normalisation, head widths on the AVX-512 path (multiples of 16) and off it, inputs
strided as the qkv projection leaves them and not. float32 within 1e-5 elementwise; bfloat16
within the conformance suite's normwise tolerance of the float64 reference of the same (rounded)
inputs. Each test checks that the C core really ran (its output has the (B, N, h, d) memory order
that only it writes), so a build failure fails the test instead of passing on the fallback.
"""
from __future__ import annotations

import math
import subprocess
import sys
import warnings

import pytest
import references
import torch

from attnbench import native
from attnbench.registry import build_attention
from attnbench.testing import HALF_PRECISION_TOLERANCE, half_precision_error
from attnbench_variants.ops import linear_angular as la
from attnbench_variants.ops import linear_angular_cpu as lc
from attnbench_variants.ops import use_impl


def _qkv(batch, heads, tokens, width, dtype, layout="projection", seed=0):
    """q, k, v as views of one (B, N, 3, h, d) tensor, as the layer's qkv split leaves them, or contiguous."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, tokens, 3, heads, width, generator=g).to(dtype).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    if layout == "contiguous":
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    elif layout == "mixed":   # strides differ between q and k: the C core copies them first
        q = q.contiguous()
    return q, k, v


def _assert_close(out, expected, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    else:
        error = half_precision_error(out, expected)
        assert error <= HALF_PRECISION_TOLERANCE[dtype], error


def _ran_the_c_core(out: torch.Tensor) -> bool:
    B, H, N, D = out.shape
    return lc.build_failed() is None and out.stride() == (N * H * D, D, H * D, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("taps", [9, 3, 1, None], ids=lambda t: f"taps{t}")
@pytest.mark.parametrize("normalize_output", [True, False], ids=["norm", "no-norm"])
@pytest.mark.parametrize("tokens", [1, 5, 40, 197])
def test_c_core_matches_the_reference(dtype, taps, normalize_output, tokens):
    q, k, v = _qkv(2, 3, tokens, 64, dtype, seed=tokens)
    weight = None if taps is None else 0.3 * torch.randn(3, 1, taps, 1, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode(), use_impl("compile"):
        out = la.linear_angular(q, k, v, conv_weight=weight, normalize_output=normalize_output)
    assert out.dtype == dtype and out.shape == q.shape and _ran_the_c_core(out)
    rounded = None if weight is None else weight.to(dtype).double()     # the taps are rounded as the inputs are
    expected = la.linear_angular_naive(q.double(), k.double(), v.double(), conv_weight=rounded,
                                       normalize_output=normalize_output)
    _assert_close(out, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("width", [16, 24, 64, 128], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("layout", ["projection", "contiguous", "mixed"])
def test_c_core_matches_the_reference_for_any_head_width_and_layout(dtype, width, layout):
    """Widths off the AVX-512 path (24) run the plain C loops; every layout gives the same numbers."""
    q, k, v = _qkv(2, 2, 33, width, dtype, layout, seed=width)
    weight = 0.3 * torch.randn(2, 1, 9, 1, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), use_impl("compile"):
        out = la.linear_angular(q, k, v, conv_weight=weight)
    assert _ran_the_c_core(out)
    expected = la.linear_angular_naive(q.double(), k.double(), v.double(), conv_weight=weight.to(dtype).double())
    _assert_close(out, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_c_core_floors_zero_tokens_and_stays_finite_with_a_large_one(dtype):
    q, k, v = _qkv(1, 3, 17, 64, dtype, "contiguous", seed=3)
    q[0, :, 2], k[0, :, 4], v[0, :, 6] = 0.0, 0.0, 0.0
    q[0, :, 8] *= 300.0
    k[0, :, 8] *= 300.0
    weight = 0.3 * torch.randn(3, 1, 9, 1, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode(), use_impl("compile"):
        out = la.linear_angular(q, k, v, conv_weight=weight)
    assert _ran_the_c_core(out) and torch.isfinite(out).all()
    expected = la.linear_angular_naive(q.double(), k.double(), v.double(), conv_weight=weight.to(dtype).double())
    _assert_close(out, expected, dtype)


def test_c_core_is_for_inference_and_the_official_constant_only():
    q, k, v = _qkv(1, 2, 9, 16, torch.float32, "contiguous")
    options = dict(constant="official", extra=None, residual=None, conv_weight=None, return_prenorm=False)
    with torch.no_grad():
        assert lc.supports(q, k, v, **options)
        for change in (dict(constant="faithful"), dict(extra=q), dict(residual=q), dict(return_prenorm=True)):
            assert not lc.supports(q, k, v, **{**options, **change}), change
        assert not lc.supports(q.double(), k.double(), v.double(), **options)
        assert not lc.supports(q.half(), k.half(), v.half(), **options)
    assert not lc.supports(q.requires_grad_(), k, v, **options)    # training: the autograd paths
    assert lc.supports(q.detach(), k, v, **options)                # a gradient nobody asks for: inference


@pytest.mark.parametrize("name", ["castling", "linear-angular", "castling-no-dwconv", "castling-no-norm"])
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_castled_layer_runs_the_c_core_and_matches_the_per_token_reference(name, precision):
    """The whole castled layer (under bfloat16 autocast as ``bench --dtype`` runs it) against the
    slow per-token reference of tests/references.py in float64."""
    torch.manual_seed(0)
    layer = build_attention(name, 64, 2).eval().castle()
    if layer.dconv is not None:
        torch.nn.init.normal_(layer.dconv.weight, std=0.3)
    x = torch.randn(2, 17, 64)
    calls = []
    original = lc.linear_angular_cpu

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch, torch.inference_mode(), use_impl("compile"):
        patch.setattr(lc, "linear_angular_cpu", counted)
        if precision == "bfloat16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = layer(x)
        else:
            out = layer(x)
    assert calls == [1] and out.dtype == getattr(torch, precision)
    with torch.no_grad():
        expected = references.linear_angular(layer.double(), x.double())   # castled: no branch
    if precision == "float32":
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    else:
        assert half_precision_error(out, expected) <= HALF_PRECISION_TOLERANCE[torch.bfloat16]


def test_a_c_core_that_does_not_build_warns_once_and_runs_torch_compile(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNBENCH_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(lc, "_libraries", {})
    monkeypatch.setattr(lc, "_failure", None)
    q, k, v = _qkv(1, 2, 9, 16, torch.float32)
    with torch.inference_mode(), use_impl("compile"):
        with pytest.warns(RuntimeWarning, match="did not build .*no C compiler.*using torch.compile's"):
            out = la.linear_angular(q, k, v)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            again = la.linear_angular(q, k, v)
    assert "\n" not in lc.build_failed() and "no-such-compiler" in lc.build_failed()
    assert out.is_contiguous() and torch.equal(out, again)    # torch.compile's layout, not the C core's
    torch.testing.assert_close(out, la.linear_angular_naive(q, k, v), rtol=1e-5, atol=1e-5)
    assert list(tmp_path.iterdir()) == []


def test_load_library_builds_once_per_machine_and_says_why_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNBENCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_loaded", {})
    source = tmp_path / "answer.c"
    source.write_text("int answer(void) { return ANSWER; }\n")
    assert native.load_library(source, {"ANSWER": 42}).answer() == 42
    built = sorted((tmp_path / "cache").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"             # no partial file left beside it
    monkeypatch.setattr(native, "_loaded", {})                      # a new process: the cached file, not a build
    stamp = built[0].stat().st_mtime_ns
    assert native.load_library(source, {"ANSWER": 42}).answer() == 42
    assert built[0].stat().st_mtime_ns == stamp
    assert native.load_library(source, {"ANSWER": 7}).answer() == 7  # other constants: another library
    source.write_text("int answer(void) { return ANSWER + ; }\n")
    with pytest.raises(native.NativeBuildError) as caught:
        native.load_library(source, {"ANSWER": 1})
    message = str(caught.value)
    assert "\n" not in message and "could not build answer.c" in message and "error" in message
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_c_core_gives_the_same_numbers_on_any_thread_count():
    """Work is split by (batch, head, token block), never within a row: 1 thread or many, bit for bit."""
    q, k, v = _qkv(2, 3, 197, 64, torch.bfloat16, seed=7)
    weight = 0.3 * torch.randn(3, 1, 9, 1, generator=torch.Generator().manual_seed(8))
    threads = torch.get_num_threads()
    with torch.inference_mode(), use_impl("compile"):
        many = la.linear_angular(q, k, v, conv_weight=weight)
        torch.set_num_threads(1)
        try:
            one = la.linear_angular(q, k, v, conv_weight=weight)
        finally:
            torch.set_num_threads(threads)
    assert _ran_the_c_core(many) and torch.equal(many, one)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_c_core_brings_no_second_openmp_runtime():
    """In a fresh process: the OpenMP runtimes loaded are the same before and after the C core
    first runs (its libgomp.so.1 is the one torch loaded, not the system's beside it)."""
    probe = (
        "import torch\n"
        "from attnbench_variants.ops import linear_angular_cpu as lc\n"
        "def runtimes():\n"
        "    return sorted({l.split()[-1] for l in open('/proc/self/maps') if 'gomp' in l})\n"
        "before = runtimes()\n"
        "q = torch.randn(1, 2, 9, 16)\n"
        "with torch.inference_mode():\n"
        "    out = lc.linear_angular_cpu(q, q, q)\n"
        "assert out is not None, lc.build_failed()\n"
        "print(before == runtimes(), before, runtimes())\n")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("True"), run.stdout


def test_c_core_constant_is_two_over_pi():
    """The C core is called with c = 2/pi (2 y = v + c q^ G): a wrong constant would still pass a
    loose test at large |v|, so check one token by hand."""
    q = torch.tensor([[[[3.0, 4.0]]]])
    k = torch.tensor([[[[0.0, 2.0]]]])
    v = torch.tensor([[[[1.0, 0.0]]]])
    with torch.inference_mode():
        out = lc.linear_angular_cpu(q, k, v, normalize_output=False)
    # k^ = (0, 1), G = k^^T v = [[0, 0], [1, 0]], q^ = (0.6, 0.8), q^ G = (0.8, 0); y = 0.5 v + q^ G / pi
    assert torch.allclose(out[0, 0, 0], torch.tensor([0.5 + 0.8 / math.pi, 0.0]), atol=1e-7)
