"""``attnbench bench``: the scaling benchmark of variants against token count, and its table."""
from __future__ import annotations

from typing import Optional

import click
from rich.markup import escape

from attnbench import registry
from attnbench.cli._common import console, err_console, fail
from attnbench.precision_names import DEFAULT_PRECISION, PRECISION_NAMES


@click.command("bench")
@click.option("--variants", default="softmax,linear,linear-angular,castling", show_default=True,
              help="Comma-separated variant names; softmax is the crossover baseline.")
@click.option("--tokens", default="197,785,3137", show_default=True, help="Comma-separated token counts N.")
@click.option("--dim", default=192, show_default=True, help="Width C.")
@click.option("--heads", default=3, show_default=True, help="Attention heads h.")
@click.option("--batch", default=4, show_default=True, help="Batch size of timed forwards (MACs are per sample).")
@click.option("--level", default="layer", show_default=True, help="layer: one attention layer; model: a timm ViT.")
@click.option("--depth", default=12, show_default=True, help="Model level: number of blocks.")
@click.option("--patch", default=16, show_default=True, help="Model level: patch size (image side = sqrt(N-1)*patch).")
@click.option("--threads", type=int, default=None, help="Torch threads [default: every core available].")
@click.option("--repeats", default=3, show_default=True, help="Fresh timing processes (spread is across them).")
@click.option("--samples", default=15, show_default=True, help="Timed blocks per variant and N in each process.")
@click.option("--warmup", default=2, show_default=True, help="Untimed calls per variant and N before any timing.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--out", default="results", show_default=True, help="Result store root (rows and plot in out/benchmarks/).")
@click.option("--memory/--no-memory", default=True, show_default=True, help="Measure peak memory of one forward.")
@click.option("--ops", default="compile", show_default=True,
              help="Built-in kernels: compile (torch.compile, eager fallback), fast (eager) or reference.")
@click.option("--dtype", default=DEFAULT_PRECISION, show_default=True, type=click.Choice(PRECISION_NAMES),
              help="Precision of the timed forwards: float32, or bfloat16/float16 autocast (attnbench.precision).")
def bench_command(variants, tokens, dim, heads, batch, level, depth, patch, threads, repeats, samples, warmup,
                  device, out, memory, ops, dtype) -> None:
    """Scaling benchmark: MACs, parameters, latency and memory of variants against token count."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from attnbench import bench  # lazy: pulls in timm and the counters

    try:
        config = bench.BenchConfig(
            variants=bench.parse_variants(variants), tokens=bench.parse_tokens(tokens), dim=dim, heads=heads,
            batch=batch, level=level, depth=depth, patch=patch, threads=threads, repeats=repeats,
            samples=samples, warmup=warmup, device=device, out=out, memory=memory, ops=ops, dtype=dtype).validate()
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=err_console, transient=True) as progress:
            result = bench.run_benchmark(config, progress=progress)
    except (bench.BenchError, registry.VariantError) as err:
        fail(str(err))
    for item in render(result):
        console.print(item)
    console.print(escape(f"rows: {result.rows_path}\nplot: {result.plot_path}"), highlight=False)


def _threads_label(count: int) -> str:
    return f"{count} thread" + ("" if count == 1 else "s")


def _si(value: Optional[float]) -> str:
    if value is None:
        return "-"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.0f}"


def render(result) -> list:
    """Rich renderables: the results table, one crossover line per variant, a load warning."""
    from attnbench import kernels
    from attnbench.fitted_table import FittedColumn, FittedTable
    from attnbench.results.schema import BASELINE

    config = result.config
    speeds = [row.get("speedup_vs_softmax") for row in result.rows]
    mems = [row.get("forward_memory_mb") for row in result.rows]
    columns = [  # (header, cells, legend); a header's second line keeps its column narrow
        ("variant", [row["variant"] for row in result.rows], ""),
        ("N", [str(row["tokens"]) for row in result.rows], "N: tokens."),
        ("MACs", [_si(row["macs"]) for row in result.rows], "MACs per sample (counted, 1 MAC = 2 FLOPs)."),
        ("attn MACs\nanalytic", [_si(row["attention_macs"]) for row in result.rows],
         "attn MACs: analytic MACs of the attention layers."),
        ("params", [_si(row["params"]) for row in result.rows], ""),
        ("ms", [f"{r['latency_median_ms']:.3g}" if r["latency_median_ms"] < 100 else f"{r['latency_median_ms']:.0f}"
                for r in result.rows], "ms: median over processes of per-process medians."),
        ("IQR", [f"{100.0 * r['latency_iqr_ms'] / r['latency_median_ms']:.0f}%" if r["latency_median_ms"] else "-"
                 for r in result.rows], "IQR: within a process, % of ms."),
        ("spread", [f"{row['latency_spread_pct']:.0f}%" for row in result.rows],
         "spread: (max-min)/median across processes."),
        ("vs\nsoftmax", ["-" if speed is None else f"{speed:.2f}x" for speed in speeds],
         "vs softmax: softmax's ms / this ms."),
        ("x\nfloor", ["-" if row.get("floor_ratio") is None else f"{row['floor_ratio']:.2f}x" for row in result.rows],
         "x floor: ms / the layer's matmul floor (its qkv and proj projections and its core's batched matmuls, "
         "timed alone in the same rounds)."),
        ("mem\nMiB", ["-" if mem is None else f"{mem:.1f}" for mem in mems],
         "mem: peak resident rise during one forward (batch)."),
    ]
    legends = {header.replace("\n", " "): text for header, _, text in columns}
    table = FittedTable(
        [FittedColumn(header.replace("\n", " "), header, cells, "left" if header == "variant" else "right")
         for header, cells, _ in columns],
        title=f"attnbench bench: {config.level} level, C={config.dim}, h={config.heads}, batch {config.batch}, "
              f"{config.device}, {config.dtype}, {_threads_label(config.thread_count)}, {config.repeats} processes "
              f"x {config.samples} blocks, ops {config.ops}",
        priority=("variant", "N", "ms", "vs softmax", "x floor", "MACs", "spread", "IQR", "mem MiB", "attn MACs analytic",
                  "params"),
        legend=lambda shown: " ".join(legends[name] for name in shown if legends[name]),
        section_every=len(config.variants),   # rows go token count by token count: a rule between them
        omitted_note=lambda omitted, width: f"Left out to fit {width} columns: {', '.join(omitted)} (the rows "
                                            f"file holds every value).")
    lines = [table]
    other = {r["variant"]: r["kernel_implementation"] for r in result.rows
             if r["kernel_implementation"] not in (config.ops, kernels.SINGLE)}
    if other:
        lines.append(escape(f"kernels: asked for {config.ops}; ran "
                            + ", ".join(f"{v}: {k}" for v, k in other.items())))
    if BASELINE not in config.variants:
        lines.append("crossover: not computed (add softmax to --variants as the baseline)")
    for variant, (value, note) in result.crossovers.items():
        where = f"~{value:,.0f} tokens" if value is not None else (
            f"below range (already faster at {config.tokens[0]} tokens)" if note == "below range"
            else f"none in range ({config.tokens[0]}..{config.tokens[-1]} tokens)")
        lines.append(escape(f"crossover, {variant} faster than softmax: {where}"))
    load = result.rows[0].get("load_avg_1m") if result.rows else None
    if config.device == "cpu" and load is not None and load > 0.5:
        lines.append(f"[yellow]note:[/] the machine was busy when the benchmark started (1-min load {load:.1f} "
                     f"on {result.rows[0].get('cpu_count')} cores); CPU timings with {_threads_label(config.thread_count)} "
                     f"are inflated and spread widely when cores are shared.")
    return lines
