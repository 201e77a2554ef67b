"""Reproducibility stated exactly: rows record what makes a figure machine-specific, and a stored
row's configuration, trained again from its columns on the same machine, repeats its top-1 bit for bit."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from attnbench.cli import main
from attnbench.experiment import load_experiment
from attnbench.rerun import REPEATS_WITH, RerunError, rerun
from attnbench.results import store
from attnbench.sweep import run_sweep

STUDY = """
name: again
data: {dataset: digits, seed: 3}
model: {kwargs: {depth: 2}}
train: {epochs: 2, batch_size: 64, num_threads: 1, eval_batch_size: 1024, lr: 0.003,
        augment: {crop_padding: 1}}
seeds: [1]
variants: [softmax, {label: cast, variant: castling, options: {mask_schedule: gate_cosine}}]
sampler: grid
measure: {latency: false, memory: false}
"""


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rerun")
    (tmp / "again.yaml").write_text(STUDY)
    run_sweep(load_experiment(tmp / "again.yaml"), results_dir=tmp / "results")
    return tmp / "results" / "again"


def test_rows_record_what_makes_a_figure_machine_specific(study):
    rows = store.read_rows(study, kind="trial")
    assert set(REPEATS_WITH) <= set(rows.columns)
    row = rows.iloc[0]
    assert row["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    if "BLAS_INFO=mkl" in torch.__config__.show():
        assert row["blas"].startswith("mkl; MKL ")
    assert row["torch_version"] == torch.__version__ and row["train_threads"] == 1
    assert pd.isna(row["cuda_version"]) and pd.isna(row["cudnn_version"]), "null on the CPU, where they play no part"


def test_a_stored_row_repeats_bit_for_bit_on_the_same_machine(study):
    rows = store.read_rows(study, kind="trial")
    assert set(rows["label"]) == {"softmax", "cast"}
    for _, row in rows.iterrows():
        again = rerun(row.to_dict())
        assert again.identical, (row["label"], again)
        assert again.top1 == row["top1"] and again.differences == {}
    # the command says so, and exits 0
    trial = int(rows.loc[rows["label"] == "cast", "trial"].iloc[0])
    out = CliRunner().invoke(main, ["rerun", str(study), "--trial", str(trial), "--seed", "1"])
    assert out.exit_code == 0 and "identical, bit for bit" in out.output, out.output


def test_a_difference_names_the_machine_columns_that_differ(study):
    row = store.read_rows(study, kind="trial").iloc[0].to_dict()
    moved = {**row, "top1": row["top1"] - 1.0, "cpu_capability": "AVX2", "train_threads": 4}
    again = rerun(moved)
    assert not again.identical and again.top1 == row["top1"]
    assert again.differences == {"cpu_capability": ("AVX2", torch.backends.cpu.get_cpu_capability()),
                                 "train_threads": (4, 1)}


def test_rows_that_cannot_repeat_are_refused_in_one_line(study, tmp_path):
    row = store.read_rows(study, kind="trial").iloc[0].to_dict()
    with pytest.raises(RerunError, match="time budget"):
        rerun({**row, "train_config": row["train_config"].replace('"time_budget_s": null', '"time_budget_s": 5')})
    with pytest.raises(RerunError, match="complete trial row"):
        rerun({**row, "status": "failed"})
    out = CliRunner().invoke(main, ["rerun", str(study), "--trial", "99", "--seed", "1"])
    lines = out.output.strip().splitlines()
    assert out.exit_code == 2 and len(lines) == 1 and "no row of trial 99, seed 1" in lines[0], out.output


def test_attnbench_train_with_the_rows_data_seed_gives_the_rows_top1(study, tmp_path):
    """A sweep keeps one split for every seed; --data-seed gives train that split."""
    import json

    row = store.read_rows(study, kind="trial").set_index("label").loc["softmax"]
    out = tmp_path / "run.json"
    result = CliRunner().invoke(main, ["train", "softmax", "--seed", "1", "--data-seed", "3", "--model-option",
                                       "depth=2", "--epochs", "2", "--batch-size", "64", "--lr", "0.003",
                                       "--num-threads", "1", "--eval-batch-size", "1024", "--augment",
                                       "{crop_padding: 1}", "--no-progress", "--json", str(out)])
    assert result.exit_code == 0, result.output
    run, = json.loads(out.read_text())
    assert run["test_top1_castled"] == row["top1"]
