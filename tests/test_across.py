"""``across``: every configuration at every named point of a study, checked up front, run with the
same seeds, stored with its point, and reported point by point with where each conclusion holds."""
from __future__ import annotations

import io
import json
import re

import pandas as pd
import pytest
from click.testing import CliRunner
from rich.console import Console

from attnbench.cli import main
from attnbench.experiment import ExperimentError, load_experiment, parse_experiment
from attnbench.results import across, report, store
from attnbench.sweep import run_sweep

from test_refusals import assert_sweep_refused

ACROSS = """
name: {name}
data: {{dataset: digits}}
train: {{epochs: 1, max_steps: 2, batch_size: 32, num_threads: 1, eval_batch_size: 1024}}
seeds: [0, 1]
variants: [softmax, linear-angular]
sampler: grid
measure: {{latency: false, memory: false}}
across:
  - {{label: main}}
  - {{label: crop, train: {{augment: {{crop_padding: 1}}}}}}
  - {{label: longer, train: {{max_steps: 4}}, data: {{options: {{val_fraction: 0.5}}}}}}
"""


def _file(tmp_path, text=ACROSS, name="acr", template=True):
    path = tmp_path / f"{name}.yaml"
    path.write_text(text.format(name=name) if template else text)
    return path


def test_points_make_a_grid_of_every_configuration_at_every_point(tmp_path):
    e = load_experiment(_file(tmp_path))
    assert [p.label for p in e.points] == ["main", "crop", "longer"]
    assert e.grid()["point"] == ["main", "crop", "longer"] and e.n_trials() == 6
    assert [(p.label, c.label) for p, c in e.trial_plan()] == [
        (p, c) for p in ("main", "crop", "longer") for c in ("softmax", "linear-angular")]
    # a point is the whole experiment with its overrides merged in, key by key
    longer = e.at("longer")
    assert longer.train.max_steps == 4 and longer.train.batch_size == 32
    assert longer.data_options["val_fraction"] == 0.5 and e.data_options.get("val_fraction") != 0.5
    assert e.at("crop").train.augment.crop_padding == 1 and e.at("main").train == e.train
    assert e.points[1].describe() == "train.augment.crop_padding=1"
    # the points decide the study: a resume with another point is another experiment
    other = load_experiment(_file(tmp_path, ACROSS.replace("max_steps: 4", "max_steps: 5"), "acr2"))
    assert other.decisive() != e.decisive()


@pytest.mark.parametrize("points,field,message", [
    ("across: {label: a}", "across", "a list of at least two points"),
    ("across: [{label: a}]", "across", "a list of at least two points"),
    ("across: [{label: a}, {train: {epochs: 2}}]", "across[1]", "expected a 'label'"),
    ("across: [{label: a}, {label: a, train: {epochs: 2}}]", "across[1].label", "labels across[0] already"),
    ("across: [{label: a}, {label: b, seeds: [1]}]", "across[1].seeds", "unknown field"),
    ("across: [{label: a}, {label: b, train: null}]", "across[1].train", "expected a mapping"),
    ("across: [{label: a}, {label: b, train: {epochs: -1}}]", "across[1].train.epochs", "expected an integer >= 0"),
    ("across: [{label: a}, {label: b, train: {epoch: 2}}]", "across[1].train.epoch", "did you mean 'epochs'"),
    ("across: [{label: a}, {label: b, data: {dataset: digitz}}]", "across[1].data.dataset", "unknown data set"),
])
def test_a_bad_point_is_refused_at_its_own_field(tmp_path, points, field, message):
    text = ACROSS.split("across:")[0].format(name="acr") + points + "\n"
    path = _file(tmp_path, text, template=False)
    with pytest.raises(ExperimentError) as err:
        load_experiment(path)
    assert err.value.field == field and message in str(err.value), str(err.value)
    assert_sweep_refused(tmp_path, path, [], field, message)


def test_across_needs_the_grid_sampler(tmp_path):
    text = ACROSS.replace("sampler: grid", "sampler: tpe\nbudget: {{trials: 4}}")
    assert_sweep_refused(tmp_path, _file(tmp_path, text), [], "across", "needs 'sampler: grid'")


def test_a_problem_only_a_point_has_is_found_up_front_at_that_point(tmp_path):
    # 9 pixels are not a whole number of the default model's 2-pixel patches, at this point only
    text = ACROSS.replace("val_fraction: 0.5", "img_size: 9")
    assert_sweep_refused(tmp_path, _file(tmp_path, text), [], "across[2].data.options.img_size",
                         "not a multiple of the patch size")


def test_a_study_error_outside_any_override_is_said_once():
    raw = {"variants": ["softmax"], "train": {"epochs": "x"},
           "across": [{"label": "a"}, {"label": "b", "data": {"seed": 1}}]}
    with pytest.raises(ExperimentError) as err:
        parse_experiment(raw, "f.yaml")
    assert err.value.field == "train.epochs" and "across" not in str(err.value)


def test_every_configuration_runs_at_every_point_with_the_same_seeds(tmp_path):
    summary = run_sweep(load_experiment(_file(tmp_path)), results_dir=tmp_path / "results")
    assert (summary.done, summary.failed) == (6, 0)
    rows = store.read_rows(tmp_path / "results" / "acr", kind="trial")
    plan = rows.groupby(["point", "label"])["seed"].apply(sorted).to_dict()
    assert plan == {(p, c): [0, 1] for p in ("main", "crop", "longer") for c in ("softmax", "linear-angular")}
    assert dict(zip(rows["point"], rows["point_index"])) == {"main": 0, "crop": 1, "longer": 2}
    steps = {p: set(json.loads(t)["max_steps"] for t in g) for p, g in rows.groupby("point")["train_config"]}
    assert steps == {"main": {2}, "crop": {2}, "longer": {4}}
    assert rows.loc[rows["point"] == "longer", "n_train"].max() < rows.loc[rows["point"] == "main", "n_train"].min()
    # the report: one table per point, then where each comparison holds
    out = CliRunner().invoke(main, ["report", "--results", str(tmp_path / "results"), "--no-plots"],
                             env={"COLUMNS": "100"})
    assert out.exit_code == 0, out.output
    for point in ("main", "crop", "longer"):
        assert f"study 'acr' at point '{point}'" in out.output
    assert "does each comparison hold across its points?" in out.output and "Kendall's tau-b" in out.output
    assert "ran under different settings" not in out.output, "rows of different points differ on purpose"


def test_dry_run_shows_the_trainings_of_every_point(tmp_path):
    out = CliRunner().invoke(main, ["sweep", str(_file(tmp_path)), "--results", str(tmp_path / "r"), "--dry-run"],
                             env={"COLUMNS": "120"})
    assert out.exit_code == 0, out.output
    assert "point 'main' (across[0]): the study's settings; 4 trainings" in out.output
    assert "point 'crop' (across[1]): train.augment.crop_padding=1; 4 trainings" \
        in out.output
    assert "at point 'longer'" in " ".join(out.output.split())   # it changes the data: its own table of costs
    assert "6 trials (2 configurations x 3 points of 'across') x 2 seeds" in out.output
    assert not (tmp_path / "r").exists()


# --- the verdicts, on generated rows ---------------------------------------------------------

def _rows(effects: dict[str, dict[str, float]], base=80.0, seeds=range(5)) -> pd.DataFrame:
    """Trial rows of study 's': at each point, each configuration's top-1 is the baseline's plus
    its effect there, with a little seed-to-seed wobble shared by every configuration."""
    points = list(next(iter(effects.values())))
    rows = []
    for index, point in enumerate(points):
        for seed in seeds:
            wobble = (-1) ** seed * 0.3 * (seed % 3)
            for label, effect in {"softmax": {p: 0.0 for p in points}, **effects}.items():
                noise = 0.6 * ((seed + (label != "softmax") * (1 + len(label) % 2)) % 3 - 1)
                rows.append({"kind": "trial", "study": "s", "trial": index, "seed": seed, "label": label,
                             "variant": label, "options": "{}", "status": "complete",
                             "top1": base + wobble + effect[point] + noise, "point": point, "point_index": index,
                             "arch": "vit_pico", "dataset": "digits", "macs": 1_000_000})
    return pd.DataFrame(rows)


def test_a_comparison_that_flips_between_points_is_said_to_flip():
    summary = report.summarize(_rows({"x": {"aug": 3.0, "no-aug": -3.0}, "y": {"aug": 2.0, "no-aug": 2.5},
                                      "z": {"aug": 0.0, "no-aug": 0.05}}))
    verdicts = across.verdicts(summary).set_index("config")["verdict"].to_dict()
    assert verdicts == {"x": "flips: better at 'aug', worse at 'no-aug'", "y": "better, holds at 2 of 2",
                        "z": "unresolved at every point"}
    tau = across.rank_agreement(summary)
    # aug ranks x > y > softmax ~ z; no-aug ranks y > z ~ softmax > x
    assert list(tau[["point_a", "point_b"]].iloc[0]) == ["aug", "no-aug"] and tau["n"].iloc[0] == 4
    assert -1.0 <= tau["tau"].iloc[0] < 0.5


def test_holds_at_some_points_names_where_it_is_unresolved():
    summary = report.summarize(_rows({"x": {"a": -4.0, "b": -4.0, "c": -0.02}}))
    assert across.verdicts(summary)["verdict"].tolist() == ["worse, holds at 2 of 3; unresolved at 'c'"]
    assert across.rank_agreement(summary)["tau"].tolist() == pytest.approx([1.0, -1.0, -1.0])


@pytest.mark.parametrize("width", [80, 120])
def test_the_verdict_table_fits_the_terminal_and_keeps_the_verdict(width):
    summary = report.summarize(_rows({"x": {"main": 3.0, "crop+flip": -3.0, "2x epochs": 3.0}}))
    console = Console(width=width, record=True, file=io.StringIO())
    for table in report.rich_tables(summary):
        console.print(table)
    text = console.export_text()
    assert all(len(line) <= width for line in text.splitlines())
    assert "flips: better at 'main', '2x epochs', worse at" in " ".join(text.split())
    assert text.count("at point '") == 3
    verdicts = text[text.index("does each comparison hold"):]
    missing = [p for p in ("main", "crop+flip", "2x epochs") if f"Δ {p}" not in verdicts.split("Left out")[0]]
    if width == 120:
        assert not missing, "the verdict a clause a line: every point's Δ fits beside it"
    for point in missing:   # whatever does not fit is named
        assert f"Δ {point}" in " ".join(verdicts.split("Left out to fit", 1)[1].split()), point


def test_markdown_has_a_table_per_point_and_the_verdicts():
    summary = report.summarize(_rows({"x": {"a": 3.0, "b": 3.0}}))
    text = report.export(summary, "markdown")
    assert "**study 's' at point 'a'" in text and "**study 's' at point 'b'" in text
    assert re.search(r"\| x \| \+\d\.\d\d\\\* \| \+\d\.\d\d\\\* \| better, holds at 2 of 2 \|", text), text[-800:]


def test_studies_without_points_are_reported_as_before():
    rows = _rows({"x": {"a": 3.0}}).drop(columns=["point", "point_index"])
    summary = report.summarize(rows)
    assert not across.has_points(summary) and across.verdicts(summary).empty
    assert "at point" not in report.export(summary, "markdown")


def test_a_resume_with_a_changed_point_is_refused_naming_across(tmp_path):
    text = ACROSS.replace("seeds: [0, 1]", "seeds: [0]").replace("variants: [softmax, linear-angular]",
                                                                  "variants: [softmax]")
    path = _file(tmp_path, text)
    results = tmp_path / "results"
    assert run_sweep(load_experiment(path), results_dir=results).done == 3
    path.write_text(path.read_text().replace("crop_padding: 1", "crop_padding: 2"))
    out = CliRunner().invoke(main, ["sweep", str(path), "--results", str(results), "--device", "cpu"])
    assert out.exit_code == 2 and len(out.output.strip().splitlines()) == 1, out.output
    assert "was started with another experiment: across:" in out.output, out.output
