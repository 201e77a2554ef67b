"""``attnbench train``: train each RUN on the same data, model and budget; its options beyond its
own are TrainConfig's fields (added lazily, see ``_TrainCommand``).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import click
from click.core import ParameterSource
from rich import box
from rich.markup import escape
from rich.table import Table

from attnbench import registry
from attnbench.cli._common import (_variant_or_fail, build_model, console, err_console, fail, parse_key_values,
                                   parse_run)
from attnbench.cli.dataclass_options import _dataclass_options
from attnbench.terminal import IMPROVING_MARK



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


@click.command("train", cls=_TrainCommand)
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
@click.option("--save", "save_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the evaluated checkpoint's weights (one RUN) to this .safetensors or .pt file.")
@click.option("--data-seed", type=int, default=None,
              help="Seed of the train/validation/test split [default: --seed]; a sweep keeps one split (data.seed) "
                   "for every seed: give its value to train one of its rows again.")
def train_command(runs: tuple, dataset: str, root, data_items: tuple, arch, model_items: tuple, progress: bool,
                  json_file, save_path, data_seed, **config_values) -> None:
    """Train each RUN with the same data, model and budget; report test top-1 before and after castling.

    RUN is a variant name with optional options, VARIANT[:KEY=VALUE,...], e.g.
    castling:mask_schedule=gate_linear,schedule_end=0.5 [default: softmax]. The other options are
    TrainConfig's; --seed seeds the model's initial weights and the training, and the data split
    unless --data-seed gives its own.
    """
    from rich.text import Text

    from attnbench.data import DataError, load_dataset
    from attnbench.train import TrainConfig, default_arch, fit, resolve_device
    from attnbench.variant import parse_options

    from attnbench import checkpoints

    from attnbench.paths import file_problem

    if json_file is not None and (problem := file_problem(json_file, "for --json")):
        fail(f"--json: {problem}")   # before training: a result is never lost to a bad path
    specs = runs or (registry.DEFAULT_VARIANT,)
    if save_path is not None:
        if len(specs) > 1:
            fail(f"--save: one file holds one model; give one RUN, not {len(specs)}")
        problem = checkpoints.check_path(save_path)
        if problem:
            fail(f"--save {problem}")
    parsed = [parse_run(spec) for spec in specs]
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
        splits = load_dataset(dataset, root=root, seed=config.seed if data_seed is None else data_seed,
                              **data_options)
    except DataError as err:
        fail(str(err))
    arch = arch or default_arch(splits)

    def build(name: str, options: dict):
        return build_model(arch, name, options, config.seed, splits, model_options, data_options)

    build(*parsed[0])   # the model settings are checked before anything trains (every run shares them)
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
        model = build(name, options)
        res = fit(model, splits, config, progress=progress, label=name)
        results.append({"run": spec, "variant": name, "options": options, "arch": arch, "data": splits.summary(),
                        **dataclasses.asdict(res), "curves": res.curves(), "still_improving": res.still_improving})
        if save_path is not None and res.ok:   # the evaluated checkpoint's weights (castling adds none)
            results[-1]["saved"] = str(checkpoints.save_state_dict(model.state_dict(), save_path))
            console.print(f"{spec}: weights ({res.checkpoint} checkpoint) saved to {save_path}", highlight=False,
                          markup=False)
        if not res.ok:
            table.add_row(Text(label), Text("failed", "red"), *[""] * 6)
            console.print(f"{spec}: failed: {res.error}", highlight=False, markup=False)
            continue
        table.add_row(Text(label), f"{res.test_top1:.2f}", f"{res.test_top1_castled:.2f}", f"{res.switch_cost:+.2f}",
                      f"{res.switch_flips:.3f}", f"{res.best_epoch}{IMPROVING_MARK if res.still_improving else ''}",
                      f"{res.mask_density:.3f}", f"{res.train_time_s:.1f}")
        console.print(f"{spec}: test top-1 {res.test_top1:.2f} -> castled {res.test_top1_castled:.2f} "
                      f"(switch cost {res.switch_cost:+.2f} points), {res.train_time_s:.1f} s",
                      highlight=False, markup=False)
    if any(r.get("still_improving") for r in results):
        table.caption = f"{IMPROVING_MARK} still improving: validation top-1 was highest at the last epoch"
    console.print(table)
    if json_file is not None:
        json_file.parent.mkdir(parents=True, exist_ok=True)
        json_file.write_text(json.dumps(results, indent=1, default=str))
    failed = [r["run"] for r in results if r["status"] != "ok"]
    if failed:   # a diverged run is a result, not bad input: exit 1
        err_console.print(f"[bold red]failed:[/] {escape(', '.join(failed))}", highlight=False)
        sys.exit(1)
