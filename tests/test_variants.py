"""Every built-in variant against its slow reference (tests/references.py), forward and backward."""
from __future__ import annotations

import copy

import pytest
import torch

import references
from attnbench.registry import BUILTIN_DISTRIBUTION, build_attention, get_variant, list_variants
from attnbench.testing import HALF_PRECISION_TOLERANCE, half_precision_error
from attnbench_variants.angular import AngularAttention
from attnbench_variants.castling import CastlingAttention
from attnbench_variants.identity import IdentityAttention
from attnbench_variants.linear import LinearAttention
from attnbench_variants.linear_angular import LinearAngularAttention
from attnbench_variants.softmax import SoftmaxAttention

DIM, HEADS, TOKENS = 12, 3, 10   # 10 tokens = a class token + a 3x3 grid


def reference_for(layer):
    """The slow reference of a layer, chosen by its class (most specific first)."""
    if isinstance(layer, CastlingAttention):
        state = layer.branch()
        branch = None if state is None else (state.threshold, state.gate)
        return lambda x: references.linear_angular(layer, x, branch=branch)
    for cls, fn in ((LinearAngularAttention, references.linear_angular), (AngularAttention, references.angular),
                    (LinearAttention, references.linear), (SoftmaxAttention, references.softmax),
                    (IdentityAttention, references.identity)):
        if isinstance(layer, cls):
            return lambda x: fn(layer, x)
    raise AssertionError(f"no slow reference for {type(layer).__name__}: add one to tests/references.py")


# Option sets per variant, beyond the defaults; every registered built-in runs with {} at least.
EXTRA_OPTIONS = {
    "linear": [{"feature_map": "relu"}, {"feature_map": "elu"}],
    "angular": [{"order": 1}, {"order": 3}, {"order": 7}],
    "linear-angular": [{"residual": "none"}, {"residual": "dwconv2d"}, {"residual": "dwconv", "kernel_size": 3},
                       {"constant": "faithful"}, {"normalize_output": False}],
    "castling": [{"mask_schedule": s} for s in ("threshold_ramp", "gate_linear", "gate_cosine", "gate_step",
                                                 "l1_ramp")] + [{"residual": "dwconv2d"}, {"threshold": 0.1}],
}
CASES = [(name, opts) for name in list_variants(BUILTIN_DISTRIBUTION) for opts in [{}] + EXTRA_OPTIONS.get(name, [])]


def _pair(name, options, progress=0.3):
    torch.manual_seed(0)
    layer = build_attention(name, DIM, HEADS, qkv_bias=True, **options).double()
    with torch.no_grad():  # non-trivial conv weights, so the residual shows up in the comparison
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    layer.set_progress(progress)
    x = torch.randn(2, TOKENS, DIM, dtype=torch.float64)
    return layer, x


@pytest.mark.parametrize("name,options", CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_forward_and_backward_match_reference(name, options):
    layer, x = _pair(name, options)
    x_fast = x.clone().requires_grad_(True)
    x_ref = x.clone().requires_grad_(True)
    y_fast = layer(x_fast)
    fast_grads = torch.autograd.grad(y_fast.sum() + (y_fast ** 2).mean(), [x_fast, *layer.parameters()])
    y_ref = reference_for(layer)(x_ref)
    ref_grads = torch.autograd.grad(y_ref.sum() + (y_ref ** 2).mean(), [x_ref, *layer.parameters()])
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-9, atol=1e-9)
    for (pname, _), g_fast, g_ref in zip([("x", x)] + list(layer.named_parameters()), fast_grads, ref_grads):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-8, atol=1e-8, msg=lambda m: f"grad of {pname}: {m}")


@pytest.mark.parametrize("name,options", CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_float32_matches_reference_within_1e5(name, options):
    layer, x = _pair(name, options)
    layer, x = layer.float(), x.float()
    with torch.no_grad():
        expected = reference_for(layer)(x.double().float())
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", list(HALF_PRECISION_TOLERANCE), ids=str)
@pytest.mark.parametrize("name,options", CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_half_precision_matches_reference(name, options, dtype):
    """Under CPU autocast to bfloat16 / float16 (as training runs), forward and backward against the
    float64 reference, within the conformance suite's dtype-aware tolerance."""
    layer, x = _pair(name, options)
    layer_ref = copy.deepcopy(layer)
    layer = layer.float()
    x_half = x.float().requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x_half)
    assert y.dtype == dtype
    grads = torch.autograd.grad(y.float().sum() + (y.float() ** 2).mean(), [x_half, *layer.parameters()])
    x_ref = x.clone().requires_grad_(True)
    y_ref = reference_for(layer_ref)(x_ref)
    ref_grads = torch.autograd.grad(y_ref.sum() + (y_ref ** 2).mean(), [x_ref, *layer_ref.parameters()])
    tolerance = HALF_PRECISION_TOLERANCE[dtype]
    assert half_precision_error(y, y_ref) <= tolerance
    if options.get("feature_map") == "relu":
        # relu's derivative jumps at 0, and at these tiny shapes (d = 4) rounding moves a few
        # q entries across it: measured 11.7 eps (bfloat16), 7.1 (float16); the rest <= 4.1
        tolerance *= 2
    for (pname, _), g, g_ref in zip([("x", x)] + list(layer.named_parameters()), grads, ref_grads):
        assert half_precision_error(g, g_ref) <= tolerance, f"grad of {pname}"


def test_softmax_equals_timm_attention():
    from timm.layers import Attention

    torch.manual_seed(0)
    ours = build_attention("softmax", 192, 3, qkv_bias=True).eval()
    theirs = Attention(192, num_heads=3, qkv_bias=True).eval()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(4, 197, 192)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max().item() <= 1e-5
    mask = torch.rand(4, 1, 197, 197) > 0.2
    mask[..., 0] = True
    with torch.no_grad():
        assert (ours(x, attn_mask=mask) - theirs(x, attn_mask=mask)).abs().max().item() <= 1e-5


def test_linear_kernels_refuse_masks_instead_of_ignoring_them():
    layer = build_attention("linear-angular", DIM, HEADS)
    with pytest.raises(ValueError, match="does not support attn_mask"):
        layer(torch.randn(1, TOKENS, DIM), attn_mask=torch.ones(TOKENS, TOKENS, dtype=torch.bool))


def test_no_python_loop_in_linear_angular_forward():
    """The number of torch calls in one forward does not grow with heads or tokens."""

    class CountCalls(torch.overrides.TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            CountCalls.calls += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for heads, tokens in ((2, 10), (4, 50)):
        layer = build_attention("castling", 8 * heads, heads)
        x = torch.randn(1, tokens, 8 * heads)
        CountCalls.calls = 0
        with CountCalls():
            layer(x)
        counts.append(CountCalls.calls)
    assert counts[0] == counts[1] > 0


def test_official_state_dict_loads_unchanged():
    """The GATECH-EIC LinAngularAttention parameter names and shapes: qkv, dconv (h,1,9,1), proj."""
    heads, dim = 3, 192
    official = {"qkv.weight": torch.randn(3 * dim, dim), "dconv.weight": torch.randn(heads, 1, 9, 1),
                "proj.weight": torch.randn(dim, dim), "proj.bias": torch.randn(dim)}
    for name in ("castling", "linear-angular", "castling-no-aux", "castling-no-norm", "castling-faithful"):
        layer = build_attention(name, dim, heads)
        layer.load_state_dict(official, strict=True)


def test_dwconv2d_needs_a_square_grid():
    layer = build_attention("linear-angular", DIM, HEADS, residual="dwconv2d", num_prefix_tokens=0)
    with pytest.raises(ValueError, match="square token grid"):
        layer(torch.randn(1, 10, DIM))
    assert layer(torch.randn(1, 9, DIM)).shape == (1, 9, DIM)


@pytest.mark.parametrize("name,options,message", [
    ("angular", {"order": 2}, "order"),
    ("linear-angular", {"kernel_size": 4}, "kernel_size"),
    ("castling", {"schedule_end": 1.5}, "schedule_end"),
    ("castling", {"threshold": 0.0}, "threshold"),
    ("castling", {"mask_schedule": "gate_linaer"}, "did you mean 'gate_linear'"),
    ("linear", {"feature_mpa": "relu"}, "did you mean 'feature_map'"),
])
def test_bad_options_are_named(name, options, message):
    with pytest.raises(ValueError, match=message) as err:
        build_attention(name, DIM, HEADS, **options)
    assert name in str(err.value)


def test_ablated_presets_fix_one_option_each():
    expected = {"castling-no-dwconv": ("residual", "none"), "castling-no-aux": ("mask_schedule", "none"),
                "castling-no-norm": ("normalize_output", False), "castling-faithful": ("constant", "faithful")}
    base = build_attention("castling", DIM, HEADS).options
    for name, (option, value) in expected.items():
        opts = build_attention(name, DIM, HEADS).options
        assert getattr(opts, option) == value
        assert getattr(base, option) != value
        # a preset's default can still be overridden
        assert issubclass(get_variant(name), CastlingAttention)
