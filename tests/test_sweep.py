"""Sweeps end to end on tiny budgets: rows, provenance, failing trials, resuming after interruption."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from attnbench import registry
from attnbench.results import store
from attnbench.cli import main
from attnbench.experiment import load_experiment
from attnbench.sweep import run_sweep

TINY = """
name: {name}
data: {{dataset: digits}}
train: {{epochs: 1, max_steps: {steps}, batch_size: 32, num_threads: 1, eval_batch_size: 1024}}
seeds: [0, 1]
variants:
{variants}
sampler: grid
pruning: false
measure: {{latency: {latency}, threads: 1, repeats: 2, batch_size: 4, memory: false}}
"""


def experiment_file(tmp_path, name="tiny", variants=("softmax", "linear-angular"), steps=3, latency="true"):
    path = tmp_path / f"{name}.yaml"
    body = "\n".join(f"  - {v}" for v in variants)
    path.write_text(TINY.format(name=name, variants=body, steps=steps, latency=latency))
    return path


def rows(results: Path, study: str) -> pd.DataFrame:
    return store.read_rows(results / study, kind="trial")


def test_sweep_writes_one_row_per_trial_and_seed_with_provenance(tmp_path):
    summary = run_sweep(load_experiment(experiment_file(tmp_path)), results_dir=tmp_path / "results")
    assert (summary.done, summary.failed, summary.ran_here) == (2, 0, 2)
    df = rows(tmp_path / "results", "tiny")
    assert len(df) == 4 and not df.duplicated(["trial", "seed"]).any()
    assert set(df["status"]) == {"complete"}
    for column in ("study", "trial", "variant", "options", "seed", "arch", "dataset", "top1", "top1_train_form",
                   "switch_cost", "macs", "attention_macs", "params", "latency_median_ms", "latency_iqr_ms",
                   "mask_density_end", "wall_time_s", "status", "error", "torch_version", "device", "threads",
                   "git_commit", "checkpoint", "schema_version"):
        assert column in df.columns, column
    assert (df["checkpoint"] == "best_val").all()
    macs = df.groupby("variant")["macs"].first()
    assert macs["linear-angular"] != macs["softmax"]
    # Re-running a finished sweep does nothing.
    again = run_sweep(load_experiment(experiment_file(tmp_path)), results_dir=tmp_path / "results")
    assert again.ran_here == 0 and len(rows(tmp_path / "results", "tiny")) == 4


class NaNAttention(registry.AttentionVariant):
    """Always diverges: its output is NaN."""

    def attend(self, q, k, v, attn_mask):
        return v * float("nan")

    def core_macs(self, num_tokens):
        return 0


@pytest.fixture
def nan_variant():
    registry.register_variant(NaNAttention, name="nan-test-attn")
    yield "nan-test-attn"
    registry._local.pop("nan-test-attn", None)


def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(tmp_path, nan_variant):
    path = experiment_file(tmp_path, variants=("nan-test-attn", "softmax"), latency="false")
    summary = run_sweep(load_experiment(path), results_dir=tmp_path / "results")
    assert (summary.done, summary.failed) == (2, 1)
    df = rows(tmp_path / "results", "tiny")
    failed = df[df["variant"] == "nan-test-attn"]
    assert list(failed["status"]) == ["failed"]
    assert "nan" in failed["error"].iloc[0].lower(), failed["error"].iloc[0]
    assert (df[df["variant"] == "softmax"]["status"] == "complete").all()
    assert len(df[df["variant"] == "softmax"]) == 2


def test_interrupted_sweep_resumes_without_losing_or_doubling(tmp_path, monkeypatch):
    import attnbench.sweep.trial as sweep_module

    calls = {"n": 0}
    real_fit = sweep_module.fit

    def interrupting_fit(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:   # the second trial's first seed
            raise KeyboardInterrupt
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(sweep_module, "fit", interrupting_fit)
    experiment = load_experiment(experiment_file(tmp_path, variants=("softmax", "identity", "linear"),
                                                 latency="false"))
    with pytest.raises(KeyboardInterrupt):
        run_sweep(experiment, results_dir=tmp_path / "results")
    assert len(rows(tmp_path / "results", "tiny")) == 2, "only the finished trial is stored"
    summary = run_sweep(experiment, results_dir=tmp_path / "results")
    assert (summary.done, summary.ran_here) == (3, 2)
    df = rows(tmp_path / "results", "tiny")
    assert len(df) == 6 and not df.duplicated(["trial", "seed"]).any()
    assert sorted(df["variant"].unique()) == ["identity", "linear", "softmax"]


def test_ctrl_c_while_optuna_stores_a_finished_trial_waits_until_it_is_stored(tmp_path, monkeypatch):
    """SIGINT inside Optuna's bookkeeping after the objective returned (which Optuna cannot take:
    UnboundLocalError in ``_run_trial``) is held until the trial is stored, then interrupts."""
    from optuna.storages import RDBStorage
    from optuna.trial import TrialState

    real = RDBStorage.set_trial_state_values
    sent = []

    def interrupting(self, trial_id, state, values=None):
        if state == TrialState.COMPLETE and not sent:
            sent.append(trial_id)
            os.kill(os.getpid(), signal.SIGINT)    # delivered here, in the middle of the bookkeeping
        return real(self, trial_id, state, values)

    monkeypatch.setattr(RDBStorage, "set_trial_state_values", interrupting)
    experiment = load_experiment(experiment_file(tmp_path, variants=("softmax", "identity"), latency="false"))
    with pytest.raises(KeyboardInterrupt):
        run_sweep(experiment, results_dir=tmp_path / "results")
    assert sent and signal.getsignal(signal.SIGINT) is signal.default_int_handler   # handler restored
    monkeypatch.undo()
    summary = run_sweep(experiment, results_dir=tmp_path / "results")
    assert (summary.done, summary.ran_here) == (2, 1), "the first trial was stored complete, not re-run"
    df = rows(tmp_path / "results", "tiny")
    assert len(df) == 4 and not df.duplicated(["trial", "seed"]).any()


def test_sigint_guard_holds_ctrl_c_outside_work_and_gives_way_to_a_second():
    from attnbench.sweep import SigintGuard

    with SigintGuard() as guard:
        os.kill(os.getpid(), signal.SIGINT)        # bookkeeping: held
        assert guard.pending
        with pytest.raises(KeyboardInterrupt):
            guard.check()
        with pytest.raises(KeyboardInterrupt), guard.work():
            os.kill(os.getpid(), signal.SIGINT)    # a trial's work: at once
            time.sleep(5)
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):     # a second one while one is held: at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path):
    path = experiment_file(tmp_path)
    result = CliRunner().invoke(main, ["sweep", str(path), "--dry-run", "--results", str(tmp_path / "r")],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "linear-angular" in result.output and "2 trials x 2 seeds" in result.output
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_ctrl_c_halfway_then_the_same_command_resumes(tmp_path):
    """The issue's scenario, as a user does it: SIGINT to the real command, then run it again."""
    path = experiment_file(tmp_path, variants=("softmax", "identity", "linear", "angular"), steps=4,
                           latency="false")
    command = [sys.executable, "-m", "attnbench.cli", "sweep", str(path), "--results", "results"]
    # Short heartbeats: a trial cut off mid-bookkeeping is failed and re-queued within seconds.
    env = {**os.environ, "COLUMNS": "120", "ATTNBENCH_HEARTBEAT_S": "1", "ATTNBENCH_GRACE_S": "3"}
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    trials = tmp_path / "results" / "tiny" / "trials"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list(trials.glob("*.parquet"))) < 1:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 130, out
    assert "run the same command again to resume" in out and "Traceback" not in out
    stored = len(list(trials.glob("*.parquet")))
    assert 1 <= stored < 4
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    df = rows(tmp_path / "results", "tiny")
    assert len(df) == 8 and not df.duplicated(["trial", "seed"]).any()
    assert (df["status"] == "complete").all()
