"""``attnbench rerun``: train a stored row's configuration again and say whether it repeats exactly."""
from __future__ import annotations

from pathlib import Path

import click

from attnbench.cli._common import console, fail
from attnbench.terminal import printable


@click.command("rerun")
@click.argument("study_folder", type=click.Path(file_okay=False, path_type=Path))
@click.option("--trial", "trial_key", required=True, type=int, help="The row's trial key (column 'trial').")
@click.option("--seed", required=True, type=int, help="The row's seed.")
@click.option("--device", default=None, help="Train here [default: the device the row trained on].")
def rerun_command(study_folder: Path, trial_key: int, seed: int, device) -> None:
    """Train the configuration of one stored row of STUDY_FOLDER (RESULTS/<study>) again, from the
    row's own columns, and compare its top-1 with the stored one.

    Exit status: 0 the same top-1 to the last bit; 1 a different top-1 (the machine and library
    columns that differ are named); 2 no such row, or a row that cannot repeat."""
    from attnbench.rerun import RerunError, rerun
    from attnbench.results import store

    try:
        rows = store.read_rows(study_folder, kind="trial")
    except (OSError, ValueError) as err:
        fail(f"{study_folder}: {err}")
    if rows.empty:
        fail(f"{study_folder}: no trial rows (give a study's folder, RESULTS/<study>)")
    match = rows[(rows["trial"] == trial_key) & (rows["seed"] == seed)]
    if match.empty:
        keys = sorted(set(zip(rows["trial"], rows["seed"])))
        fail(f"{study_folder}: no row of trial {trial_key}, seed {seed} (rows: "
             f"{', '.join(f'trial {t} seed {s}' for t, s in keys[:6])}{', ...' if len(keys) > 6 else ''})")
    row = match.iloc[-1].to_dict()
    try:
        outcome = rerun(row, device=device)
    except RerunError as err:
        fail(f"{study_folder}: trial {trial_key}, seed {seed}: {err}")
    name = printable(f"'{row.get('label')}' trial {trial_key} seed {seed}")
    console.print(f"{name}: stored top-1 {outcome.stored_top1!r}, rerun {outcome.top1!r} (training form "
                  f"{outcome.stored_top1_train_form!r} -> {outcome.top1_train_form!r})", highlight=False,
                  markup=False)
    if outcome.identical:
        console.print("identical, bit for bit", highlight=False, markup=False)
        return
    differs = "; ".join(f"{column}: {printable(before)} -> {printable(after)}"
                        for column, (before, after) in outcome.differences.items())
    console.print(f"differs by {outcome.top1 - outcome.stored_top1:+.4f} points; "
                  + (f"the machine differs: {differs}" if differs else
                     "on a machine that records the same CPU, libraries and threads (another process's load "
                     "does not change the arithmetic: report it)"), highlight=False, markup=False)
    raise SystemExit(1)
