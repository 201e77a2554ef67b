"""The ``attnbench`` command line. Each command parses its arguments and hands over to a module;
errors the user can fix are printed as one line, with a non-zero exit and no traceback.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import re
import sys
import types
import typing
import warnings
from pathlib import Path

import click
from click.core import ParameterSource
from rich import box
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
    for name, info in zip(names, infos):
        console.print(_variant_detail(info, options, with_options=not check))
        if check:
            failed += _print_checks(name, options)
    if failed:
        fail(f"{failed} variant(s) failed conformance checks")


def _print_variant_list(check: bool) -> None:
    table, failed = _variant_list(check)
    console.print(table)
    if not check:
        console.print("attnbench variants NAME: the type, default, allowed values and help of each option",
                      highlight=False)
    if check and failed:
        fail(f"{failed} variant(s) failed to load or failed conformance checks")


def _variant_list(check: bool):
    """The table of every variant (with conformance results if ``check``) and how many failed."""
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
            cell, passed = _conformance_cell(info.name)
            failed += not passed
            row.append(cell)
        else:
            row += [Text(info.description), Text(", ".join(spec.name for spec in info.options) or "-")]
        table.add_row(*row)
    return table, failed


def _variant_detail(info, options: dict, with_options: bool = True):
    """One variant: where it comes from, what it is, and (``with_options``) a table of its options."""
    from rich.console import Group
    from rich.text import Text

    head = Text.assemble((info.name, "bold"), f"  from distribution {info.distribution} ({info.target})")
    parts = [head, Text(info.description)]
    if options:
        parts.append(Text("with " + ", ".join(f"{k}={v!r}" for k, v in options.items())))
    if not with_options:
        return Group(*parts)
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
    """The conformance result of one variant as a table cell, and whether every check passed."""
    from rich.text import Text

    from attnbench.testing import run_checks  # lazy: pulls in timm and the counters

    results = run_checks(name)
    failures = [r for r in results if not r.passed]
    if not failures:
        return Text(f"{len(results)}/{len(results)} passed", "green"), True
    return Text("\n".join(f"{r.check}: {r.message}" for r in failures), "red"), False


def _dataclass_field_docs(cls) -> dict[str, str]:
    """The ``Attributes:`` section of a dataclass's docstring: {field name: its text on one line}.

    An entry is ``    name: text`` (or ``    a, b: text`` for several fields), continued on lines
    indented deeper; the section ends at the first line that is not indented.
    """
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    if "Attributes:" not in lines:
        return {}
    docs: dict[str, str] = {}
    names: list[str] = []
    for line in lines[lines.index("Attributes:") + 1:]:
        entry = re.match(r" {4}(\w+(?:, \w+)*): (.*)", line)
        if entry:
            names = entry.group(1).split(", ")
            docs.update((name, entry.group(2).strip()) for name in names)
        elif line.startswith(" " * 8):
            docs.update((name, f"{docs[name]} {line.strip()}") for name in names)
        elif line.strip():
            break
    return docs


class _NoneOr(click.ParamType):
    """An ``Optional[X]`` field: ``none`` stands for None, anything else is read as X."""

    def __init__(self, inner: click.ParamType):
        self.inner = inner
        self.name = f"{inner.name}|none"

    def convert(self, value, param, ctx):
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        return self.inner.convert(value, param, ctx)


class _Yaml(click.ParamType):
    """A field of any other type: the value is read as YAML and the dataclass validates it."""

    name = "yaml"

    def convert(self, value, param, ctx):
        return _scalar(value) if isinstance(value, str) else value


def _click_type(hint):
    """The Click type for a dataclass field's type hint, and whether it is an on/off flag."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        inner, is_flag = _click_type(rest[0]) if len(rest) == 1 else (_Yaml(), False)
        return _NoneOr(click.BOOL if is_flag else inner), False
    if hint is bool:
        return None, True
    if typing.get_origin(hint) is typing.Literal and all(isinstance(a, str) for a in args):
        return click.Choice(args), False
    return {int: click.INT, float: click.FLOAT, str: click.STRING}.get(hint, _Yaml()), False


def _dataclass_options(cls) -> list[click.Option]:
    """Click options ``--field-name`` for every field of dataclass ``cls``, typed from its hints,
    with help from its docstring: a field added to ``cls`` becomes an option with no edit here.
    """
    hints = typing.get_type_hints(cls)
    docs = _dataclass_field_docs(cls)
    options = []
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        kind, is_flag = _click_type(hints[field.name])
        default = field.default if field.default is not dataclasses.MISSING else \
            field.default_factory() if field.default_factory is not dataclasses.MISSING else None
        if is_flag:
            flag = f"{flag}/--no-{field.name.replace('_', '-')}"
        options.append(click.Option([flag, field.name], type=kind, default=default, show_default=True,
                                    help=docs.get(field.name, f"{cls.__name__}.{field.name}").replace("``", "")))
    return options


class _TrainCommand(click.Command):
    """Adds TrainConfig's fields as options when first parsed or shown: importing the training
    loop (timm) takes seconds that the other commands and ``attnbench --help`` should not wait for.
    """

    def get_params(self, ctx):
        if not any(getattr(p, "name", None) == "epochs" for p in self.params):
            from attnbench.train import TrainConfig

            own = {p.name for p in self.params}
            added = _dataclass_options(TrainConfig)
            clash = own & {p.name for p in added}
            if clash:   # a new TrainConfig field named like one of train's own options
                raise RuntimeError(f"attnbench train: TrainConfig field(s) {sorted(clash)} clash with its options")
            self.params.extend(added)
        return super().get_params(ctx)


def _given(values: dict) -> dict:
    """The options the user set (command line or environment), not Click's defaults."""
    ctx = click.get_current_context()
    return {k: v for k, v in values.items()
            if ctx.get_parameter_source(k) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)}


def _parse_run(spec: str) -> tuple[str, dict]:
    """``castling:mask_schedule=gate_linear,schedule_end=0.5`` -> (``castling``, options); a qualified
    ``dist:name`` keeps its colon (options follow the last colon before the first ``=``).
    """
    equals = spec.find("=")
    if equals < 0:
        return spec.strip(), {}
    colon = spec.rfind(":", 0, equals)
    if colon < 0:
        fail(f"run '{spec}': expected VARIANT or VARIANT:KEY=VALUE,...")
    return spec[:colon].strip(), parse_key_values(filter(None, spec[colon + 1:].split(",")), f"run '{spec}'")


@main.command("train", cls=_TrainCommand)
@click.argument("runs", nargs=-1, metavar="[RUN]...")
@click.option("--dataset", default="digits", show_default=True, help="Data set name.")
@click.option("--root", default=None, help="Local path, for data sets read from disk.")
@click.option("--data-option", "data_items", multiple=True, metavar="KEY=VALUE",
              help="A data set option, e.g. img_size=16 (repeatable).")
@click.option("--arch", default=None, help="timm model name [default: a small ViT fitting the images].")
@click.option("--model-option", "model_items", multiple=True, metavar="KEY=VALUE",
              help="A timm model keyword, e.g. depth=1 (repeatable).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress bars.")
@click.option("--json", "json_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write every result, with its history, to this JSON file.")
def train_command(runs: tuple, dataset: str, root, data_items: tuple, arch, model_items: tuple, progress: bool,
                  json_file, **config_values) -> None:
    """Train each RUN with the same data, model and budget; report test top-1 before and after castling.

    RUN is a variant name with optional options, VARIANT[:KEY=VALUE,...], e.g.
    castling:mask_schedule=gate_linear,schedule_end=0.5 [default: softmax]. The other options are
    TrainConfig's; --seed also seeds the data split and the model's initial weights.
    """
    from rich.text import Text

    from attnbench import models
    from attnbench.data import DataError, load_dataset
    from attnbench.train import TrainConfig, default_arch, fit, resolve_device
    from attnbench.variant import parse_options

    specs = runs or ("softmax",)
    parsed = [_parse_run(spec) for spec in specs]
    for name, options in parsed:   # every run is checked before any trains
        cls = _variant_or_fail(name).cls
        try:
            parse_options(cls, options)
        except ValueError as err:
            fail(str(err))
    try:
        config = TrainConfig(**_given(config_values))
    except ValueError as err:
        fail(str(err))
    try:
        resolve_device(config.device)
    except RuntimeError as err:   # torch's message lists the device types it knows
        fail(f"--device '{config.device}': {err}")
    data_options = parse_key_values(data_items, "--data-option")
    model_options = parse_key_values(model_items, "--model-option")
    try:
        splits = load_dataset(dataset, root=root, seed=config.seed, **data_options)
    except DataError as err:
        fail(str(err))
    arch = arch or default_arch(splits)
    console.print(f"data {splits.summary()}\nmodel {arch} {model_options}\nconfig {dataclasses.asdict(config)}",
                  highlight=False, markup=False)
    # Compact enough for 80 columns; every field of every result (validation too) is in --json.
    table = Table(title=f"{dataset} / {arch} / seed {config.seed} / checkpoint {config.checkpoint}",
                  box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    labels = ["\n".join([name] + [f"{k}={v}" for k, v in options.items()]) for name, options in parsed]
    table.add_column("run", overflow="fold", min_width=max(len(line) for text in labels for line in text.split("\n")))
    for column in ("test\ntop-1", "castled\ntop-1", "switch\ncost", "flips", "best\nepoch", "mask\ndensity",
                   "train\ns"):
        table.add_column(column, justify="right", no_wrap=True)
    results = []
    for spec, label, (name, options) in zip(specs, labels, parsed):
        try:
            model = models.create_model(arch, name, options, seed=config.seed, num_classes=splits.num_classes,
                                        in_chans=splits.in_chans, img_size=splits.img_size, **model_options)
        except models.ModelError as err:
            fail(str(err))
        except TypeError as err:   # timm's constructor refused a keyword
            fail(f"--model-option: {err}")
        res = fit(model, splits, config, progress=progress, label=name)
        results.append({"run": spec, "variant": name, "options": options, "arch": arch, "data": splits.summary(),
                        **dataclasses.asdict(res)})
        if not res.ok:
            table.add_row(Text(label), Text("failed", "red"), *[""] * 6)
            console.print(f"{spec}: failed: {res.error}", highlight=False, markup=False)
            continue
        table.add_row(Text(label), f"{res.test_top1:.2f}", f"{res.test_top1_castled:.2f}", f"{res.switch_cost:+.2f}",
                      f"{res.switch_flips:.3f}", str(res.best_epoch),
                      f"{res.mask_density:.3f}", f"{res.train_time_s:.1f}")
        console.print(f"{spec}: test top-1 {res.test_top1:.2f} -> castled {res.test_top1_castled:.2f} "
                      f"(switch cost {res.switch_cost:+.2f} points), {res.train_time_s:.1f} s",
                      highlight=False, markup=False)
    console.print(table)
    if json_file is not None:
        json_file.parent.mkdir(parents=True, exist_ok=True)
        json_file.write_text(json.dumps(results, indent=1, default=str))
    failed = [r["run"] for r in results if r["status"] != "ok"]
    if failed:   # a diverged run is a result, not bad input: exit 1
        err_console.print(f"[bold red]failed:[/] {escape(', '.join(failed))}", highlight=False)
        sys.exit(1)


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

    import yaml

    from attnbench.results import store

    unknown = re.search(r"unknown variant '([^']+)'", message)
    if unknown is None:
        return ""
    try:
        raw = yaml.safe_load(experiment_file.read_text())
        name = raw.get("name") if isinstance(raw, dict) else None
        rows = store.read_rows(results_dir / str(name or experiment_file.stem), kind="trial")
    except Exception:  # noqa: BLE001 - a hint only: the error itself is already complete
        return ""
    return registry.missing_variant_hint(unknown.group(1), rows)


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
    from attnbench.fitted_table import FittedColumn, FittedTable

    experiment = checked.experiment
    arch, rows = sweep.plan(checked)
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
        title=f"plan of study '{experiment.name}' ({experiment.source})",
        priority=("configuration", "variant", "options", "MACs (inference)", "params", "attention MACs", "tokens"),
        omitted_note=lambda omitted, width: f"Left out to fit {width} columns: {', '.join(omitted)} (a wider "
                                            f"terminal shows them)."))
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
@click.option("--columns", default=None,
              help="Comma-separated columns [default: the paper table, as many as fit the terminal; csv/json: all].")
@click.option("--wide", is_flag=True, help="Table: show every column whatever the terminal width (cells may wrap).")
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
def report_command(results_dir: Path, studies, labels, variants, filters, sort, desc, columns, wide, baseline, fmt,
                   out, plots_dir, no_plots, html_file, strict) -> None:
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
        chosen = report.check_view_columns(frame, columns.split(",")) if columns and not trials.empty else None
    except report.ReportError as err:
        fail(str(err))
    notes = err_console if fmt != "table" and out is None else console
    if trials.empty:
        notes.print(escape(f"no trial rows under '{results_dir}': no table, plots from benchmark rows only"))
    elif frame.empty:
        fail("no configuration matches --study/--label/--variant/--filter")
    elif fmt == "table":
        _print_tables(report.rich_tables(frame, chosen or report.DEFAULT_COLUMNS, wide=wide), out)
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
