"""``tune:``: each configuration's recipe tuned with the same number of trainings, on the
validation split only, before its seeds run at the chosen value."""
from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from attnbench import train as train_module
from attnbench.cli import main
from attnbench.experiment import ExperimentError, load_experiment, parse_experiment
from attnbench.results import report, store
from attnbench.sweep import run_sweep

TUNED = """
name: tuned
data: {dataset: digits}
model: {kwargs: {depth: 1}}
train: {epochs: 1, max_steps: 3, batch_size: 64, num_threads: 1, eval_batch_size: 1024, lr: 0.002}
seeds: [0, 1]
variants: [softmax, {label: la, variant: linear-angular, options: {residual: none}}]
sampler: grid
measure: {latency: false, memory: false}
tune:
  trials: 3
  lr: {low: 0.0005, high: 0.02}
"""


def _parse(text: str):
    import yaml

    return parse_experiment(yaml.safe_load(text), "t.yaml", "t")


def test_the_tune_block_and_its_defaults():
    spec = _parse(TUNED.replace("  lr: {low: 0.0005, high: 0.02}\n", "")).tune
    assert spec.trials == 3 and spec.seed == 2, "by default a seed no evaluated run uses"
    assert (spec.ranges["lr"].low, spec.ranges["lr"].high, spec.ranges["lr"].log) == \
        pytest.approx((0.0004, 0.01, True)), "train.lr / 5 .. x 5, log scale"
    assert "weight_decay" not in spec.ranges
    both = _parse(TUNED + "  weight_decay: {low: 0.01, high: 0.1}\n  seed: 7\n").tune
    assert set(both.ranges) == {"lr", "weight_decay"} and both.seed == 7


@pytest.mark.parametrize("block, field, message", [
    ("tune: {lr: {low: 0.001, high: 0.01}}", "tune.trials", "missing"),
    ("tune: {trials: 1}", "tune.trials", "expected an integer >= 2"),
    ("tune: {trials: 3, lr: {low: 0.01, high: 0.001}}", "tune.lr", "expected low < high"),
    ("tune: {trials: 3, lr: {low: 0, high: 0.01}}", "tune.lr.low", "> 0 (log scale)"),
    ("tune: {trials: 3, weight_decay: {low: 0.01}}", "tune.weight_decay.high", "missing"),
    ("tune: {trials: 3, learning_rate: {low: 0.01, high: 0.1}}", "tune.learning_rate", "unknown field"),
])
def test_a_bad_tune_block_is_refused_at_its_field(block, field, message):
    text = TUNED.split("tune:")[0] + block + "\n"
    with pytest.raises(ExperimentError) as err:
        _parse(text)
    assert err.value.field == field and message in str(err.value), str(err.value)


def test_every_configuration_gets_the_same_tuning_on_the_validation_split_only(tmp_path, monkeypatch):
    calls = []
    fit = train_module.fit

    def recording_fit(model, splits, config=None, **kwargs):
        calls.append({"lr": config.lr, "seed": config.seed, "test": kwargs.get("test", True)})
        result = fit(model, splits, config, **kwargs)
        if not kwargs.get("test", True):
            assert math.isnan(result.test_top1) and math.isnan(result.test_top1_castled), "the test split was seen"
        return result

    monkeypatch.setattr(train_module, "fit", recording_fit)
    monkeypatch.setattr("attnbench.sweep.trial.fit", recording_fit)
    path = tmp_path / "tuned.yaml"
    path.write_text(TUNED)
    assert run_sweep(load_experiment(path), results_dir=tmp_path / "results").done == 2
    tuning = [c for c in calls if not c["test"]]
    assert len(tuning) == 6 and {c["seed"] for c in tuning} == {2}, "3 tuning trainings a configuration"
    rows = store.read_rows(tmp_path / "results" / "tuned", kind="trial")
    for label, group in rows.groupby("label"):
        trials = json.loads(group["tuning_trials"].iloc[0])
        assert len(trials) == 3 and all(0.0005 <= t["lr"] <= 0.02 for t in trials), label
        best = max(trials, key=lambda t: t["val_top1"])
        assert set(group["tuned_lr"]) == {best["lr"]} and set(group["tuning_seed"]) == {2}
        assert {json.loads(c)["lr"] for c in group["train_config"]} == {best["lr"]}, "the seeds ran at the choice"
        assert group["tuned_weight_decay"].isna().all()
    seeded = [c for c in calls if c["test"]]
    assert sorted(c["seed"] for c in seeded) == [0, 0, 1, 1]
    # the report says what each configuration chose, and on how many trainings
    summary = report.summarize(rows)
    text = report.export(summary, "markdown")
    assert "Tuned: each configuration's recipe was chosen by 3 trainings on the validation split (seed 2" in text
    assert "softmax lr " in text and "la lr " in text


def test_the_plan_counts_the_tuning_trainings(tmp_path):
    path = tmp_path / "tuned.yaml"
    path.write_text(TUNED)
    out = CliRunner().invoke(main, ["sweep", str(path), "--results", str(tmp_path / "r"), "--dry-run"],
                             env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    assert "each after 3 tuning trainings of lr on the validation split (seed 2)" in out.output
    assert not (tmp_path / "r").exists()


def test_a_conversion_study_does_not_take_tune():
    text = TUNED + "convert: {teacher: {train: {epochs: 1}}, finetune_steps: 2}\n"
    with pytest.raises(ExperimentError) as err:
        _parse(text)
    assert err.value.field == "tune"


def test_fit_without_the_test_split_scores_the_inference_form_on_validation(monkeypatch):
    from attnbench import data, models

    splits = data.load_dataset("digits")
    seen = []
    evaluate = train_module.evaluate
    monkeypatch.setattr(train_module, "evaluate", lambda model, ds, **kw: seen.append(len(ds)) or evaluate(model, ds,
                                                                                                            **kw))
    model = models.create_model("vit_pico_patch2_8", "castling", {"mask_schedule": "fixed"}, seed=0, depth=1,
                                num_classes=10, in_chans=1, img_size=8)
    result = train_module.fit(model, splits, train_module.TrainConfig(epochs=1, max_steps=2, num_threads=1),
                              progress=False, test=False)
    assert math.isnan(result.test_top1) and math.isfinite(result.val_top1_castled)
    assert set(seen) == {len(splits.val)}, "only the validation split is evaluated"
