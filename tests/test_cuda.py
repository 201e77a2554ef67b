"""The CUDA paths: run only where torch sees a GPU (the ``cuda`` marker, tests/conftest.py), e.g. by
``scripts/device-check.sh``; elsewhere they are reported as skipped, with the reason.

Small shapes: these check that the paths work and agree with the CPU references, not speed.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from attnbench import data, measure, models, precision, train
from attnbench.registry import BUILTIN_DISTRIBUTION, build_attention, list_variants
from attnbench.results import store

pytestmark = pytest.mark.cuda


class _Matmuls(nn.Module):
    """``count`` chained (n, n) matmuls: work proportional to count."""

    def __init__(self, count: int):
        super().__init__()
        self.count = count

    def forward(self, x):
        for _ in range(self.count):
            x = x @ x.T * (1.0 / x.shape[0])
        return x


def test_latency_with_cuda_events_is_synchronised():
    """Eight times the GPU work takes several times as long: the events time the kernels, not their launch."""
    x = torch.randn(2048, 2048, device="cuda")
    result = measure.time_interleaved({"one": (_Matmuls(1), x), "eight": (_Matmuls(8), x)}, warmup=2, repeats=5,
                                      device="cuda", min_block_ms=5.0)
    ratio = result["eight"].median_ms / result["one"].median_ms
    assert 4.0 < ratio < 16.0, ratio


class _Allocates(nn.Module):
    """Allocates and fills ``size`` bytes during its forward."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, x):
        scratch = torch.ones(self.size // 4, device=x.device)
        return x + scratch[:1]


def _allocating_64mib():
    return _Allocates(64 * 2**20)


def test_peak_memory_is_max_memory_allocated():
    memory = measure.peak_memory(_allocating_64mib, (4, 8), device="cuda")
    assert memory.method == "cuda max_memory_allocated"
    assert 64 * 2**20 <= memory.forward_bytes < 66 * 2**20, memory


@pytest.mark.parametrize("variant", list_variants(BUILTIN_DISTRIBUTION))
def test_short_training_run_in_bfloat16_on_the_gpu(variant):
    splits = data.load_dataset("digits", seed=0)
    model = models.create_model("vit_pico_patch2_8", variant, {}, seed=0, num_classes=splits.num_classes,
                                in_chans=splits.in_chans, img_size=splits.img_size)
    dtypes = set()
    model.blocks[0].attn.register_forward_hook(lambda module, args, out: dtypes.add((out.dtype, out.device.type)))
    config = train.TrainConfig(epochs=1, max_steps=20, batch_size=64, device="cuda", precision="bfloat16")
    result = train.fit(model, splits, config, progress=False)
    assert result.ok, result.error
    assert result.device.startswith("cuda") and dtypes == {(torch.bfloat16, "cuda")}
    assert math.isfinite(result.history[-1]["train_loss"]) and 0 <= result.test_top1_castled <= 100


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_linear_angular_core_on_cuda_matches_its_reference(dtype):
    """The compiled core (Inductor, Triton on CUDA) against the plain reference in float64 on CPU,
    forward and backward; in bfloat16 through the layer under autocast, as training runs it."""
    from attnbench.testing import HALF_PRECISION_TOLERANCE, half_precision_error
    from attnbench_variants.ops import linear_angular as la
    from attnbench_variants.ops import use_impl

    torch.manual_seed(0)
    layer = build_attention("linear-angular", 192, 3, qkv_bias=True).cuda()
    x = torch.randn(4, 197, 192, device="cuda", requires_grad=True)
    with use_impl("compile"):
        with precision.autocast(precision.DEFAULT_PRECISION if dtype == torch.float32 else "bfloat16", "cuda"):
            y = layer(x)
        grads = torch.autograd.grad(y.float().square().mean(), [x, *layer.parameters()])
        assert not la.compile_fell_back(), "torch.compile fell back to the eager path on CUDA"
    reference = layer.double().cpu()
    x_ref = x.detach().double().cpu().requires_grad_(True)
    with use_impl("reference"):
        y_ref = reference(x_ref)
        ref_grads = torch.autograd.grad(y_ref.square().mean(), [x_ref, *reference.parameters()])
    tolerance = 1e-4 if dtype == torch.float32 else HALF_PRECISION_TOLERANCE[dtype]
    assert y.dtype == dtype
    assert half_precision_error(y.cpu(), y_ref) <= tolerance
    for g, g_ref in zip(grads, ref_grads):
        assert half_precision_error(g.cpu(), g_ref) <= tolerance


def test_bench_cli_on_cuda_end_to_end(tmp_path):
    from click.testing import CliRunner

    from attnbench.cli import main

    out = tmp_path / "results"
    result = CliRunner().invoke(main, ["bench", "--device", "cuda", "--variants", "softmax,linear-angular,castling",
                                       "--tokens", "197,785", "--repeats", "1", "--samples", "3", "--warmup", "2",
                                       "--dtype", "bfloat16", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = store.read_rows(out, kind="benchmark")
    assert len(rows) == 6 and (rows["precision"] == "bfloat16").all()
    assert rows["device"].str.startswith("cuda").all() and (rows["ops"] == "compile").all()
    assert (rows["mem_method"] == "cuda max_memory_allocated").all() and (rows["forward_mem_bytes"] > 0).all()
    assert (rows["latency_median_ms"] > 0).all()
    assert rows["device_name"].iloc[0] == torch.cuda.get_device_name(0)
