"""attnbench.torch_compat: the few torch internals, each checked against public behaviour."""
import torch
from torch.utils.flop_counter import FlopCounterMode

from attnbench import torch_compat


def test_dispatch_mode_active_sees_a_flop_counter():
    assert torch_compat.dispatch_mode_active() is False
    with FlopCounterMode(display=False):
        assert torch_compat.dispatch_mode_active() is True
    assert torch_compat.dispatch_mode_active() is False


def test_softmax_inplace_matches_softmax_and_reuses_the_buffer():
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    expected = torch.softmax(x, dim=-1)
    out = torch_compat.softmax_inplace_(x)
    torch.testing.assert_close(out, expected)
    assert out.data_ptr() == x.data_ptr()


def test_raise_recompile_limit_only_raises():
    import torch._dynamo.config as config

    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    before = getattr(config, name)
    try:
        torch_compat.raise_recompile_limit(before + 5)
        assert getattr(config, name) == before + 5
        torch_compat.raise_recompile_limit(1)
        assert getattr(config, name) == before + 5
    finally:
        setattr(config, name, before)
