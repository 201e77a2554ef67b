"""Precision (attnbench.precision): training, sweeps and the half-precision checks, on CPU."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from attnbench import data, models, precision, testing, train
from attnbench.experiment import ExperimentError, load_experiment
from attnbench.sweep import run_sweep
from attnbench.results import store
from attnbench.variant import AttentionVariant

TINY_MODEL = {"embed_dim": 32, "depth": 2, "num_heads": 2}


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset("digits", seed=0)


def test_precisions_are_defined_once_with_their_dtypes():
    assert precision.PRECISIONS == {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    assert precision.torch_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="float32, bfloat16, float16.*'fp8'"):
        precision.torch_dtype("fp8")


def test_autocast_and_scaler_follow_the_precision():
    linear = torch.nn.Linear(4, 4)
    with precision.autocast("float32", "cpu"):
        assert linear(torch.randn(2, 4)).dtype == torch.float32
    with precision.autocast("bfloat16", "cpu"):
        assert linear(torch.randn(2, 4)).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")
    assert precision.grad_scaler("float16", "cpu").is_enabled()
    assert not precision.grad_scaler("bfloat16", "cpu").is_enabled()


def test_run_in_float32_upcasts_and_turns_autocast_off_inside_only():
    seen = {}

    def core(a, b):
        seen["dtypes"] = (a.dtype, b.dtype)
        seen["autocast"] = torch.is_autocast_enabled("cpu")
        return a @ b

    a, b = torch.randn(3, 3, dtype=torch.bfloat16), torch.randn(3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = precision.run_in_float32(core, a, b=b)
        assert torch.is_autocast_enabled("cpu")
    assert seen == {"dtypes": (torch.float32, torch.float32), "autocast": False}
    assert out.dtype == torch.float32


def test_run_in_float32_or_bfloat16_keeps_bfloat16_inference_only():
    seen = []

    def core(a, b):
        seen.append((a.dtype, b.dtype, torch.is_autocast_enabled("cpu")))
        return a @ b

    a, weight = torch.randn(3, 3, dtype=torch.bfloat16), torch.randn(3, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():       # inference in bfloat16: bfloat16 inside, the float32 weight cast
            assert precision.run_in_float32_or_bfloat16(core, a, b=weight).dtype == torch.bfloat16
        # a gradient is needed (training): float32 inside, as run_in_float32
        assert precision.run_in_float32_or_bfloat16(core, a, b=weight).dtype == torch.float32
        assert torch.is_autocast_enabled("cpu")
    with torch.no_grad():           # float16 keeps float32 (its range), and so does plain float32
        precision.run_in_float32_or_bfloat16(core, a.half(), b=weight)
        precision.run_in_float32_or_bfloat16(core, a.float(), b=weight)
    assert seen == [(torch.bfloat16, torch.bfloat16, False), (torch.float32, torch.float32, False),
                    (torch.float32, torch.float32, False), (torch.float32, torch.float32, False)]


def test_train_config_rejects_an_unknown_precision():
    with pytest.raises(ValueError, match="precision must be one of float32, bfloat16, float16, got 'half'"):
        train.TrainConfig(precision="half")
    assert train.TrainConfig().precision == "float32"


def test_experiment_file_with_a_bad_precision_is_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\ntrain: {precision: fp16}\nvariants: [softmax]\n")
    with pytest.raises(ExperimentError) as err:
        load_experiment(path)
    message = str(err.value)
    assert "\n" not in message and "precision must be one of float32, bfloat16, float16" in message


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_fit_trains_under_autocast_on_cpu(digits, name):
    model = models.create_model("vit_pico_patch2_8", "castling", {"mask_schedule": "l1_ramp"}, seed=0,
                                num_classes=digits.num_classes, in_chans=digits.in_chans, img_size=digits.img_size,
                                **TINY_MODEL)
    dtypes = set()
    model.blocks[0].attn.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
    config = train.TrainConfig(epochs=1, max_steps=4, batch_size=32, device="cpu", precision=name)
    result = train.fit(model, digits, config, progress=False)
    assert result.ok, result.error
    assert dtypes == {precision.torch_dtype(name)}          # training and evaluation ran in it
    assert result.config["precision"] == name
    assert math.isfinite(result.history[0]["train_loss"]) and 0 <= result.test_top1_castled <= 100
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_sweep_in_bfloat16_stores_the_precision(tmp_path, monkeypatch):
    from attnbench import measure

    timed = []
    real_time_latency = measure.time_latency

    def recording_time_latency(model, x, **kwargs):   # which precision the latency is measured in
        timed.append(model)
        return real_time_latency(model, x, **kwargs)

    monkeypatch.setattr(measure, "time_latency", recording_time_latency)
    path = tmp_path / "bf16.yaml"
    path.write_text(
        "name: bf16\ndata: {dataset: digits}\n"
        "train: {epochs: 1, max_steps: 3, batch_size: 32, num_threads: 1, precision: bfloat16}\n"
        "seeds: [0]\nvariants: [softmax, linear-angular]\nsampler: grid\n"
        "measure: {latency: true, repeats: 2, batch_size: 4, memory: false}\n")
    summary = run_sweep(load_experiment(path), results_dir=tmp_path / "results")
    assert (summary.done, summary.failed) == (2, 0)
    rows = store.read_rows(tmp_path / "results" / "bf16", kind="trial")
    assert set(rows["status"]) == {"complete"}
    assert [json.loads(c)["precision"] for c in rows["train_config"]] == ["bfloat16", "bfloat16"]
    assert list(rows["precision"]) == ["bfloat16", "bfloat16"]
    # the inference form is timed in the precision it was trained in
    assert len(timed) == 2 and all(isinstance(m, precision.AutocastModule) and m.precision == "bfloat16"
                                   for m in timed)


# --- the half-precision checks can fail -----------------------------------------------------------

class _HalfUnsafeLinearAngular(AttentionVariant):
    """The linear-angular core as the official code writes it, in whatever dtype arrives (no float32
    inside) and with F.normalize (gain 1/eps at a zero token)."""

    def attend(self, q, k, v, attn_mask):
        q_hat, k_hat = F.normalize(q, dim=-1, eps=1e-6), F.normalize(k, dim=-1, eps=1e-6)
        return F.normalize(0.5 * v + q_hat @ (k_hat.transpose(-2, -1) @ v) / math.pi, dim=-1, eps=1e-6)

    def core_macs(self, num_tokens):
        return 2 * num_tokens * self.dim * self.head_dim


class _CoarseInHalf(AttentionVariant):
    """Softmax attention that rounds q and k to 3 mantissa bits in half precision, like a fast kernel that
    engages only there and loses accuracy."""

    def attend(self, q, k, v, attn_mask):
        if q.dtype in precision.HALF_DTYPES:
            q, k = (t.to(torch.float8_e4m3fn).to(t.dtype) for t in (q, k))
        return F.scaled_dot_product_attention(q, k, v)

    def core_macs(self, num_tokens):
        return 2 * num_tokens * num_tokens * self.dim


def test_half_precision_checks_catch_overflow_and_inaccuracy(registered):
    unsafe = registered(_HalfUnsafeLinearAngular, "test-half-unsafe")
    with pytest.raises(AssertionError, match="float16 .*non-finite"):
        testing.check_half_precision_finite(unsafe, {})
    coarse = registered(_CoarseInHalf, "test-coarse-in-half")
    testing.check_half_precision_finite(coarse, {})
    with pytest.raises(AssertionError, match="differs from float32"):
        testing.check_half_precision_matches_float32(coarse, {})


# --- attnbench bench --dtype ---------------------------------------------------------------------

def test_bench_builds_its_modules_at_the_precision():
    from attnbench import bench, kernels

    # _build_under sets the kernel default of the (worker) process it runs in: put it back after.
    previous = kernels.set_process_default(None)
    try:
        module = bench._build_under("fast", 1, "layer", "linear-angular", 32, 2, 17, dtype="bfloat16", device="cpu")
        with torch.inference_mode():
            assert module(torch.randn(2, 17, 32)).dtype == torch.bfloat16
        plain = bench._build_under("fast", 1, "layer", "linear-angular", 32, 2, 17)
        assert not isinstance(plain, precision.AutocastModule)
    finally:
        kernels.set_process_default(previous)


def test_bench_cli_in_bfloat16_records_the_precision(tmp_path):
    from click.testing import CliRunner

    from attnbench.cli import main

    out = tmp_path / "results"
    result = CliRunner().invoke(main, ["bench", "--variants", "softmax,linear-angular", "--tokens", "17", "--dim", "32",
                                       "--heads", "2", "--batch", "2", "--repeats", "1", "--samples", "2",
                                       "--warmup", "1", "--threads", "1", "--ops", "fast", "--dtype", "bfloat16",
                                       "--no-memory", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = store.read_rows(out, kind="benchmark")
    assert (rows["precision"] == "bfloat16").all() and (rows["latency_median_ms"] > 0).all()
    bad = CliRunner().invoke(main, ["bench", "--dtype", "fp8", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "fp8" in bad.output
