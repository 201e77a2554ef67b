"""``attnbench bench``: the scaling benchmark of variants against token count."""
from __future__ import annotations

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
    for item in bench.render(result):
        console.print(item)
    console.print(escape(f"rows: {result.rows_path}\nplot: {result.plot_path}"), highlight=False)
