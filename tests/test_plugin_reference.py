"""What docs/plugins.md's reference promises a plugin author: the token-grid helper, the reference
test helper, and --check messages in the plugin's terms (a wrong shape once, the MACs check about
core_macs, the half-precision input named)."""
import pytest
import torch

from attnbench import testing
from attnbench.variant import AttentionVariant, token_grid


def test_token_grid_infers_or_takes_the_prefix():
    assert token_grid(197) == (1, 14) and token_grid(17) == (1, 4) and token_grid(196) == (0, 14)
    assert token_grid(200, num_prefix_tokens=4) == (4, 14)
    with pytest.raises(ValueError, match="10 tokens with 0 prefix tokens leave no square token grid"):
        token_grid(10, num_prefix_tokens=0)


class _Softmax(AttentionVariant):
    """Plain softmax attention, for the tests below."""

    def attend(self, q, k, v, attn_mask):
        return torch.softmax(q @ k.transpose(-2, -1) * self.head_dim ** -0.5, dim=-1) @ v

    def core_macs(self, num_tokens):
        return 2 * num_tokens * num_tokens * self.dim


class _WrongShape(_Softmax):
    """Returns one channel per head."""

    def attend(self, q, k, v, attn_mask):
        return super().attend(q, k, v, attn_mask)[..., :1]


class _NoCoreMacs(_Softmax):
    """Counts no core MACs."""

    def core_macs(self, num_tokens):
        return 0


class _OverflowsOnLargeTokens(_Softmax):
    """Fine in float32; q^4 overflows float16 for a token scaled x300."""

    def attend(self, q, k, v, attn_mask):
        return super().attend(q, k, v, attn_mask) + 1e-12 * q.pow(4)


def _softmax_reference(layer, x):
    B, N, C = x.shape
    h, d = layer.num_heads, layer.head_dim
    q, k, v = (x @ layer.qkv.weight.T).reshape(B, N, 3, h, d).permute(2, 0, 3, 1, 4)
    out = torch.softmax(q @ k.transpose(-2, -1) / d ** 0.5, dim=-1) @ v
    return out.transpose(1, 2).reshape(B, N, C) @ layer.proj.weight.T + layer.proj.bias


def _results(registered, cls, name):
    return {r.check: r for r in testing.run_checks(registered(cls, name))}


def test_a_wrong_output_shape_is_reported_once(registered):
    results = _results(registered, _WrongShape, "wrong-shape-attn")
    assert "attend() returned" in results["check_shape_and_dtype"].message
    not_run = [name for name, r in results.items() if r.message.startswith("not run: the layer's output shape")]
    assert len(not_run) == len(results) - 3      # the shape check itself and the two option checks
    assert results["check_options_validation"].passed and results["check_option_docs"].passed


def test_the_macs_check_speaks_of_core_macs(registered):
    message = _results(registered, _NoCoreMacs, "no-core-macs-attn")["check_macs"].message
    assert message.startswith("core_macs(17) = 0, but the counter sees 27,744 in attend()"), message


def test_the_half_precision_failure_names_the_input(registered):
    result = _results(registered, _OverflowsOnLargeTokens, "overflow-attn")["check_half_precision_finite"]
    assert not result.passed and "for the input with token 5 of sample 0 scaled x300" in result.message


def test_assert_matches_reference_compares_outputs_and_gradients(registered):
    torch.manual_seed(0)
    layer = _Softmax(24, num_heads=3).double()
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    testing.assert_matches_reference(layer, _softmax_reference, x)
    with pytest.raises(AssertionError, match="output differs from the reference"):
        testing.assert_matches_reference(layer, lambda layer, x: 2 * _softmax_reference(layer, x), x)
    # the same output, a gradient that differs: a reference that detaches v's projection
    def detached(layer, x):
        return _softmax_reference(layer, x).detach() + 0 * x.sum()
    with pytest.raises(AssertionError, match="gradient of input differs from the reference"):
        testing.assert_matches_reference(layer, detached, x)
