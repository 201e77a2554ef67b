"""attnbench.measure: MAC counts against analytic references, latency and memory protocol."""
import functools
import re

import pytest
import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from attnbench import measure, provenance
from attnbench.registry import build_attention, list_variants, variant_class

DEIT_TINY_MACS = 1_253_683_200  # analytic; timm publishes 1.26 G
DEIT_INPUT = (3, 224, 224)


@pytest.fixture(scope="module")
def deit_tiny():
    return timm.create_model("deit_tiny_patch16_224", pretrained=False)


@pytest.fixture(scope="module")
def deit_tiny_counts(deit_tiny):
    return measure.count_macs(deit_tiny, DEIT_INPUT), measure.count_macs_reference(deit_tiny, DEIT_INPUT)


def test_deit_tiny_counts_1_2537_gmacs(deit_tiny_counts):
    counted, reference = deit_tiny_counts
    assert counted == pytest.approx(DEIT_TINY_MACS, rel=0.005)  # ptflops aten adds biases (+0.3%)
    assert reference == pytest.approx(DEIT_TINY_MACS, rel=0.001)
    assert counted == pytest.approx(reference, rel=0.005)


def test_naive_count_misses_fused_sdpa(deit_tiny):
    # Why count_macs runs under the SDPA math backend: a plain count sees CPU SDPA as zero.
    with FlopCounterMode(display=False) as counter:
        deit_tiny(torch.zeros(1, *DEIT_INPUT))
    assert counter.get_total_flops() // 2 < 0.9 * DEIT_TINY_MACS


def test_deit_tiny_with_softmax_variant_counts_the_same(deit_tiny_counts):
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, attn_layer=variant_class("softmax"))
    counted, reference = deit_tiny_counts
    assert measure.count_macs(model, DEIT_INPUT) == pytest.approx(counted, rel=1e-4)
    assert measure.count_macs_reference(model, DEIT_INPUT) == pytest.approx(reference, rel=1e-4)


def test_sdpa_and_explicit_matmuls_count_the_same():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64)  # 17 tokens, fast
    fused = measure.count_macs(model, (3, 64, 64)), measure.count_macs_reference(model, (3, 64, 64))
    for block in model.blocks:
        block.attn.fused_attn = False  # timm's explicit q @ k^T, softmax, @ v
    explicit = measure.count_macs(model, (3, 64, 64)), measure.count_macs_reference(model, (3, 64, 64))
    assert explicit[0] == pytest.approx(fused[0], rel=0.001)
    assert explicit[1] == pytest.approx(fused[1], rel=0.001)


@pytest.mark.parametrize("name", list_variants())
def test_counted_macs_match_analytic(name):
    layer = build_attention(name, 192, 3).castle()
    tokens = 197
    analytic = layer.macs(tokens)
    counted = measure.count_macs(layer, (tokens, 192))
    assert counted == pytest.approx(analytic, rel=0.01), f"{name}: counted {counted:,} MACs, macs(N) {analytic:,}"


@pytest.mark.parametrize("name", list_variants())
def test_reference_counter_matches_analytic_exactly(name):
    # FlopCounterMode counts matmuls and convolutions, as macs(N) does, and no bias adds: a
    # multiply-add that an implementation hides from counters (elementwise taps) shows here.
    layer = build_attention(name, 192, 3).castle()
    analytic = layer.macs(197)
    counted = measure.count_macs_reference(layer, (197, 192))
    assert counted == pytest.approx(analytic, rel=0.001), (
        f"{name}: counters see {counted:,} MACs, macs(N) says {analytic:,} ({analytic - counted:+,})")


def test_count_params():
    layer = nn.Linear(4, 3)
    layer.bias.requires_grad_(False)
    assert measure.count_params(layer) == 15
    assert measure.count_params(layer, trainable_only=True) == 12


def test_time_latency_fields_and_threads_restored():
    before = torch.get_num_threads()
    x = torch.randn(8, 64)
    latency = measure.time_latency(nn.Linear(64, 64), x, threads=1, warmup=1, repeats=5, min_block_ms=2)
    assert torch.get_num_threads() == before
    assert latency.threads == 1 and latency.repeats == 5 and len(latency.times_ms) == 5
    assert latency.calls_per_block >= 1
    assert latency.median_ms > 0 and latency.iqr_ms >= 0
    assert latency.samples_per_s == pytest.approx(8 / (latency.median_ms / 1e3))
    assert set(latency.as_dict()) >= {"median_ms", "iqr_ms", "samples_per_s", "threads", "repeats"}


@pytest.mark.perf
def test_interleaved_softmax_slower_than_linear_angular_at_3137_tokens():
    # A coarse ratio inside one process, never an absolute time (~8x on an idle 2-core machine).
    x = torch.randn(1, 3137, 192)
    layers = {name: (build_attention(name, 192, 3).castle(), x) for name in ("softmax", "linear-angular")}
    result = measure.time_interleaved(layers, threads=1, warmup=1, repeats=3, min_block_ms=1)
    assert result["softmax"].median_ms > result["linear-angular"].median_ms


class Allocates(nn.Module):
    """Allocates ``megabytes`` during forward (picklable for the memory child)."""

    def __init__(self, megabytes: int):
        super().__init__()
        self.numel = megabytes * 2**20 // 4

    def forward(self, x):
        return x.sum() + torch.ones(self.numel).add_(1).sum()


@pytest.mark.perf
def test_peak_memory_sees_a_forward_allocation_in_a_child():
    small, big = measure.peak_memory_many([(functools.partial(Allocates, 0), (2, 4)),
                                           (functools.partial(Allocates, 64), (2, 4))], threads=1)
    assert "cpu" in big.method
    assert big.peak_bytes >= big.baseline_bytes > 0
    assert 60 * 2**20 <= big.forward_bytes < 200 * 2**20
    assert small.forward_bytes < 16 * 2**20


def test_environment(tmp_path, monkeypatch):
    env = provenance.environment("cpu", threads=2)
    assert env["torch_version"] == torch.__version__ and env["timm_version"] == timm.__version__
    assert env["device"] == "cpu" and env["threads"] == 2 and env["cpu_count"] >= 1
    assert env["device_name"] == env["cpu_model"]
    assert env["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", env["git_commit"])
    monkeypatch.chdir(tmp_path)  # not a repository
    outside = provenance.environment()
    assert outside["git_commit"] is None and outside["git_dirty"] is None
    assert outside["threads"] == torch.get_num_threads()
