"""``attnbench sweep``: run or resume an Optuna study, with ``--workers`` local processes, a Rich
progress display, and ``--dry-run``'s plan table.
"""
from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import NoReturn, Optional

import click
from rich.markup import escape

from attnbench.cli._common import console, err_console, fail
from attnbench.terminal import printable


@click.command("sweep")
@click.argument("experiment_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--storage", default=None, help="Optuna storage URL (default: sqlite file under the results folder).")
@click.option("--results", "results_dir", default="results", show_default=True, type=click.Path(path_type=Path),
              help="Results folder; rows go to RESULTS/<study>/trials/.")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), show_default=True)
@click.option("--dry-run", is_flag=True,
              help="Check the experiment and print the resolved plan (trials, MACs per configuration); train nothing.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Local worker processes sharing the study.")
@click.option("--worker-index", default=None, type=click.IntRange(min=0, max=999),
              help="Fix this worker's slot: its sampler seed is seed x 1000 + INDEX (grid: one seed for all) "
                   "[default: the study's next free slot].")
@click.option("--retry-failed", is_flag=True,
              help="Run the study's failed trials again (those that failed under an earlier version of the "
                   "file always are).")
def sweep_command(experiment_file: Path, storage, results_dir: Path, device: str, dry_run: bool, workers: int,
                  worker_index: int, retry_failed: bool) -> None:
    """Run (or resume) the Optuna study described by EXPERIMENT_FILE.

    Exit status: 0 every trial finished, 1 some failed (named with their reasons) or the store
    audit found a problem, 2 the experiment was refused (nothing written; a resume of a changed
    experiment too), 3 budget.timeout_s ended the sweep with trials left, 130 (SIGINT) or 143
    (SIGTERM) interrupted (run the same command again to resume).
    """
    from attnbench.experiment import ExperimentError, load_experiment
    from attnbench.experiment_check import ExperimentRefused, check_experiment

    try:
        experiment = load_experiment(experiment_file)
        if dry_run or workers > 1:
            checked = check_experiment(experiment, device=device, results_dir=results_dir)
    except ExperimentError as err:
        fail(str(err) + _missing_plugin_hint(str(err), experiment_file, results_dir))
    except ExperimentRefused as err:
        _refuse(err)
    if dry_run:
        _print_plan(checked)
    elif workers > 1:
        _run_workers(experiment_file, experiment, storage, results_dir, device, workers, worker_index,
                     retry_failed)
    else:
        _run_sweep(experiment, storage, results_dir, device, worker_index, retry_failed)


def _missing_plugin_hint(message: str, experiment_file: Path, results_dir: Path) -> str:
    """For an unknown variant in a study that has rows already: the distribution those rows ran it
    from (a plugin that was uninstalled since), else ""."""
    import re

    from attnbench.experiment import read_yaml
    from attnbench.results import store
    from attnbench.results.variants import missing_variant_hint

    unknown = re.search(r"unknown variant '([^']+)'", message)
    if unknown is None:
        return ""
    try:
        raw = read_yaml(experiment_file)
        name = raw.get("name") if isinstance(raw, dict) else None
        rows = store.read_rows(results_dir / str(name or experiment_file.stem), kind="trial")
    except Exception:  # noqa: BLE001 - a hint only: the error itself is already complete
        return ""
    return missing_variant_hint(unknown.group(1), rows)


def _refuse(refused) -> NoReturn:
    """Every problem of a refused experiment, one line each; exit 2."""
    for problem in refused.problems:
        err_console.print(f"[bold red]error:[/] {escape(printable(problem))}", highlight=False, soft_wrap=True)
    sys.exit(2)


def _run_sweep(experiment, storage, results_dir: Path, device: str, worker_index: int, retry_failed: bool) -> None:
    from attnbench import sweep
    from attnbench.experiment_check import ExperimentRefused

    display = RichSweepDisplay(experiment)
    try:
        with display:
            summary = sweep.run_sweep(experiment, results_dir=results_dir, storage=storage, device=device,
                                      worker_index=worker_index, display=display, retry_failed=retry_failed)
    except KeyboardInterrupt as err:   # Ctrl-C or SIGTERM (sweep.Interrupted)
        _interrupted(getattr(err, "signum", signal.SIGINT))
    except ExperimentRefused as err:
        _refuse(err)
    except sweep.StorageError as err:
        fail(str(err))
    pruned = f", {summary.pruned} pruned" if summary.pruned else ""
    console.print(f"study [bold]{escape(printable(summary.study))}[/]: {summary.done} trials finished "
                  f"({summary.failed} failed{pruned}), {summary.ran_here} run now; rows in "
                  f"{escape(printable(summary.results))}/trials; storage {escape(printable(summary.storage))}", highlight=False)
    if summary.audit is not None:
        (console if not summary.audit.problems else err_console).print(escape(printable(summary.audit.line())),
                                                                       highlight=False, soft_wrap=True)
    if summary.failures:
        for failure in summary.failures:
            err_console.print(f"[red]failed:[/] trial {failure.key} ({escape(printable(failure.label))}): "
                              f"{escape(printable(failure.reason))}", highlight=False, soft_wrap=True)
        err_console.print("fix the cause and run the same command again (with --retry-failed if the experiment "
                          "file is unchanged)", highlight=False)
        sys.exit(1)
    if summary.audit is not None and summary.audit.problems:
        err_console.print("the store does not hold one row per (trial, seed); see the audit above", highlight=False)
        sys.exit(1)
    if summary.timed_out:
        err_console.print(f"[yellow]time budget:[/] budget.timeout_s ({experiment.timeout_s:g} s) ended the sweep "
                          f"with {summary.done} of {summary.target} trials finished; run the same command again to "
                          f"go on", highlight=False)
        sys.exit(3)
    console.print(f"next: [bold]attnbench report --results {escape(printable(results_dir))}[/]", highlight=False)


def _interrupted(signum: int) -> NoReturn:
    """The one message of a sweep stopped by SIGINT or SIGTERM; exit 128 + the signal (130, 143)."""
    err_console.print(f"[yellow]interrupted ({signal.Signals(signum).name}):[/] finished trials are stored; run "
                      f"the same command again to resume.", highlight=False)
    sys.exit(128 + signum)


def _run_workers(experiment_file: Path, experiment, storage, results_dir: Path, device: str, workers: int,
                 first_index, retry_failed: bool) -> None:
    """Start ``workers`` local processes on one study; each pulls trials from the shared storage.
    Exits with the most telling of their statuses: 128 + the signal if interrupted (130, 143),
    else 2, 1, 0."""
    from attnbench import sweep

    from attnbench.experiment_check import ExperimentRefused
    from attnbench.sweep.resume import check_resume

    url = sweep.storage_url(experiment, results_dir, storage)
    try:
        study = sweep.open_study(experiment, url, experiment.sampler_seed)   # once, before the workers race
        with sweep.study_lock(url, experiment.name):
            check_resume(study, experiment, results_dir / experiment.name, sweep.storage.redact(url))
        if retry_failed:   # here, once: each worker queuing them again would run them several times
            with sweep.study_lock(url, experiment.name):
                sweep.requeue_failures(study, experiment, everything=True)
    except sweep.StorageError as err:
        fail(str(err))
    except ExperimentRefused as err:
        _refuse(err)
    command = [sys.executable, "-m", "attnbench.cli", "sweep", str(experiment_file), "--storage", url,
               "--results", str(results_dir), "--device", device]
    # Without --worker-index each worker takes the study's next free slot for its sampler seed, so
    # workers started with --workers on several machines never share a seed.
    indices = [[] if first_index is None else ["--worker-index", str(first_index + i)] for i in range(workers)]
    codes, stopped = _start_and_wait([command + extra for extra in indices])
    if stopped is not None:
        _interrupted(stopped)
    for code in (130, 143, 2, 1, 3):
        if code in codes:
            err_console.print(f"{codes.count(code)} of {workers} workers exited with status {code} "
                              f"(statuses {codes})", highlight=False)
            sys.exit(code)
    if any(codes):
        fail(f"{sum(1 for c in codes if c)} of {workers} workers exited with an error (statuses {codes})")


def _start_and_wait(commands: list[list[str]]) -> tuple[list[int], Optional[int]]:
    """Run the worker commands and wait for every one: (their exit statuses, the stop signal
    this process received, or None). SIGINT or SIGTERM to this process is passed on to each
    worker (each stores its finished trials and marks the one it cut short) and the workers are
    waited for, so none is left training as an orphan. The workers run in their own process
    group: Ctrl-C in the terminal reaches them once, through this process."""
    import subprocess

    received: list[int] = []
    procs: list[subprocess.Popen] = []

    def forward(signum, frame) -> None:
        received.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        for signum, handler in previous.items():
            if handler is not signal.SIG_IGN:   # an inherited "ignore" stays (nohup, background jobs)
                signal.signal(signum, forward)
        for command in commands:
            procs.append(subprocess.Popen(command, process_group=0))
            if received:   # a signal while starting them: the rest are not started
                forward(received[-1], None)
                break
        codes = [p.wait() for p in procs]
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return codes, (received[0] if received else None)


def _print_plan(checked) -> None:
    experiment = checked.experiment
    if not experiment.points:
        _print_totals(checked, _print_plan_at(checked, None))
        return
    # The configurations are the same at every point; their costs differ only where a point
    # changes the model or the data, so a table is shown for each such point.
    shown_costs = False
    for point in experiment.points:
        if not shown_costs or {"model", "data"} & set(point.overrides):
            arch = _print_plan_at(checked, point.label)
            shown_costs = True
        at = experiment.at(point.label)
        trainings = len(at.plan()) * (len(experiment.seeds) + (at.tune.trials if at.tune else 0))
        console.print(escape(printable(f"point '{point.label}' ({point.field}): {point.describe()}; "
                                       f"{trainings} trainings")), highlight=False, soft_wrap=True)
    _print_totals(checked, arch)


def _print_plan_at(checked, point) -> str:
    """The plan's table at a point of ``across`` (None: the study's settings); the architecture."""
    from attnbench import sweep
    from attnbench.fitted_table import FittedColumn, FittedTable

    experiment = checked.experiment if point is None else checked.experiment.at(point)
    arch, rows = sweep.plan(checked, point)
    columns = [("configuration", [config.label for config, _ in rows]),
               ("variant", [config.variant for config, _ in rows]),
               # one option a line: a long set of options stays readable and no value is split
               ("options", ["\n".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}"
                                      for k, v in sorted(config.options.items())) or "-"
                            for config, _ in rows]),
               ("tokens", [str(costs["num_tokens"]) for _, costs in rows]),
               ("MACs\n(inference)", [f"{costs['macs']:,}" for _, costs in rows]),
               ("attention\nMACs", [f"{costs['attention_macs']:,}" for _, costs in rows]),
               ("params", [f"{costs['params']:,}" for _, costs in rows])]
    console.print(FittedTable(
        [FittedColumn(header.replace("\n", " "), header, cells, "left" if header in ("configuration", "variant",
                                                                                      "options") else "right")
         for header, cells in columns],
        title=f"plan of study '{experiment.name}' ({experiment.source})" + (f" at point '{point}'" if point else ""),
        priority=("configuration", "variant", "options", "MACs (inference)", "params", "attention MACs", "tokens"),
        omitted_note=lambda omitted, width: f"Left out to fit {width} columns: {', '.join(omitted)} (a wider "
                                            f"terminal shows them)."))
    if getattr(experiment, "convert", None) is not None:
        from attnbench.convert.check import plan_lines

        splits = checked.data({})
        kwargs = {**splits.model_kwargs(), **experiment.model_kwargs}
        for line in plan_lines(experiment, arch, kwargs, [config for config, _ in rows]):
            console.print(escape(line), highlight=False, soft_wrap=True)
    return arch


def _print_totals(checked, arch: str) -> None:
    experiment = checked.experiment
    n_trials = experiment.n_trials()
    continuous = "" if experiment.plan() else \
        f" (continuous search space: configurations sampled by {experiment.sampler})"
    pruning = f"; pruning on (never the baseline '{experiment.baseline}')" if experiment.pruning and \
        experiment.baseline else "; pruning on" if experiment.pruning else ""
    points = f" ({len(experiment.plan())} configurations x {len(experiment.points)} points of 'across')" \
        if experiment.points else ""
    tune = experiment.tune
    tuning = (f", each after {tune.trials} tuning trainings of {' and '.join(tune.ranges)} on the validation split "
              f"(seed {tune.seed})") if tune else ""
    console.print(f"{n_trials if n_trials is not None else 'time-limited'} trials{points} x {len(experiment.seeds)} "
                  f"seeds "
                  f"{list(experiment.seeds)}{tuning}; sampler {experiment.sampler}; objectives "
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
        self.task = self.progress.add_task(f"sweep {escape(printable(experiment.name))}", total=None, status="")

    def __enter__(self):
        return self   # the bar starts with the first update: a refused experiment prints only its errors

    def __exit__(self, *exc):
        self.progress.stop()

    def update(self, study, state, target) -> None:
        self.progress.start()
        best = self._best(study)
        status = f"running {state.running}  failed {state.failed}" + (f"  best {best}" if best else "")
        self.progress.update(self.task, completed=state.done, total=target, status=escape(printable(status)))

    def log(self, message: str) -> None:
        self.progress.console.print(f"[red]{escape(printable(message))}[/]", highlight=False)

    def _best(self, study) -> str:
        try:
            if len(self.experiment.objectives) > 1:
                return f"{len(study.best_trials)} on the Pareto front"
            trial = study.best_trial
        except ValueError:  # no complete trial yet
            return ""
        return f"{self.experiment.objectives[0].metric}={trial.value:.4g} ({trial.user_attrs.get('label', '')})"
