"""The ``attnbench`` command line. Each command parses its arguments and hands over to a module;
errors the user can fix are printed as one line, with a non-zero exit and no traceback.
"""
from __future__ import annotations

import json
import re
import sys
import warnings
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from attnbench import allocator, registry

console = Console()
err_console = Console(stderr=True)


def fail(message: str) -> "NoReturn":  # noqa: F821
    """Print ``error: message`` on stderr and exit 2."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(2)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    err_console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)


@click.group()
@click.version_option(package_name="attnbench")
def main() -> None:
    """Benchmark and ablate attention variants inside timm vision transformers."""
    warnings.showwarning = _show_warning
    allocator.tune_malloc()   # training steps stop faulting their buffers back in (ATTNBENCH_MALLOC=system: off)


def parse_key_values(items, what: str) -> dict:
    """``["threshold=0.5", "residual=none"]`` -> ``{"threshold": 0.5, "residual": "none"}``.

    Values are read as YAML scalars (``0.5``, ``1e-6``, ``true``, ``head``); ``what`` names the
    option in the error: one line, exit 2.
    """
    parsed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            fail(f"{what} '{item}': expected KEY=VALUE")
        parsed[key.strip()] = _scalar(value.strip())
    return parsed


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _scalar(text: str):
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and _NUMBER.fullmatch(value):   # YAML 1.1 reads 1e-6 as a string
        return float(value)
    return value


def _variant_or_fail(name: str):
    try:
        return registry.variant_info(name)
    except registry.VariantError as err:
        fail(str(err))


@main.command("variants")
@click.argument("names", nargs=-1, metavar="[NAME]...")
@click.option("--check", is_flag=True, help="Run the conformance checks on each NAME [default: every variant].")
@click.option("--option", "option_items", multiple=True, metavar="KEY=VALUE",
              help="With one NAME: an option to describe or check it with (repeatable; values read as YAML).")
def variants_command(names: tuple, check: bool, option_items: tuple) -> None:
    """List every registered attention variant; with NAME, each option's type, default, allowed values and help."""
    from attnbench.variant import parse_options

    if option_items and len(names) != 1:
        fail(f"--option needs exactly one variant NAME, got {len(names)}")
    infos = [_variant_or_fail(name) for name in names]
    options = parse_key_values(option_items, "--option")
    if options:
        try:
            parse_options(infos[0].cls, options)
        except ValueError as err:
            fail(str(err))
    if not names:
        _print_variant_list(check)
        return
    failed = 0
    for info in infos:
        console.print(_variant_detail(info, options))
        if check:
            failed += _print_checks(info.name, options)
    if failed:
        fail(f"{failed} variant(s) failed conformance checks")


def _print_variant_list(check: bool) -> None:
    from rich.text import Text

    infos, failed = [], 0
    for name in registry.list_variants():
        try:
            infos.append(registry.variant_info(name))
        except registry.VariantError as err:
            warnings.warn(str(err))
            failed += 1
    table = Table(title="attnbench variants")
    # Names are never folded: each column is as wide as its longest name.
    for column, values in (("name", [i.name for i in infos]), ("distribution", [i.distribution for i in infos])):
        table.add_column(column, no_wrap=True, min_width=max(map(len, values), default=0))
    if check:
        table.add_column("conformance", overflow="fold")
    else:
        table.add_column("description", overflow="fold", ratio=3)
        table.add_column("options", overflow="fold", ratio=2)
    for info in infos:
        row = [Text(info.name), Text(info.distribution)]
        if check:
            cell = _conformance_cell(info.name)
            failed += not cell.plain.endswith(" passed") or "/" not in cell.plain
            row.append(cell)
        else:
            row += [Text(info.description), Text(", ".join(spec.name for spec in info.options) or "-")]
        table.add_row(*row)
    console.print(table)
    if not check:
        console.print("attnbench variants NAME: the type, default, allowed values and help of each option",
                      highlight=False)
    if check and failed:
        fail(f"{failed} variant(s) failed to load or failed conformance checks")


def _variant_detail(info, options: dict):
    """One variant: where it comes from, what it is, and a table of its options."""
    from rich.console import Group
    from rich.text import Text

    head = Text.assemble((info.name, "bold"), f"  from distribution {info.distribution} ({info.target})")
    parts = [head, Text(info.description)]
    if options:
        parts.append(Text("with " + ", ".join(f"{k}={v!r}" for k, v in options.items())))
    if not info.options:
        parts.append(Text("no options of its own"))
        return Group(*parts)
    rows = [(spec.name, spec.kind, repr(spec.default), spec.allowed().replace(" | ", "\n") or "any",
             spec.help or "-") for spec in info.options]
    table = Table()
    # No column is narrower than its longest word, so names and values wrap between words, never inside.
    for index, column in enumerate(("option", "type", "default", "allowed", "help")):
        longest = max(len(word) for row in rows for word in row[index].split() or [""])
        table.add_column(column, overflow="fold", min_width=longest)
    for row in rows:
        table.add_row(*map(Text, row))
    parts.append(table)
    return Group(*parts)


def _print_checks(name: str, options: dict) -> int:
    """Run the conformance checks on one variant, print one row per check; 1 if any failed, else 0."""
    from rich.text import Text

    from attnbench.testing import run_checks  # lazy: pulls in timm and the counters

    results = run_checks(name, options)
    table = Table(title=f"conformance of {name}")
    table.add_column("check", no_wrap=True)
    table.add_column("result", no_wrap=True)
    table.add_column("message", overflow="fold")
    for r in results:
        table.add_row(Text(r.check), Text("passed", "green") if r.passed else Text("FAILED", "red"),
                      Text(r.message))
    console.print(table)
    passed = sum(r.passed for r in results)
    console.print(f"{name}: {passed}/{len(results)} passed", highlight=False)
    return int(passed < len(results))


def _conformance_cell(name: str):
    from rich.text import Text

    from attnbench.testing import run_checks  # lazy: pulls in timm and the counters

    results = run_checks(name)
    failures = [r for r in results if not r.passed]
    if not failures:
        return Text(f"{len(results)}/{len(results)} passed", "green")
    return Text("\n".join(f"{r.check}: {r.message}" for r in failures), "red")


@main.command("sweep")
@click.argument("experiment_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--storage", default=None, help="Optuna storage URL (default: sqlite file under the results folder).")
@click.option("--results", "results_dir", default="results", show_default=True, type=click.Path(path_type=Path),
              help="Results folder; rows go to RESULTS/<study>/trials/.")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), show_default=True)
@click.option("--dry-run", is_flag=True, help="Print the resolved plan (trials, MACs per configuration); train nothing.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Local worker processes sharing the study.")
@click.option("--worker-index", default=None, type=click.IntRange(min=0),
              help="Fix this worker's slot: its sampler seed is seed x 1000 + INDEX (grid: one seed for all) "
                   "[default: the study's next free slot].")
def sweep_command(experiment_file: Path, storage, results_dir: Path, device: str, dry_run: bool, workers: int,
                  worker_index: int) -> None:
    """Run (or resume) the Optuna study described by EXPERIMENT_FILE."""
    from attnbench.experiment import ExperimentError, load_experiment

    try:
        experiment = load_experiment(experiment_file)
    except ExperimentError as err:
        fail(str(err))
    if dry_run:
        _print_plan(experiment)
        return
    if workers > 1:
        _run_workers(experiment_file, experiment, storage, results_dir, device, workers, worker_index)
        return
    _run_sweep(experiment, storage, results_dir, device, worker_index)


def _run_sweep(experiment, storage, results_dir: Path, device: str, worker_index: int) -> None:
    from attnbench import sweep
    from attnbench.data import DataError

    display = RichSweepDisplay(experiment)
    try:
        with display:
            summary = sweep.run_sweep(experiment, results_dir=results_dir, storage=storage, device=device,
                                      worker_index=worker_index, display=display)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted:[/] finished trials are stored; run the same command again "
                          "to resume.")
        sys.exit(130)
    except DataError as err:
        fail(f"{experiment.source}: field 'data': {err}")
    except sweep.StorageError as err:
        fail(str(err))
    console.print(f"study [bold]{summary.study}[/]: {summary.done} trials finished "
                  f"({summary.failed} failed), {summary.ran_here} run now; rows in {summary.results}/trials; "
                  f"storage {summary.storage}")
    console.print(f"next: [bold]attnbench report --results {results_dir}[/]")


def _run_workers(experiment_file: Path, experiment, storage, results_dir: Path, device: str, workers: int,
                 first_index=None) -> None:
    """Start ``workers`` local processes on one study; each pulls trials from the shared storage."""
    import subprocess

    from attnbench import sweep

    url = sweep.storage_url(experiment, results_dir, storage)
    try:
        sweep.open_study(experiment, url, experiment.sampler_seed)   # create it once, before the workers race
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
    if any(codes):
        fail(f"{sum(1 for c in codes if c)} of {workers} workers exited with an error (codes {codes})")


def _print_plan(experiment) -> None:
    from attnbench import sweep
    from attnbench.data import DataError

    try:
        arch, rows = sweep.plan(experiment)
    except DataError as err:
        fail(f"{experiment.source}: field 'data': {err}")
    table = Table(title=f"plan of study '{experiment.name}' ({experiment.source})")
    for column in ("configuration", "variant", "options", "tokens", "MACs (inference)", "attention MACs", "params"):
        table.add_column(column, overflow="fold")
    for config, costs in rows:
        table.add_row(config.label, config.variant, json.dumps(config.options, sort_keys=True),
                      str(costs["num_tokens"]), f"{costs['macs']:,}", f"{costs['attention_macs']:,}",
                      f"{costs['params']:,}")
    console.print(table)
    n_trials = experiment.n_trials()
    continuous = "" if experiment.plan() else \
        f" (continuous search space: configurations sampled by {experiment.sampler})"
    console.print(f"{n_trials if n_trials is not None else 'time-limited'} trials x {len(experiment.seeds)} seeds "
                  f"{list(experiment.seeds)}; sampler {experiment.sampler}; objectives "
                  f"{', '.join(f'{o.direction} {o.metric}' for o in experiment.objectives)}; model {arch} "
                  f"on {experiment.dataset}{continuous}")


class RichSweepDisplay:
    """Trials done, running and failed, and the best so far, as a Rich live progress bar."""

    def __init__(self, experiment):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.experiment = experiment
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=err_console)
        self.task = self.progress.add_task(f"sweep {experiment.name}", total=None, status="")

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def update(self, study, state, target) -> None:
        best = self._best(study)
        status = f"running {state.running}  failed {state.failed}" + (f"  best {best}" if best else "")
        self.progress.update(self.task, completed=state.done, total=target, status=status)

    def log(self, message: str) -> None:
        self.progress.console.print(f"[red]{message}[/]", highlight=False)

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
def bench_command(variants, tokens, dim, heads, batch, level, depth, patch, threads, repeats, samples, warmup,
                  device, out, memory, ops) -> None:
    """Scaling benchmark: MACs, parameters, latency and memory of variants against token count."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from attnbench import bench  # lazy: pulls in timm and the counters

    try:
        config = bench.BenchConfig(
            variants=bench.parse_variants(variants), tokens=bench.parse_tokens(tokens), dim=dim, heads=heads,
            batch=batch, level=level, depth=depth, patch=patch, threads=threads, repeats=repeats,
            samples=samples, warmup=warmup, device=device, out=out, memory=memory, ops=ops).validate()
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=err_console, transient=True) as progress:
            result = bench.run_benchmark(config, progress=progress)
    except (bench.BenchError, registry.VariantError) as err:
        fail(str(err))
    for item in bench.render(result):
        console.print(item)
    console.print(f"rows: {result.rows_path}\nplot: {result.plot_path}", highlight=False)


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
def report_command(results_dir: Path, studies, labels, variants, filters, sort, desc, columns, baseline, fmt, out,
                   plots_dir, no_plots, html_file) -> None:
    """Tables, Pareto fronts and plots: one row per configuration, mean ± std over seeds."""
    from attnbench.results import report

    try:
        trials, bench = report.load_results(results_dir)
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
        notes.print(f"no trial rows under '{results_dir}': no table, plots from benchmark rows only")
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
        notes.print(f"{fmt}: {out}", highlight=False)
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
            notes.print(f"html: {html_file}", highlight=False)
    if plots_dir is not None:
        names = ", ".join(p.name for p in images) or "none (no data to plot)"
        notes.print(f"plots in {plots_dir}/: {names}", highlight=False)


if __name__ == "__main__":  # pragma: no cover
    main()
