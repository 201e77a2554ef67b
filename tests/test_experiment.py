"""Experiment files: the shipped ones are valid; malformed ones give one clear line each."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from attnbench.cli import main
from attnbench.experiment import ExperimentError, load_experiment

EXPERIMENTS = sorted((Path(__file__).parent.parent / "experiments").glob("*.yaml"))

VALID = """
name: ok
data: {dataset: digits}
train: {epochs: 1}
seeds: [0]
variants:
  - softmax
  - {label: la, variant: linear-angular, options: {residual: none}}
"""


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.name for p in EXPERIMENTS])
def test_shipped_experiments_are_valid(path):
    experiment = load_experiment(path)
    assert experiment.configs and experiment.seeds


def test_ablation_has_every_component_and_five_seeds():
    experiment = load_experiment(Path(__file__).parent.parent / "experiments" / "ablation.yaml")
    assert len(experiment.seeds) >= 5
    variants = {c.variant for c in experiment.configs}
    assert {"softmax", "linear", "angular", "linear-angular", "castling", "identity"} <= variants
    schedules = {c.options.get("mask_schedule") for c in experiment.configs if c.variant == "castling"}
    assert "fixed" in schedules and schedules - {"fixed", "none", None}, "needs fixed and an emptying schedule"
    assert experiment.grid_size() == len(experiment.configs)


def test_fashion_ablation_compares_the_components_at_50_tokens():
    experiment = load_experiment(Path(__file__).parent.parent / "experiments" / "ablation-fashion.yaml")
    assert experiment.dataset == "fashion-mnist" and len(experiment.seeds) >= 5 and not experiment.pruning
    assert experiment.data_options["img_size"] == 28 and experiment.arch == "vit_pico_patch4_32"   # 7x7 + 1 tokens
    assert experiment.data_options["max_test"] is None, "evaluates on the full official test set"
    assert {(c.variant, c.options.get("residual"), c.options.get("mask_schedule")) for c in experiment.configs} == {
        ("softmax", None, None), ("linear-angular", "none", None), ("linear-angular", "dwconv", None),
        ("castling", None, "fixed"), ("castling", None, "gate_cosine")}


def test_valid_experiment_resolves_trials(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(VALID)
    e = load_experiment(path)
    assert e.n_trials() == 2 and [c.label for c in e.plan()] == ["softmax", "la"]
    assert e.resolve({"config": "la"}).options == {"residual": "none"}


def _raw(text):
    return textwrap.dedent(text)


MALFORMED = [
    ("bad-yaml", "name: [unclosed\n", "not valid YAML at line"),
    ("empty", "", "the file is empty"),
    ("list", "- softmax\n", "expected a mapping"),
    ("top-typo", VALID + "varients: []\n", "field 'varients': unknown field; did you mean 'variants'?"),
    ("variant-typo", _raw(VALID).replace("- softmax", "- sofmax"),
     "field 'variants[0].variant': unknown variant 'sofmax'; did you mean 'softmax'?"),
    ("option-typo", _raw(VALID).replace("residual: none", "residul: none"),
     "field 'variants[1].options.residul': variant 'linear-angular' has no option 'residul'; did you mean 'residual'?"),
    ("option-type", _raw(VALID).replace("residual: none", "residual: 3"),
     "field 'variants[1].options': variant 'linear-angular': option 'residual' got 3, expected one of"),
    ("epochs-type", _raw(VALID).replace("epochs: 1", "epochs: ten"), "field 'train.epochs': expected an integer"),
    ("train-typo", _raw(VALID).replace("epochs: 1", "epoch: 1"), "field 'train.epoch': unknown field; did you mean 'epochs'?"),
    ("no-seeds", _raw(VALID).replace("seeds: [0]", "seeds: []"), "field 'seeds': expected a non-empty list"),
    ("dup-seeds", _raw(VALID).replace("seeds: [0]", "seeds: [1, 1]"), "field 'seeds': expected distinct seeds"),
    ("sampler-typo", VALID + "sampler: grdi\n", "field 'sampler.type': unknown sampler 'grdi'; did you mean 'grid'?"),
    ("metric-typo", VALID + "objectives: [top-1]\n", "field 'objectives[0].metric': unknown metric 'top-1'; did you mean 'top1'?"),
    ("grid-float-range", VALID.replace("  - softmax\n", "") + "search: {eps: {low: 1.0e-6, high: 1.0e-3}}\n",
     "field 'search': option 'eps' is a float range; the grid sampler needs a list of values"),
    ("range-order", VALID.replace("  - softmax\n", "") + "sampler: tpe\nbudget: {trials: 3}\n"
     "search: {kernel_size: {low: 9, high: 3}}\n", "field 'search.kernel_size': expected low < high"),
    ("search-unknown-option", VALID + "search: {kernel_size: [3, 5]}\n",
     "field 'search.kernel_size': variant 'softmax' has no option 'kernel_size'"),
    ("search-bad-choice", VALID.replace("  - softmax\n", "") + "search: {kernel_size: [3, 4]}\n",
     "field 'search.kernel_size': variant 'linear-angular': option 'kernel_size' must be a positive odd integer"),
    ("dup-label", VALID + "  - {label: la, variant: identity}\n", "field 'variants': label 'la' is used twice"),
    ("dataset-typo", _raw(VALID).replace("dataset: digits", "dataset: digit"),
     "field 'data.dataset': unknown data set 'digit'; did you mean 'digits'?"),
    ("arch-typo", VALID + "model: {arch: vit_pico_patch2_9}\n", "field 'model.arch': unknown architecture 'vit_pico_patch2_9'"),
    ("nsga2-single", VALID + "sampler: nsga2\nbudget: {trials: 4}\n", "field 'sampler': nsga2 is for several objectives"),
    ("tpe-no-budget", VALID + "sampler: tpe\n", "field 'budget': sampler 'tpe' needs 'budget.trials'"),
    ("variants-missing", "name: x\nseeds: [0]\n", "field 'variants': missing"),
    ("lr-negative", _raw(VALID).replace("epochs: 1", "epochs: 1, lr: -1"), "field 'train.lr': lr must be a finite number > 0"),
]


@pytest.mark.parametrize("name,text,message", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_experiment_is_one_clear_line(tmp_path, name, text, message):
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    with pytest.raises(ExperimentError) as err:
        load_experiment(path)
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value), str(err.value)
    result = CliRunner().invoke(main, ["sweep", str(path), "--results", str(tmp_path / "results")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "results").exists(), "nothing may be written for a malformed experiment"


def test_missing_file(tmp_path):
    result = CliRunner().invoke(main, ["sweep", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "nope.yaml: no such file" in result.output


def test_data_options_can_be_swept_and_make_distinct_configurations(tmp_path):
    path = tmp_path / "res.yaml"
    path.write_text(VALID + "search: {data.img_size: [8, 16]}\n")
    e = load_experiment(path)
    plan = e.plan()
    assert e.grid_size() == 4 and len({c.label for c in plan}) == 4
    assert {c.data_options["img_size"] for c in plan} == {8, 16}
    path.write_text(VALID + "search: {data.img_sise: [8, 16]}\n")
    with pytest.raises(ExperimentError, match="data set 'digits' has no option 'img_sise'; did you mean 'img_size'"):
        load_experiment(path)
