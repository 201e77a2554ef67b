"""Hydra against the plain formula, token by token and channel by channel (slow on purpose)."""
import pytest
import torch

from attnbench import build_attention, get_variant


def hydra_reference(layer, x):
    """The paper's formula on (B, N, C), written out with loops and no attnbench code."""
    B, N, C = x.shape
    h = 1 if layer.options.normalize == "all" else layer.num_heads
    d = C // h
    eps = layer.options.eps
    qkv = x @ layer.qkv.weight.T + (0 if layer.qkv.bias is None else layer.qkv.bias)
    q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
    out = torch.zeros_like(q)
    for b in range(B):
        for g in range(h):                               # groups of channels normalised together
            cs = slice(g * d, (g + 1) * d)
            qn = [q[b, n, cs] / max(q[b, n, cs].norm(), eps) for n in range(N)]
            kn = [k[b, n, cs] / max(k[b, n, cs].norm(), eps) for n in range(N)]
            kv = sum(kn[m] * v[b, m, cs] for m in range(N))      # one number per channel
            for n in range(N):
                out[b, n, cs] = qn[n] * kv
    return out @ layer.proj.weight.T + layer.proj.bias


def per_channel_attention(layer, x):
    """The same as C one-channel heads of un-normalised linear attention: (q^ k^T) v per channel."""
    B, N, C = x.shape
    qkv = x @ layer.qkv.weight.T
    q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
    q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    scores = torch.einsum("bnc,bmc->bcnm", q, k)                # an N x N map per channel (head)
    out = torch.einsum("bcnm,bmc->bnc", scores, v)
    return out @ layer.proj.weight.T + layer.proj.bias


@pytest.mark.parametrize("normalize", ["all", "head"])
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_matches_the_plain_formula(normalize, qkv_bias):
    torch.manual_seed(0)
    layer = build_attention("hydra", 24, 3, normalize=normalize, qkv_bias=qkv_bias).double().eval()
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    torch.testing.assert_close(layer(x), hydra_reference(layer, x), rtol=1e-10, atol=1e-10)


def test_is_attention_with_one_head_per_channel():
    torch.manual_seed(0)
    layer = build_attention("hydra", 24, 3).double().eval()
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    torch.testing.assert_close(layer(x), per_channel_attention(layer, x), rtol=1e-10, atol=1e-10)


def test_registered_through_the_entry_point():
    from attnbench import variant_info

    info = variant_info("hydra")
    assert info.distribution == "attnbench-hydra"
    assert get_variant("hydra").__module__ == "attnbench_hydra"
    assert [spec.name for spec in info.options] == ["normalize", "eps"]
