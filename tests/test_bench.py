"""attnbench.bench and the ``attnbench bench`` command."""
import math

import pytest
from click.testing import CliRunner

from attnbench import bench, measure
from attnbench.results import store
from attnbench.cli import main


def test_crossover_interpolates_on_log_scale():
    # slower by 2x at 100 tokens, faster by 2x at 400: log-midpoint 200
    value, note = bench.crossover([100, 400], [2.0, 1.0], [1.0, 2.0])
    assert value == pytest.approx(200.0) and note == ""
    assert bench.crossover([100, 400, 1600], [3, 2, 1], [1, 1, 2])[0] == pytest.approx(math.sqrt(400 * 1600))


def test_crossover_outside_the_range():
    assert bench.crossover([100, 400], [0.5, 0.5], [1.0, 1.0]) == (None, "below range")
    assert bench.crossover([100, 400], [2.0, 3.0], [1.0, 1.0]) == (None, "none in range")


def test_aggregate_medians_spread_and_crossover():
    config = bench.BenchConfig(variants=("softmax", "linear"), tokens=(100, 400), repeats=3, batch=2)
    process_ms = {"softmax|100": (1.0, 1.2, 0.9), "linear|100": (2.0, 2.0, 2.2),
                  "softmax|400": (8.0, 8.8, 8.4), "linear|400": (4.0, 4.4, 4.2)}
    processes = [{key: {"median_ms": ms[i], "iqr_ms": 0.1 * (i + 1)} for key, ms in process_ms.items()}
                 for i in range(3)]
    static = {key: {"macs": 1, "attention_macs": 1, "params": 1} for key in process_ms}
    rows, crossovers = bench._aggregate(config, processes, static, {"threads": 2}, "run",
                                        {"softmax": "n/a", "linear": "n/a"})
    row = {(r["variant"], r["tokens"]): r for r in rows}
    soft = row[("softmax", 100)]
    assert soft["latency_median_ms"] == 1.0 and soft["latency_iqr_ms"] == pytest.approx(0.2)
    assert soft["latency_min_ms"] == 0.9 and soft["latency_max_ms"] == 1.2
    assert soft["latency_spread_pct"] == pytest.approx(30.0) and soft["samples_per_s"] == pytest.approx(2000.0)
    assert row[("linear", 400)]["speedup_vs_softmax"] == pytest.approx(2.0)
    assert crossovers["linear"][0] == pytest.approx(200.0)  # 2x slower at 100, 2x faster at 400
    assert row[("linear", 100)]["crossover_tokens"] == pytest.approx(200.0)
    assert soft["crossover_note"] == "baseline" and all(r["kind"] == "benchmark" for r in rows)


def test_parse_arguments():
    assert bench.parse_tokens(" 785,197, 3_137,197") == (197, 785, 3137)
    assert bench.parse_variants("softmax, linear,softmax") == ("softmax", "linear")
    for text in ("", "197,abc", "0,5"):
        with pytest.raises(bench.BenchError, match="--tokens"):
            bench.parse_tokens(text)


def test_model_level_is_deit_tiny_at_197_tokens():
    model = bench.build_module("model", "softmax", 192, 3, 197, depth=12, patch=16)
    config = bench.BenchConfig(variants=("softmax",), tokens=(197,), level="model")
    assert bench.input_shape(config, 197) == (3, 224, 224)
    assert measure.count_macs_reference(model, (3, 224, 224)) == 1_253_683_200


def _invoke(*args):
    return CliRunner().invoke(main, ["bench", *args])


def test_cli_tiny_run_writes_rows_and_plot(tmp_path):
    out = tmp_path / "results"
    result = _invoke("--variants", "softmax,linear-angular", "--tokens", "17,65", "--dim", "32", "--heads", "2",
                     "--batch", "2", "--repeats", "1", "--samples", "3", "--warmup", "1", "--threads", "1",
                     "--ops", "fast", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "crossover, linear-angular faster than softmax" in result.output

    rows = store.read_rows(out, kind="benchmark")
    assert len(rows) == 4 and set(rows["variant"]) == {"softmax", "linear-angular"}
    assert set(rows["tokens"]) == {17, 65} and (rows["processes"] == 1).all() and (rows["threads"] == 1).all()
    assert (rows["kernel_requested"] == "fast").all()
    kernel = dict(zip(rows["variant"], rows["kernel_implementation"]))
    assert kernel == {"softmax": "n/a", "linear-angular": "fast"}   # softmax has one implementation
    for column in ("macs", "attention_macs", "params", "latency_median_ms", "latency_iqr_ms",
                   "latency_spread_pct", "process_peak_memory_mb", "forward_memory_mb", "torch_version", "cpu_model",
                   "crossover_note", "attnbench_version", "variant_distribution", "options"):
        assert rows[column].notna().all(), column
    assert (rows["latency_median_ms"] > 0).all() and (rows["macs"] > 0).all()
    assert (rows["latency_min_ms"] <= rows["latency_max_ms"]).all()
    # each layer's matmul floor, timed in the same rounds, and the ratio to it
    assert (rows["floor_ms"] > 0).all()
    assert ((rows["latency_median_ms"] / rows["floor_ms"] - rows["floor_ratio"]).abs() < 1e-9).all()
    assert "x floor" in " ".join(result.output.split())
    plots = list((out / "benchmarks").glob("bench-*.png"))
    assert len(plots) == 1 and plots[0].read_bytes()[:4] == b"\x89PNG"


def test_cli_default_run_is_compiled_and_its_rows_say_so(tmp_path):
    """The default implementation is the compiled one; a worker that fell back would write ``fast``."""
    out = tmp_path / "results"
    result = _invoke("--variants", "softmax,linear-angular", "--tokens", "17", "--dim", "32", "--heads", "2",
                     "--batch", "2", "--repeats", "1", "--samples", "2", "--warmup", "1", "--threads", "1",
                     "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "ops compile" in result.output
    rows = store.read_rows(out, kind="benchmark")
    assert (rows["kernel_requested"] == "compile").all() and (rows["latency_median_ms"] > 0).all()
    kernel = dict(zip(rows["variant"], rows["kernel_implementation"]))
    assert kernel == {"softmax": "n/a", "linear-angular": "compile"}


@pytest.mark.parametrize("args, message", [
    (("--variants", "softmax,linear-anglar"), "did you mean 'linear-angular'"),
    (("--tokens", "197,many"), "--tokens"),
    (("--level", "model", "--tokens", "100"), "s*s + 1"),
    (("--dim", "100", "--heads", "3"), "not divisible"),
    (("--level", "grid"), "--level"),
    (("--ops", "fastest"), "--ops must be one of fast, reference, compile"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, args, message):
    result = _invoke(*args, "--out", str(tmp_path))
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_rows_name_the_eager_path_where_compiling_fell_back(monkeypatch):
    from attnbench import kernels, registry
    from attnbench_variants.ops import linear_angular as la

    for name in ("linear-angular", "castling"):
        cls = registry.get_variant(name)
        monkeypatch.setattr(la, "_compile_failed", True)
        assert kernels.implementation_of(cls, "compile") == "fast"
        assert kernels.implementation_of(cls, "reference") == "reference"
        monkeypatch.setattr(la, "_compile_failed", False)
        assert kernels.implementation_of(cls, "compile") == "compile"
    # a variant without alternatives never inherits another's label
    assert kernels.implementation_of(registry.get_variant("softmax"), "compile") == kernels.SINGLE


@pytest.mark.parametrize("variant", __import__("attnbench").registry.list_variants("attnbench"))
def test_every_built_in_variant_declares_the_matmuls_of_its_floor(variant):
    """The floor's matmuls are well formed and never count more than the core's analytic MACs."""
    from attnbench import models, registry

    layer = models.castle(registry.build_attention(variant, 64, 4))
    tokens = 65
    shapes = layer.core_matmuls(1, tokens)
    assert shapes is not None, "a built-in variant declares its core matmuls"
    macs = 0
    for a, b in shapes:
        assert a[:-2] == b[:-2] and a[-1] == b[-2], (a, b)
        macs += math.prod(a) * b[-1]
    assert macs <= layer.core_macs(tokens)
    if variant != "identity":   # the matmuls are the core's leading term
        assert macs >= 0.5 * layer.core_macs(tokens), (macs, layer.core_macs(tokens))
    floor = bench.floor_callable(layer, 2, tokens, "float32", "cpu")
    floor(__import__("torch").randn(2, tokens, 64))


def test_a_variant_without_declared_matmuls_has_no_floor(registered):
    from attnbench.variant import AttentionVariant

    class Plain(AttentionVariant):
        def attend(self, q, k, v, attn_mask):
            return v

        def core_macs(self, num_tokens):
            return 0

    from attnbench import registry

    name = registered(Plain, "plain-no-floor")
    assert bench.floor_callable(registry.build_attention(name, 32, 2), 1, 17, "float32", "cpu") is None


@pytest.mark.perf
def test_the_castled_layer_stays_near_its_matmul_floor():
    """A coarse ratio within one process: the castled layer at 785 tokens (``--ops compile``, as
    ``bench`` runs it: the C core) costs under 1.6x its projections and core matmuls timed alone
    (measured 1.10-1.13x on 1 thread of an AMX Xeon; the eager ``fast`` path 1.73-1.78x)."""
    from attnbench import allocator, kernels, models, registry

    # as `attnbench bench` runs: with glibc's defaults the core's per-call buffers are faulted in
    # again in some processes and not others (measured 9.1-9.9 or 13.9-14.7 ms, per process)
    allocator.tune_malloc()
    layer = models.castle(registry.build_attention("castling", 192, 3)).eval()
    x = __import__("torch").randn(4, 785, 192)
    floor = bench.floor_callable(layer, 4, 785, "float32", "cpu")
    with kernels.use("compile"):
        timed = measure.time_interleaved({"layer": (layer, x), "floor": (floor, x)}, threads=1, repeats=15)
    ratio = timed["layer"].median_ms / timed["floor"].median_ms
    assert ratio < 1.6, ratio


@pytest.mark.perf
def test_the_castled_layer_in_bfloat16_stays_near_its_matmul_floor():
    """The same in bfloat16 (autocast, the C core, ``--ops compile``) where the CPU has native
    bfloat16 matmuls: under 2.2x at 785 tokens (measured 1.6x on 2 threads of an AMX Xeon,
    docs/performance.md; 2.8x before the C core)."""
    from pathlib import Path

    import torch

    from attnbench import allocator, kernels, models, precision, registry

    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    if not flags & {"avx512_bf16", "amx_bf16"}:
        pytest.skip("no native bfloat16 matmuls on this CPU (avx512_bf16 or amx_bf16 in /proc/cpuinfo)")
    allocator.tune_malloc()   # as `attnbench bench` runs (see the float32 test above)
    layer = models.castle(registry.build_attention("castling", 192, 3)).eval()
    x = torch.randn(4, 785, 192)
    floor = bench.floor_callable(layer, 4, 785, "bfloat16", "cpu")
    with kernels.use("compile"):
        timed = measure.time_interleaved({"layer": (precision.at_precision(layer, "bfloat16", "cpu"), x),
                                          "floor": (floor, x)}, threads=2, repeats=15)
    ratio = timed["layer"].median_ms / timed["floor"].median_ms
    assert ratio < 2.2, ratio


@pytest.mark.parametrize("parent", ["system", "tuned"])
def test_timing_processes_run_with_the_parents_allocator_and_rows_say_which(parent, monkeypatch):
    """The CLI tunes malloc (attnbench.allocator); its timing processes must too, or rows would
    record a setting the timings never ran with. A library caller that did not tune gets untuned workers."""
    import platform

    from attnbench import allocator

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    monkeypatch.delenv("ATTNBENCH_MALLOC", raising=False)
    monkeypatch.setattr(allocator, "_setting", "system" if parent == "system" else "tuned in the parent")
    config = bench.BenchConfig(variants=("softmax",), tokens=(17,), dim=16, heads=2, batch=1, repeats=1, samples=1,
                               warmup=0, memory=False, ops="fast", threads=1)
    rows = bench.run_benchmark(config, write=False).rows
    expected = "system" if parent == "system" else f"glibc mmap {allocator.MMAP_THRESHOLD >> 20} MiB, " \
                                                    f"trim {allocator.TRIM_THRESHOLD >> 20} MiB"
    assert [row["allocator"] for row in rows] == [expected]
