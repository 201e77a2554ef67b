"""The scaling benchmark behind ``attnbench bench``: cost of each variant against token count.

For every (variant, token count): MACs counted by :func:`attnbench.measure.count_macs` and the
variant's analytic ``macs(N)``, parameters, peak memory of one forward, and latency. Variants
are castled first, so the inference form is measured.

Latency protocol (docs/measuring.md): all (variant, N) callables are timed interleaved,
round-robin, in one process (:func:`attnbench.measure.time_interleaved`), and that whole
measurement runs in ``repeats`` fresh processes (``python -m attnbench.bench --worker``), one
after another. Reported: the median over processes of the per-process medians, the
within-process IQR (median over processes) and the spread across processes ((max - min) /
median of the process medians).

Implementation (``ops``, :mod:`attnbench.kernels`): variants that offer several kernels run
``compile`` by default (the fast paths under ``torch.compile``, falling back to eager ``fast``
with a warning where compiling fails), since SDPA, the baseline, is a fused kernel too; ``fast``
or ``reference`` on request. Each timing and memory process compiles each shape once, in its
untimed warm-up. Every row records what was asked (``kernel_requested``) and what really ran
for its variant (``kernel_implementation``, ``n/a`` for a variant with a single implementation).

Rows go to the result store (:mod:`attnbench.results.store`, ``kind="benchmark"``) with the
environment; a PNG shows latency and MACs against tokens on log-log axes.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import secrets
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from attnbench import allocator, kernels, measure, models, precision, provenance, registry, torch_compat
from attnbench.results import schema
from attnbench.variant import AttentionVariant

__all__ = ["BenchConfig", "BenchError", "BenchResult", "build_module", "crossover", "floor_callable", "run_benchmark",
           "parse_tokens", "parse_variants"]

LEVELS = ("layer", "model")
BASELINE = schema.BASELINE


class BenchError(ValueError):
    """A benchmark request that cannot run (bad arguments, a failed timing process)."""


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What to benchmark and how.

    Attributes:
        variants: registered variant names; ``softmax`` is the baseline of the crossover.
        tokens: token counts N (model level: N - 1 must be a square number of patches).
        dim: width C. heads: heads h.
        batch: batch size of the timed and memory forwards (MACs are per sample).
        level: ``layer`` (one attention layer) or ``model`` (a timm ViT, ``depth`` blocks).
        depth: blocks of the model-level ViT. patch: its patch size.
        threads: torch threads (None: every core this process may use).
        repeats: fresh timing processes (at least 1; 3 or more to see the spread).
        samples: timed blocks per callable per process.
        warmup: untimed calls per callable before any timing.
        device: ``cpu`` or ``cuda``.
        out: result store root; rows and the plot go to ``out/benchmarks/``.
        memory: measure peak memory (a child process on CPU).
        ops: kernel implementation requested (:mod:`attnbench.kernels`): ``compile``
            (default), ``fast`` or ``reference``.
        dtype: precision of the timed and memory forwards (:mod:`attnbench.precision`):
            ``float32``, or ``bfloat16`` / ``float16`` autocast; MACs are counted in float32.
    """

    variants: tuple[str, ...]
    tokens: tuple[int, ...]
    dim: int = 192
    heads: int = 3
    batch: int = 4
    level: str = "layer"
    depth: int = 12
    patch: int = 16
    threads: Optional[int] = None
    repeats: int = 3
    samples: int = 15
    warmup: int = 2
    device: str = "cpu"
    out: str = "results"
    memory: bool = True
    ops: str = "compile"
    dtype: str = precision.DEFAULT_PRECISION

    def validate(self) -> "BenchConfig":
        """Check everything that can be checked without building; return self or raise BenchError."""
        if not self.variants:
            raise BenchError("--variants: give at least one variant")
        for name in self.variants:
            registry.get_variant(name)  # VariantError names the closest match
        if not self.tokens:
            raise BenchError("--tokens: give at least one token count")
        if self.level not in LEVELS:
            raise BenchError(f"--level must be one of {', '.join(LEVELS)}, got {self.level!r}")
        for label, value in (("--dim", self.dim), ("--heads", self.heads), ("--batch", self.batch),
                             ("--repeats", self.repeats), ("--samples", self.samples), ("--depth", self.depth),
                             ("--patch", self.patch)):
            if value < 1:
                raise BenchError(f"{label} must be >= 1, got {value}")
        if self.warmup < 0:
            raise BenchError(f"--warmup must be >= 0, got {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise BenchError(f"--threads must be >= 1, got {self.threads}")
        if self.dim % self.heads:
            raise BenchError(f"--dim {self.dim} is not divisible by --heads {self.heads}")
        if self.level == "model":
            bad = [n for n in self.tokens if n < 2 or math.isqrt(n - 1) ** 2 != n - 1]
            if bad:
                raise BenchError(f"--level model needs token counts N = s*s + 1 (s*s patches + class token), "
                                 f"e.g. 65, 197, 785, 3137; got {', '.join(map(str, bad))}")
        if self.ops not in kernels.IMPLEMENTATIONS:
            raise BenchError(f"--ops must be one of {', '.join(kernels.IMPLEMENTATIONS)}, got {self.ops!r}")
        try:
            precision.check_precision(self.dtype, "--dtype")
        except ValueError as err:
            raise BenchError(str(err)) from None
        if self.device not in ("cpu", "cuda"):
            raise BenchError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise BenchError("--device cuda: no CUDA device is available here")
        return self

    @property
    def thread_count(self) -> int:
        return int(self.threads or measure.default_threads())


def parse_variants(text: str) -> tuple[str, ...]:
    """``"softmax, linear"`` -> ``("softmax", "linear")`` (duplicates dropped)."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise BenchError("--variants: give a comma-separated list, e.g. softmax,linear-angular")
    return tuple(dict.fromkeys(names))


def parse_tokens(text: str) -> tuple[int, ...]:
    """``"197,785,3137"`` -> ``(197, 785, 3137)``: positive integers, sorted, duplicates dropped."""
    values = []
    for part in text.split(","):
        part = part.strip().replace("_", "")
        if not part:
            continue
        try:
            value = int(part)
        except ValueError:
            raise BenchError(f"--tokens: {part!r} is not an integer (expected e.g. 197,785,3137)") from None
        if value < 1:
            raise BenchError(f"--tokens: token counts must be >= 1, got {value}")
        values.append(value)
    if not values:
        raise BenchError("--tokens: give a comma-separated list of token counts, e.g. 197,785,3137")
    return tuple(sorted(set(values)))


# ------------------------------------------------------------------------------- the modules

def build_module(level: str, variant: str, dim: int, heads: int, tokens: int, depth: int = 12,
                 patch: int = 16) -> nn.Module:
    """The castled module benchmarked for one (variant, N): one layer, or a timm ViT.

    The model is a ``timm`` ``VisionTransformer`` (qkv bias, MLP ratio 4, 1000 classes, as
    DeiT) with the variant in every attention slot; its image side is ``sqrt(N - 1) * patch``.
    """
    with models.seeded(0):
        if level == "layer":
            module = registry.build_attention(variant, dim, heads)
        else:
            from timm.models.vision_transformer import VisionTransformer

            side = math.isqrt(tokens - 1)
            module = VisionTransformer(img_size=side * patch, patch_size=patch, embed_dim=dim, depth=depth,
                                       num_heads=heads, attn_layer=registry.variant_class(variant))
    return models.castle(module).eval()


def input_shape(config: BenchConfig, tokens: int) -> tuple[int, ...]:
    """Input shape of one sample (no batch dim)."""
    if config.level == "layer":
        return (tokens, config.dim)
    side = math.isqrt(tokens - 1) * config.patch
    return (3, side, side)


def _build(config: BenchConfig, variant: str, tokens: int) -> nn.Module:
    return build_module(config.level, variant, config.dim, config.heads, tokens, config.depth, config.patch)


def _use_ops(ops: str, shapes: int) -> None:
    """Run this (worker) process's kernels as ``ops``; with ``compile``, let Dynamo compile each
    of ``shapes`` shapes (its default limit of 8 per function would time the rest eager)."""
    kernels.set_process_default(ops)
    if ops == "compile":
        torch_compat.raise_recompile_limit(2 * shapes)


def _build_under(ops: str, shapes: int, *args, dtype: str = precision.DEFAULT_PRECISION,
                 device: str = "cpu") -> nn.Module:
    """:func:`build_module` in a process that will run it with the ``ops`` implementation, at ``dtype``."""
    _use_ops(ops, shapes)
    return precision.at_precision(build_module(*args), dtype, device)


def _key(variant: str, tokens: int) -> str:
    return f"{variant}|{tokens}"


# ------------------------------------------------------------------------ one timing process

def floor_callable(layer: nn.Module, batch: int, tokens: int, dtype: str, device: str):
    """The layer's matmul floor: its ``qkv`` and ``proj`` projections and the core's batched matmuls
    (:meth:`AttentionVariant.core_matmuls`) on random operands, nothing else; None when the variant
    does not declare its core matmuls."""
    shapes = layer.core_matmuls(batch, tokens) if isinstance(layer, AttentionVariant) else None
    if shapes is None:
        return None
    generator = torch.Generator(device=device).manual_seed(2)
    # The core's operands and proj's input in the timed precision already, as the layer has them
    # (out of qkv): under autocast, float32 ones would add casts the layer never pays. qkv gets
    # the layer's own input, cast as the layer's is.
    operand_dtype = precision.torch_dtype(dtype)
    operands = [(torch.randn(a, device=device, generator=generator).to(operand_dtype),
                 torch.randn(b, device=device, generator=generator).to(operand_dtype))
                for a, b in shapes]
    qkv, proj = layer.qkv, layer.proj
    merged = torch.randn(batch, tokens, proj.in_features, device=device, generator=generator).to(operand_dtype)

    def floor(x: torch.Tensor) -> None:
        with precision.autocast(dtype, device):   # in the precision the layer is timed in
            qkv(x)
            proj(merged)
            for a, b in operands:
                torch.matmul(a, b)

    return floor


def _floor_key(variant: str, tokens: int) -> str:
    return f"floor|{_key(variant, tokens)}"


def _time_in_this_process(config: BenchConfig, on_block=None) -> dict[str, dict]:
    """Time every (variant, N) interleaved in this process, and at the layer level each one's
    matmul floor (:func:`floor_callable`) in the same rounds; key -> Latency as a dict."""
    torch.set_num_threads(config.thread_count)
    _use_ops(config.ops, len(config.tokens) * len(config.variants))
    callables = {}
    for tokens in config.tokens:
        for variant in config.variants:
            built = _build(config, variant, tokens).to(config.device)
            module = precision.at_precision(built, config.dtype, config.device)
            inputs = torch.Generator(device=config.device).manual_seed(1)
            x = torch.randn(config.batch, *input_shape(config, tokens), device=config.device, generator=inputs)
            callables[_key(variant, tokens)] = (module, x)
            floor = floor_callable(built, config.batch, tokens, config.dtype, config.device) \
                if config.level == "layer" else None
            if floor is not None:
                callables[_floor_key(variant, tokens)] = (floor, x)
    result = measure.time_interleaved(callables, threads=config.thread_count, warmup=config.warmup,
                                      repeats=config.samples, device=config.device, on_block=on_block)
    return {key: latency.as_dict() for key, latency in result.items()}


def _worker_main() -> int:
    """``python -m attnbench.bench --worker``: config JSON on stdin, JSON lines on stdout."""
    message = json.load(sys.stdin)
    if message.pop("tune_malloc", False):   # as the parent process is, so the rows' allocator column holds here too
        allocator.tune_malloc()
    config = BenchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in message.items()})

    def report(done: int, total: int) -> None:
        print(json.dumps({"progress": done, "total": total}), flush=True)

    result = _time_in_this_process(config, report)
    ran = {variant: kernels.implementation_of(registry.get_variant(variant), config.ops)
           for variant in config.variants}
    print(json.dumps({"result": result, "kernels": ran, "allocator": allocator.malloc_setting()}), flush=True)
    return 0


def _run_worker(config: BenchConfig, index: int, on_progress=None) -> tuple[dict[str, dict], dict[str, str], str]:
    """One timing process: (key -> latency dict, variant -> the kernel implementation that ran, its
    malloc setting)."""
    command = [sys.executable, "-m", "attnbench.bench", "--worker"]
    with tempfile.TemporaryFile(mode="w+") as errors:
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors,
                                text=True)
        proc.stdin.write(json.dumps({**dataclasses.asdict(config),
                                     "tune_malloc": allocator.malloc_setting() != "system"}))
        proc.stdin.close()
        result = None
        for line in proc.stdout:
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "progress" in message and on_progress is not None:
                on_progress(message["progress"], message["total"])
            elif "result" in message:
                result, ran, malloc = message["result"], message["kernels"], message["allocator"]
        code = proc.wait()
        if code != 0 or result is None:
            errors.seek(0)
            lines = [line for line in errors.read().strip().splitlines() if line.strip()]
            last = lines[-1] if lines else f"exit code {code}"
            raise BenchError(f"timing process {index + 1} failed: {last}")
    return result, ran, malloc


# --------------------------------------------------------------------------------- analysis

def crossover(tokens: Sequence[int], variant_ms: Sequence[float],
              baseline_ms: Sequence[float]) -> tuple[Optional[float], str]:
    """Token count at which a variant becomes faster than the baseline.

    Interpolated on log-log scale between the last measured N where the variant is not faster
    and the next one where it is (the first such crossing).

    Returns:
        ``(N, "")`` for a crossing inside the range; ``(None, "below range")`` when the variant
        is already faster at the smallest N; ``(None, "none in range")`` when never faster.
    """
    ratios = [v / b for v, b in zip(variant_ms, baseline_ms)]
    if not ratios:
        return None, "none in range"
    if ratios[0] < 1.0:
        return None, "below range"
    for i in range(1, len(ratios)):
        if ratios[i - 1] >= 1.0 > ratios[i]:
            lo, hi = math.log(tokens[i - 1]), math.log(tokens[i])
            r_lo, r_hi = math.log(ratios[i - 1]), math.log(ratios[i])
            return math.exp(lo + (0.0 - r_lo) * (hi - lo) / (r_hi - r_lo)), ""
    return None, "none in range"


@dataclasses.dataclass
class BenchResult:
    """What a benchmark produced: rows (as stored), the crossovers and the files written."""

    config: BenchConfig
    rows: list[dict[str, Any]]
    crossovers: dict[str, tuple[Optional[float], str]]
    rows_path: Optional[Path] = None
    plot_path: Optional[Path] = None


def _aggregate(config: BenchConfig, processes: list[dict[str, dict]], static: dict[str, dict],
               env: dict[str, Any], run_id: str, ran: dict[str, str]) -> tuple[list[dict], dict]:
    """Rows (columns: :mod:`attnbench.results.schema`) and crossovers; ``ran``: variant -> kernel that ran."""
    created = datetime.datetime.now(datetime.timezone.utc)
    rows = []
    for tokens in config.tokens:
        for variant in config.variants:
            key = _key(variant, tokens)
            medians = [p[key]["median_ms"] for p in processes]
            median = statistics.median(medians)
            row = {
                "kind": "benchmark", "run_id": run_id, "created_at": created, "level": config.level,
                **provenance.variant_columns(variant, {}, config.ops), "kernel_implementation": ran[variant],
                "tokens": tokens, "dim": config.dim, "heads": config.heads,
                "depth": config.depth if config.level == "model" else None,
                "patch_size": config.patch if config.level == "model" else None,
                "measure_batch": config.batch, "processes": len(processes), "samples_per_process": config.samples,
                "warmup_calls": config.warmup, "precision": config.dtype,
                **static[key],
                "latency_median_ms": median,
                "latency_iqr_ms": statistics.median(p[key]["iqr_ms"] for p in processes),
                "latency_min_ms": min(medians), "latency_max_ms": max(medians),
                "latency_spread_pct": 100.0 * (max(medians) - min(medians)) / median if median > 0 else math.nan,
                "latency_process_ms": json.dumps([round(m, 4) for m in medians]),
                "samples_per_s": config.batch / (median / 1e3) if median > 0 else math.nan,
                **_floor_columns(processes, _floor_key(variant, tokens), median),
                **env,
            }
            rows.append(row)
    by_key = {(r["variant"], r["tokens"]): r for r in rows}
    crossovers: dict[str, tuple[Optional[float], str]] = {}
    for row in rows:
        base = by_key.get((BASELINE, row["tokens"]))
        row["speedup_vs_softmax"] = base["latency_median_ms"] / row["latency_median_ms"] if base else None
    if BASELINE in config.variants:
        base_ms = [by_key[(BASELINE, n)]["latency_median_ms"] for n in config.tokens]
        for variant in config.variants:
            if variant == BASELINE:
                continue
            ms = [by_key[(variant, n)]["latency_median_ms"] for n in config.tokens]
            crossovers[variant] = crossover(config.tokens, ms, base_ms)
    for row in rows:
        value, note = crossovers.get(row["variant"], (None, "baseline" if row["variant"] == BASELINE
                                                      else "no softmax baseline"))
        row["crossover_tokens"] = value
        row["crossover_note"] = note
    return rows, crossovers


def _floor_columns(processes: list[dict[str, dict]], key: str, median: float) -> dict[str, Any]:
    """``floor_ms`` (median over processes) and ``floor_ratio`` (the layer's latency over it)."""
    if any(key not in p for p in processes):
        return {"floor_ms": None, "floor_ratio": None}
    floor = statistics.median(p[key]["median_ms"] for p in processes)
    return {"floor_ms": floor, "floor_ratio": median / floor if floor > 0 else None}


def run_benchmark(config: BenchConfig, progress=None, write: bool = True) -> BenchResult:
    """Run the benchmark; store rows and write the plot under ``config.out``.

    Args:
        config: what to measure.
        progress: a ``rich.progress.Progress`` to report to, or None.
        write: write rows and the plot (False: only return them).

    Raises:
        BenchError: invalid configuration or a failed measurement.
        attnbench.registry.VariantError: an unknown variant.
    """
    config.validate()
    threads = config.thread_count
    config = dataclasses.replace(config, threads=threads)  # workers use exactly this count
    env = provenance.environment(config.device, threads)  # before any work: the load is others'
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(config, env, progress, write)
    finally:
        torch.set_num_threads(previous_threads)


def _run(config: BenchConfig, env: dict[str, Any], progress, write: bool) -> BenchResult:
    threads = config.thread_count
    run_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)

    def task(description: str, total: int):
        if progress is None:
            return lambda advance=1, completed=None: None
        task_id = progress.add_task(description, total=total)

        def update(advance=1, completed=None):
            if completed is not None:
                progress.update(task_id, completed=completed)
            else:
                progress.advance(task_id, advance)
        return update

    pairs = [(variant, tokens) for tokens in config.tokens for variant in config.variants]
    static: dict[str, dict] = {}
    step = task("counting MACs", len(pairs))
    for variant, tokens in pairs:
        try:
            module = _build(config, variant, tokens)
            macs = measure.count_macs(module, input_shape(config, tokens))
        except (ValueError, RuntimeError) as err:
            raise BenchError(f"{variant} at {tokens} tokens: {err}") from None
        layers = [m for m in module.modules() if isinstance(m, AttentionVariant)]
        analytic = sum(layer.macs(tokens) for layer in layers)
        static[_key(variant, tokens)] = {"macs": macs, "attention_macs": analytic,
                                         "params": measure.count_params(module)}
        step()

    if config.memory:
        step = task("peak memory (child process)" if config.device == "cpu" else "peak memory", 1)
        import functools

        jobs = [(functools.partial(_build_under, config.ops, len(pairs), config.level, v, config.dim, config.heads, n, config.depth,
                                   config.patch, dtype=config.dtype, device=config.device), (config.batch, *input_shape(config, n))) for v, n in pairs]
        previous = kernels.set_process_default(config.ops)   # CUDA measures here; the setting is put back
        try:
            memories = measure.peak_memory_many(jobs, device=config.device, threads=threads)
        except RuntimeError as err:
            raise BenchError(str(err)) from None
        finally:
            kernels.set_process_default(previous)
        for (variant, tokens), memory in zip(pairs, memories):
            static[_key(variant, tokens)].update(forward_memory_mb=memory.forward_bytes / 2**20,
                                                 process_peak_memory_mb=memory.peak_bytes / 2**20,
                                                 memory_method=memory.method)
        step()

    processes, ran, mallocs = [], {variant: set() for variant in config.variants}, set()
    for index in range(config.repeats):
        step = task(f"timing, process {index + 1}/{config.repeats}", len(pairs) * config.samples)
        latencies, kernels_ran, malloc = _run_worker(config, index, lambda done, total: step(completed=done))
        processes.append(latencies)
        mallocs.add(malloc)
        for variant, implementation in kernels_ran.items():
            ran[variant].add(implementation)
    env = {**env, "allocator": " + ".join(sorted(mallocs))}   # what the timing processes ran with
    # Where compiling fell back in some processes only, the row names both ('compile+fast').
    labels = {variant: "+".join(sorted(found)) for variant, found in ran.items()}

    rows, crossovers = _aggregate(config, processes, static, env, run_id, labels)
    result = BenchResult(config, rows, crossovers)
    if write:
        from attnbench.results import store  # lazy: timing workers need no pandas

        name = f"benchmarks/bench-{run_id}"
        result.rows_path = store.write_rows(config.out, rows, name)
        import pandas as pd

        from attnbench.results.plots import scaling_plot

        result.plot_path = scaling_plot(pd.DataFrame(result.rows), Path(config.out) / (name + ".png"))
    return result


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        sys.exit(_worker_main())
    sys.exit("usage: python -m attnbench.bench --worker  (internal; use `attnbench bench`)")
