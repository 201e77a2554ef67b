"""The ``attnbench`` command line. Each command parses its arguments and hands over to a module;
errors the user can fix are printed as one line, with a non-zero exit and no traceback.
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from attnbench import allocator, kernels, registry
from attnbench.precision import PRECISIONS

console = Console()
err_console = Console(stderr=True)


def fail(message: str) -> "NoReturn":  # noqa: F821
    """Print ``error: message`` on stderr and exit 2 (the message is shown as written, never as markup)."""
    err_console.print(f"[bold red]error:[/] {escape(str(message))}", highlight=False, soft_wrap=True)
    sys.exit(2)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    err_console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)


@click.group()
@click.version_option(package_name="attnbench")
def main() -> None:
    """Benchmark and ablate attention variants inside timm vision transformers."""
    warnings.showwarning = _show_warning
    try:
        kernels.requested()   # a bad ATTNBENCH_OPS is one line now, not a traceback mid-sweep
    except ValueError as err:
        fail(str(err))
    allocator.tune_malloc()   # training steps stop faulting their buffers back in (ATTNBENCH_MALLOC=system: off)


@main.command("variants")
@click.option("--check", is_flag=True, help="Run the conformance checks on every variant.")
def variants_command(check: bool) -> None:
    """List every registered attention variant with its options."""
    table = Table(title="attnbench variants")
    for column in ("name", "distribution", "options (defaults)", "description"):
        table.add_column(column, overflow="fold")
    if check:
        table.add_column("conformance", overflow="fold")
    failed = 0
    for name in registry.list_variants():
        try:
            info = registry.variant_info(name)
        except registry.VariantError as err:
            warnings.warn(str(err))
            failed += 1
            continue
        options = "\n".join(spec.describe() for spec in info.options) or "-"
        row = [escape(name), escape(info.distribution), escape(options), escape(info.description)]
        if check:
            row.append(_conformance_cell(name))
            failed += not row[-1].startswith("[green]")
        table.add_row(*row)
    console.print(table)
    if check and failed:
        fail(f"{failed} variant(s) failed to load or failed conformance checks")


def _conformance_cell(name: str) -> str:
    from attnbench.testing import run_checks  # lazy: pulls in timm and the counters

    results = run_checks(name)
    failures = [r for r in results if not r.passed]
    if not failures:
        return f"[green]{len(results)}/{len(results)} passed[/]"
    return "[red]" + "\n".join(escape(f"{r.check}: {r.message}") for r in failures) + "[/]"


@main.command("sweep")
@click.argument("experiment_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--storage", default=None, help="Optuna storage URL (default: sqlite file under the results folder).")
@click.option("--results", "results_dir", default="results", show_default=True, type=click.Path(path_type=Path),
              help="Results folder; rows go to RESULTS/<study>/trials/.")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), show_default=True)
@click.option("--dry-run", is_flag=True,
              help="Check the experiment and print the resolved plan (trials, MACs per configuration); train nothing.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Local worker processes sharing the study.")
@click.option("--worker-index", default=None, type=click.IntRange(min=0),
              help="Fix this worker's slot: its sampler seed is seed x 1000 + INDEX (grid: one seed for all) "
                   "[default: the study's next free slot].")
@click.option("--retry-failed", is_flag=True,
              help="Run the study's failed trials again (those that failed under an earlier version of the "
                   "file always are).")
def sweep_command(experiment_file: Path, storage, results_dir: Path, device: str, dry_run: bool, workers: int,
                  worker_index: int, retry_failed: bool) -> None:
    """Run (or resume) the Optuna study described by EXPERIMENT_FILE.

    Exit status: 0 every trial finished, 1 some failed (named with their reasons), 2 the experiment
    was refused (nothing written), 130 interrupted (run the same command again to resume).
    """
    from attnbench.experiment import ExperimentError, load_experiment
    from attnbench.experiment_check import ExperimentRefused, check_experiment

    try:
        experiment = load_experiment(experiment_file)
        if dry_run or workers > 1:
            checked = check_experiment(experiment, device=device, results_dir=results_dir)
    except ExperimentError as err:
        fail(str(err))
    except ExperimentRefused as err:
        _refuse(err)
    if dry_run:
        _print_plan(checked)
    elif workers > 1:
        _run_workers(experiment_file, experiment, storage, results_dir, device, workers, worker_index,
                     retry_failed)
    else:
        _run_sweep(experiment, storage, results_dir, device, worker_index, retry_failed)


def _refuse(refused) -> "NoReturn":  # noqa: F821
    """Every problem of a refused experiment, one line each; exit 2."""
    for problem in refused.problems:
        err_console.print(f"[bold red]error:[/] {escape(str(problem))}", highlight=False, soft_wrap=True)
    sys.exit(2)


def _run_sweep(experiment, storage, results_dir: Path, device: str, worker_index: int, retry_failed: bool) -> None:
    from attnbench import sweep
    from attnbench.experiment_check import ExperimentRefused

    display = RichSweepDisplay(experiment)
    try:
        with display:
            summary = sweep.run_sweep(experiment, results_dir=results_dir, storage=storage, device=device,
                                      worker_index=worker_index, display=display, retry_failed=retry_failed)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted:[/] finished trials are stored; run the same command again "
                          "to resume.")
        sys.exit(130)
    except ExperimentRefused as err:
        _refuse(err)
    except sweep.StorageError as err:
        fail(str(err))
    pruned = f", {summary.pruned} pruned" if summary.pruned else ""
    console.print(f"study [bold]{escape(summary.study)}[/]: {summary.done} trials finished "
                  f"({summary.failed} failed{pruned}), {summary.ran_here} run now; rows in "
                  f"{escape(str(summary.results))}/trials; storage {escape(summary.storage)}", highlight=False)
    if summary.failures:
        for failure in summary.failures:
            err_console.print(f"[red]failed:[/] trial {failure.key} ({escape(failure.label)}): "
                              f"{escape(failure.reason)}", highlight=False, soft_wrap=True)
        err_console.print("fix the cause and run the same command again (with --retry-failed if the experiment "
                          "file is unchanged)", highlight=False)
        sys.exit(1)
    console.print(f"next: [bold]attnbench report --results {escape(str(results_dir))}[/]", highlight=False)


def _run_workers(experiment_file: Path, experiment, storage, results_dir: Path, device: str, workers: int,
                 first_index, retry_failed: bool) -> None:
    """Start ``workers`` local processes on one study; each pulls trials from the shared storage.
    Exits with the most telling of their statuses: 130 if interrupted, else 2, 1, 0."""
    import subprocess

    from attnbench import sweep

    url = sweep.storage_url(experiment, results_dir, storage)
    try:
        study = sweep.open_study(experiment, url, experiment.sampler_seed)   # once, before the workers race
        if retry_failed:   # here, once: each worker queuing them again would run them several times
            with sweep.study_lock(url, experiment.name):
                sweep.requeue_failures(study, experiment, everything=True)
    except sweep.StorageError as err:
        fail(str(err))
    command = [sys.executable, "-m", "attnbench.cli", "sweep", str(experiment_file), "--storage", url,
               "--results", str(results_dir), "--device", device]
    # Without --worker-index each worker takes the study's next free slot for its sampler seed, so
    # workers started with --workers on several machines never share a seed.
    indices = [[] if first_index is None else ["--worker-index", str(first_index + i)] for i in range(workers)]
    procs = [subprocess.Popen(command + extra) for extra in indices]
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.wait()
        sys.exit(130)
    for code in (130, 2, 1):
        if code in codes:
            err_console.print(f"{codes.count(code)} of {workers} workers exited with status {code} "
                              f"(statuses {codes})", highlight=False)
            sys.exit(code)
    if any(codes):
        fail(f"{sum(1 for c in codes if c)} of {workers} workers exited with an error (statuses {codes})")


def _print_plan(checked) -> None:
    from attnbench import sweep

    experiment = checked.experiment
    arch, rows = sweep.plan(checked)
    table = Table(title=f"plan of study '{escape(experiment.name)}' ({escape(experiment.source)})")
    for column in ("configuration", "variant", "options", "tokens", "MACs (inference)", "attention MACs", "params"):
        table.add_column(column, overflow="fold")
    for config, costs in rows:
        table.add_row(escape(config.label), escape(config.variant), escape(json.dumps(config.options, sort_keys=True)),
                      str(costs["num_tokens"]), f"{costs['macs']:,}", f"{costs['attention_macs']:,}",
                      f"{costs['params']:,}")
    console.print(table)
    n_trials = experiment.n_trials()
    continuous = "" if experiment.plan() else \
        f" (continuous search space: configurations sampled by {experiment.sampler})"
    pruning = f"; pruning on (never the baseline '{experiment.baseline}')" if experiment.pruning and \
        experiment.baseline else "; pruning on" if experiment.pruning else ""
    console.print(f"{n_trials if n_trials is not None else 'time-limited'} trials x {len(experiment.seeds)} seeds "
                  f"{list(experiment.seeds)}; sampler {experiment.sampler}; objectives "
                  f"{', '.join(f'{o.direction} {o.metric}' for o in experiment.objectives)}; model {arch} "
                  f"on {experiment.dataset}, device {checked.device}{escape(continuous)}{escape(pruning)}",
                  highlight=False)


class RichSweepDisplay:
    """Trials done, running and failed, and the best so far, as a Rich live progress bar."""

    def __init__(self, experiment):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.experiment = experiment
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=err_console)
        self.task = self.progress.add_task(f"sweep {escape(experiment.name)}", total=None, status="")

    def __enter__(self):
        return self   # the bar starts with the first update: a refused experiment prints only its errors

    def __exit__(self, *exc):
        self.progress.stop()

    def update(self, study, state, target) -> None:
        self.progress.start()
        best = self._best(study)
        status = f"running {state.running}  failed {state.failed}" + (f"  best {best}" if best else "")
        self.progress.update(self.task, completed=state.done, total=target, status=escape(status))

    def log(self, message: str) -> None:
        self.progress.console.print(f"[red]{escape(message)}[/]", highlight=False)

    def _best(self, study) -> str:
        try:
            if len(self.experiment.objectives) > 1:
                return f"{len(study.best_trials)} on the Pareto front"
            trial = study.best_trial
        except ValueError:  # no complete trial yet
            return ""
        return f"{self.experiment.objectives[0].metric}={trial.value:.4g} ({trial.user_attrs.get('label', '')})"


@main.command("bench")
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
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(list(PRECISIONS)),
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


@main.command("report")
@click.option("--results", "results_dir", default="results", show_default=True, type=click.Path(path_type=Path),
              help="Result store to read (every Parquet file below it).")
@click.option("--study", "studies", multiple=True, help="Only this study (repeatable).")
@click.option("--label", "labels", multiple=True, help="Only this configuration label (repeatable).")
@click.option("--variant", "variants", multiple=True, help="Only this variant (repeatable).")
@click.option("--filter", "filters", multiple=True,
              help="Keep rows matching a pandas query on the summary's columns, e.g. 'macs<1e8' (repeatable).")
@click.option("--sort", default=None, help="Sort by this column [default: study, then top-1 best first].")
@click.option("--desc", is_flag=True, help="Sort descending.")
@click.option("--columns", default=None, help="Comma-separated columns [default: the paper table; csv/json: all].")
@click.option("--baseline", default=None, help="Configuration label to compare with [default: softmax, if present].")
@click.option("--format", "fmt", default="table", show_default=True,
              type=click.Choice(["table", "csv", "markdown", "json"]))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the output here, not to stdout.")
@click.option("--plots", "plots_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the PNG plots [default: RESULTS/plots].")
@click.option("--no-plots", is_flag=True, help="Write no PNG plots.")
@click.option("--html", "html_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write one HTML page with the tables and the plots embedded.")
@click.option("--strict", is_flag=True,
              help="Fail on a result file that cannot be read, instead of skipping it with a warning.")
def report_command(results_dir: Path, studies, labels, variants, filters, sort, desc, columns, baseline, fmt, out,
                   plots_dir, no_plots, html_file, strict) -> None:
    """Tables, Pareto fronts and plots: one row per configuration, mean ± std over seeds."""
    from attnbench.results import report

    try:
        loaded = report.load_store(results_dir, strict=strict,
                                   on_skip=lambda skipped: _show_warning(skipped, UserWarning, "", 0))
        trials, bench = loaded.trials, loaded.bench
        if loaded.skipped:
            _show_warning(f"{len(loaded.skipped)} result file(s) under '{results_dir}' skipped (--strict to fail "
                          f"instead)", UserWarning, "", 0)
        if trials.empty and fmt != "table":
            raise report.ReportError(f"no trial rows under '{results_dir}' to export (only benchmark rows)")
        frame = trials if trials.empty else report.select(report.summarize(trials, baseline), studies, labels,
                                                          variants, filters, sort, desc)
        chosen = report.check_columns(frame, columns.split(","), "--columns") if columns and not trials.empty \
            else None
    except report.ReportError as err:
        fail(str(err))
    notes = err_console if fmt != "table" and out is None else console
    if trials.empty:
        notes.print(escape(f"no trial rows under '{results_dir}': no table, plots from benchmark rows only"))
    elif frame.empty:
        fail("no configuration matches --study/--label/--variant/--filter")
    elif fmt == "table":
        _print_tables(report.rich_tables(frame, chosen or report.DEFAULT_COLUMNS), out)
    elif out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report.export(frame, fmt, chosen))
    else:
        click.echo(report.export(frame, fmt, chosen), nl=False)
    if out is not None:
        notes.print(escape(f"{fmt}: {out}"), highlight=False)
    bench = bench[bench["variant"].isin(variants)] if variants and "variant" in bench else bench
    _report_plots(frame, trials, bench, None if no_plots else plots_dir or results_dir / "plots", html_file,
                  chosen or report.DEFAULT_COLUMNS, notes)


def _print_tables(tables: list, out) -> None:
    if out is None:
        for table in tables:
            console.print(table)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as handle:
        Console(file=handle, width=200).print(*tables)


def _report_plots(frame, trials, bench, plots_dir, html_file, columns, notes) -> None:
    """Write the PNG plots to ``plots_dir`` (None: none) and the HTML page; say where."""
    import tempfile

    from attnbench.results import plots, report

    if plots_dir is None and html_file is None:
        return
    with tempfile.TemporaryDirectory() as scratch:
        images = plots.write_plots(frame, trials, bench, plots_dir or Path(scratch))
        if html_file is not None:
            html_file.parent.mkdir(parents=True, exist_ok=True)
            html_file.write_text(report.html_page(frame, columns, images))
            notes.print(escape(f"html: {html_file}"), highlight=False)
    if plots_dir is not None:
        names = ", ".join(p.name for p in images) or "none (no data to plot)"
        notes.print(escape(f"plots in {plots_dir}/: {names}"), highlight=False)


if __name__ == "__main__":  # pragma: no cover
    main()
