"""A resume runs the experiment its study started with, on a store that holds what the study says
(issue 21): a changed setting is refused up front (exit 2, one line saying what changed), a lost or
garbled result file is re-run, the store is audited at the end, an empty study.db is refused, and a
time budget that ends the sweep early is named (exit 3)."""
from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

from attnbench.cli import main
from attnbench.results import report, store
from test_sweep import experiment_file, rows

pytestmark = pytest.mark.slow


def _sweep(path, tmp_path, *extra):
    return CliRunner().invoke(main, ["sweep", str(path), "--results", str(tmp_path / "results"), "--device", "cpu",
                                     *extra], env={"COLUMNS": "200"})


def _one_line_exit_2(result, *parts: str) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def finished_once(tmp_path_factory):
    """A finished study of two configurations (run once for this module)."""
    folder = tmp_path_factory.mktemp("finished")
    path = experiment_file(folder, steps=2, latency="false")
    result = _sweep(path, folder)
    assert result.exit_code == 0, result.output
    return folder


@pytest.fixture
def finished(tmp_path, finished_once):
    """A copy of the finished study in this test's folder: its experiment file."""
    shutil.copytree(finished_once / "results", tmp_path / "results")
    shutil.copy(finished_once / "tiny.yaml", tmp_path / "tiny.yaml")
    return tmp_path / "tiny.yaml"


def _files(tmp_path):
    folder = tmp_path / "results" / "tiny"
    return {p.relative_to(folder): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_a_changed_training_setting_is_refused_up_front(tmp_path, finished):
    finished.write_text(finished.read_text().replace("max_steps: 2", "max_steps: 3"))
    before = _files(tmp_path)
    line = _one_line_exit_2(_sweep(finished, tmp_path), f"error: {finished}: study 'tiny' in ",
                            "was started with another experiment: train.max_steps: 2 -> 3",
                            "start a new study for it (set another 'name'")
    assert len(line) < 600
    assert _files(tmp_path) == before, "nothing written"
    # the same refusal behind --workers, before any worker starts
    _one_line_exit_2(_sweep(finished, tmp_path, "--workers", "2"), "train.max_steps: 2 -> 3")


def test_a_study_that_recorded_only_the_given_training_fields_resumes_and_still_refuses_a_change(tmp_path, finished):
    """Studies started before the experiment held a whole TrainConfig recorded only the ``train``
    fields their file gave (and the resolved augmentation): the same file resumes them, a changed
    field is still named."""
    import dataclasses

    import optuna

    from attnbench.experiment import load_experiment
    from attnbench.sweep.resume import SPEC_ATTR
    from attnbench.train import TrainConfig

    experiment = load_experiment(finished)
    given = {k for k, v in dataclasses.asdict(experiment.train).items()
             if k == "augment" or v != dataclasses.asdict(TrainConfig())[k]}
    old = experiment.decisive()
    old["train"] = {k: v for k, v in old["train"].items() if k in given}
    assert "max_steps" in old["train"] and "clip_grad" not in old["train"]
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'results' / 'tiny' / 'study.db'}")
    study.set_user_attr(SPEC_ATTR, old)
    result = _sweep(finished, tmp_path)
    assert result.exit_code == 0 and "2 trials finished (0 failed), 0 run now" in result.output, result.output
    study.set_user_attr(SPEC_ATTR, old)
    finished.write_text(finished.read_text().replace("max_steps: 2", "max_steps: 3"))
    _one_line_exit_2(_sweep(finished, tmp_path), "train.max_steps: 2 -> 3")


def test_an_added_configuration_is_refused_the_same_way_and_a_budget_change_is_not(tmp_path, finished):
    text = finished.read_text()
    finished.write_text(text.replace("  - linear-angular\n", "  - linear-angular\n  - linear\n"))
    _one_line_exit_2(_sweep(finished, tmp_path), "variants: added 'linear'")
    finished.write_text(text.replace("  - linear-angular\n", ""))
    _one_line_exit_2(_sweep(finished, tmp_path), "variants: removed 'linear-angular'")
    finished.write_text(text.replace("seeds: [0, 1]", "seeds: [0, 1, 2]"))
    _one_line_exit_2(_sweep(finished, tmp_path), "seeds: [0, 1] -> [0, 1, 2]")
    finished.write_text(text.replace("sampler: grid", "sampler: grid\ndescription: now described"))
    result = _sweep(finished, tmp_path)
    assert result.exit_code == 0 and "2 trials finished (0 failed), 0 run now" in result.output, result.output


def test_a_lost_or_garbled_result_file_is_run_again(tmp_path, finished):
    trials = tmp_path / "results" / "tiny" / "trials"
    files = sorted(trials.glob("*.parquet"))
    files[0].unlink()
    files[1].write_bytes(b"garbage, not Parquet")
    result = _sweep(finished, tmp_path)
    assert result.exit_code == 0, result.output
    assert "its result file is missing; it runs again" in result.output
    assert "not a readable Parquet file" in result.output and "2 run now" in result.output
    assert "store audit: 4 rows, one per (trial, seed) of 2 finished trial(s)" in result.output
    df = rows(tmp_path / "results", "tiny")
    assert len(df) == 4 and not df.duplicated(["trial", "seed"]).any() and (df["status"] == "complete").all()


def test_an_empty_study_database_is_refused_and_a_deleted_one_does_not_overwrite_results(tmp_path, finished):
    db = tmp_path / "results" / "tiny" / "study.db"
    db.write_bytes(b"")
    _one_line_exit_2(_sweep(finished, tmp_path), f"storage '{db}' is an empty file (0 bytes), not a study database")
    db.write_bytes(b"not sqlite at all" * 100)
    _one_line_exit_2(_sweep(finished, tmp_path), "storage", "DatabaseError")
    db.unlink()
    before = {p.name: p.read_bytes() for p in (db.parent / "trials").iterdir()}
    _one_line_exit_2(_sweep(finished, tmp_path), "has no trials, but", "holds 2 result file(s)",
                     "move that folder away")
    assert {p.name: p.read_bytes() for p in (db.parent / "trials").iterdir()} == before


def test_a_time_budget_that_ends_the_sweep_early_is_named_with_exit_3(tmp_path):
    path = experiment_file(tmp_path, steps=2, latency="false")
    path.write_text(path.read_text() + "budget: {timeout_s: 0.001}\n")
    result = _sweep(path, tmp_path)
    assert result.exit_code == 3, result.output
    assert "time budget: budget.timeout_s (0.001 s) ended the sweep with 0 of 2 trials finished" in result.output


def test_report_warns_when_one_studys_rows_ran_under_different_settings(tmp_path):
    from test_report import _trial

    root = tmp_path / "results"
    for i, (label, steps) in enumerate((("softmax", 30), ("linear", 3))):
        row = _trial("mixed", label, 0, 70.0, 70.0, 1e9, 1.0, train_config=f'{{"max_steps": {steps}, "seed": {i}}}',
                     data_options='{"img_size": 8}')
        store.write_rows(root, [row], f"mixed/trials/t-{i}")
    trials, _ = report.load_results(root)
    assert report.consistency_warnings(trials) == [
        "study 'mixed': its rows ran under different settings (train.max_steps); its configurations are compared "
        "across them (resumed after the file changed, or files copied together?)"]
    result = CliRunner().invoke(main, ["report", "--results", str(root), "--no-plots"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "warning: study 'mixed': its rows ran under different settings" in result.output
