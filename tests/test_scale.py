"""Scale out: several workers on one study in a real PostgreSQL server (scripts/pg-throwaway.sh).

Every test gets an EMPTY database, so the workers also race to create Optuna's schema and the
study. Heartbeats are shortened through ATTNBENCH_HEARTBEAT_S / ATTNBENCH_GRACE_S so a killed
worker's trial is taken over within seconds.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from click.testing import CliRunner

from attnbench.results import store
from attnbench.cli import main
from attnbench.sweep import SLOT_ATTR, trial_key

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")]
optuna.logging.set_verbosity(optuna.logging.WARNING)

HEAD = """
name: {name}
data: {{dataset: digits}}
train: {{epochs: 1, max_steps: 2, batch_size: 32, num_threads: 1, eval_batch_size: 1024}}
seeds: [0, 1]
pruning: false
measure: {{latency: false, memory: false}}
"""
ENV = {**os.environ, "COLUMNS": "120"}
SHORT_HEARTBEAT = {**ENV, "ATTNBENCH_HEARTBEAT_S": "1", "ATTNBENCH_GRACE_S": "4"}   # a takeover in seconds


def grid_of_12(tmp_path: Path) -> Path:
    """12 configurations (a grid of 12 trials), cheap ones: identity and softmax attention."""
    body = "".join(f"  - {{label: c{i:02d}, variant: {'identity' if i % 2 else 'softmax'}}}\n" for i in range(12))
    path = tmp_path / "grid12.yaml"
    path.write_text(HEAD.format(name="grid12") + "sampler: grid\nvariants:\n" + body)
    return path


def random_12(tmp_path: Path) -> Path:
    """A random sampler over 4 configurations with a budget of 12 trials."""
    path = tmp_path / "random12.yaml"
    path.write_text(HEAD.format(name="random12") + "sampler: random\nbudget: {trials: 12}\n"
                    "variants: [softmax, identity, linear, angular]\n")
    return path


def sweep_command(path: Path, url: str, results: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "attnbench.cli", "sweep", str(path), "--storage", url,
            "--results", str(results), "--device", "cpu", *extra]


def check_one_row_per_trial_and_seed(study: optuna.Study, results: Path, name: str) -> pd.DataFrame:
    """Exactly 12 trial keys complete, and the store holds one row per (trial, seed) of them."""
    trials = study.get_trials(deepcopy=False)
    complete = sorted(trial_key(t) for t in trials if t.state == optuna.trial.TrialState.COMPLETE)
    assert len(complete) == 12 and len(set(complete)) == 12, [(t.number, t.state) for t in trials]
    assert not [t for t in trials if t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)]
    rows = store.read_rows(results / name, kind="trial")
    assert len(rows) == 24, rows[["trial", "seed", "worker"]]
    assert not rows.duplicated(["trial", "seed"]).any()
    assert sorted(rows["trial"].unique()) == complete
    assert (rows.groupby("trial")["seed"].apply(sorted).map(tuple) == (0, 1)).all()
    assert (rows["status"] == "complete").all()
    return rows


def test_three_workers_share_one_study_of_12_trials(tmp_path, pg_url):
    """`--workers 3`: 12 trials, no more, one row per (trial, seed), one sampler seed per worker."""
    results = tmp_path / "results"
    path = random_12(tmp_path)
    run = subprocess.run(sweep_command(path, pg_url, results, "--workers", "3"), env=ENV, capture_output=True,
                         text=True, timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr
    study = optuna.load_study(study_name="random12", storage=pg_url)
    assert len(study.trials) == 12, [(t.number, t.state) for t in study.trials]
    rows = check_one_row_per_trial_and_seed(study, results, "random12")
    assert study.user_attrs[SLOT_ATTR] == 3
    seeds = rows.groupby("worker")["sampler_seed"].unique()
    assert all(len(s) == 1 for s in seeds), seeds           # one seed per worker ...
    used = [s[0] for s in seeds]
    assert len(set(used)) == len(used) and set(used) <= {0, 1, 2}, seeds   # ... distinct across workers


def test_a_worker_killed_mid_trial_has_its_trial_run_again(tmp_path, pg_url):
    """Three workers started separately on an empty database; one is SIGKILLed mid-trial: another
    takes the trial over after the grace period; nothing lost or doubled; the report reads all."""
    results = tmp_path / "results"
    path = grid_of_12(tmp_path)
    logs = [open(tmp_path / f"worker{i}.log", "w") for i in range(3)]  # noqa: SIM115 - closed in finally
    procs = [subprocess.Popen(sweep_command(path, pg_url, results), env=SHORT_HEARTBEAT, stdout=log,
                              stderr=subprocess.STDOUT)
             for log in logs]
    try:
        victim, killed = _kill_one_mid_trial(procs, pg_url, "grid12")
        for p in procs:
            if p is not victim:
                p.wait(timeout=180)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
    outputs = "\n".join((tmp_path / f"worker{i}.log").read_text() for i in range(3))
    assert victim.returncode == -signal.SIGKILL
    assert all(p.returncode == 0 for p in procs if p is not victim), outputs

    study = optuna.load_study(study_name="grid12", storage=pg_url)
    rows = check_one_row_per_trial_and_seed(study, results, "grid12")
    assert sorted(rows["label"].unique()) == [f"c{i:02d}" for i in range(12)], "every grid point, once"
    dead = study.trials[killed]
    assert dead.state == optuna.trial.TrialState.FAIL, dead
    rerun = [t for t in study.trials if t.number != killed and trial_key(t) == killed]
    assert [t.state for t in rerun] == [optuna.trial.TrialState.COMPLETE], rerun
    assert not rows[rows["trial"] == killed]["worker"].str.endswith(f":{victim.pid}").any(), "re-run elsewhere"
    assert study.user_attrs[SLOT_ATTR] == 3
    assert set(rows["sampler_seed"]) == {0}, "grid workers share the seed that orders the grid"

    out = tmp_path / "report.csv"
    report = CliRunner().invoke(main, ["report", "--results", str(results), "--format", "csv", "--no-plots",
                                       "--out", str(out)])
    assert report.exit_code == 0, report.output
    table = pd.read_csv(out)
    assert len(table) == 12 and (table["n"] == 2).all(), table[["label", "n"]]


def _kill_one_mid_trial(procs: list[subprocess.Popen], url: str, name: str) -> tuple[subprocess.Popen, int]:
    """SIGKILL the worker of a trial it has started and not finished, once two trials are complete;
    returns (its process, the trial number)."""
    victim, number = _pause_one_mid_trial(procs, url, name, after_complete=2)
    victim.kill()
    victim.wait(timeout=30)
    return victim, number


def test_a_paused_worker_finds_its_trial_taken_over_and_writes_nothing(tmp_path, pg_url):
    """SIGSTOP a worker mid-trial past the grace period: another worker fails its trial and runs it
    again. SIGCONT: the paused worker finishes training, finds the trial no longer its own, stores
    nothing (the re-run's file stands) and exits 0 without a traceback."""
    results = tmp_path / "results"
    path = tmp_path / "paused.yaml"
    path.write_text(HEAD.format(name="paused").replace("max_steps: 2", "max_steps: 20") + "sampler: grid\n"
                    "variants: [softmax, identity]\n")
    logs = [open(tmp_path / f"worker{i}.log", "w") for i in range(2)]  # noqa: SIM115 - closed in finally
    procs = [subprocess.Popen(sweep_command(path, pg_url, results), env=SHORT_HEARTBEAT, stdout=log,
                              stderr=subprocess.STDOUT) for log in logs]
    try:
        paused, number = _pause_one_mid_trial(procs, pg_url, "paused")
        study = optuna.load_study(study_name="paused", storage=pg_url)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:   # the other worker re-runs the paused worker's trial
            if any(t.number != number and trial_key(t) == number and t.state == optuna.trial.TrialState.COMPLETE
                   for t in study.get_trials(deepcopy=False)):
                break
            time.sleep(0.5)
        else:
            raise AssertionError("the paused worker's trial was not run again")
        os.kill(paused.pid, signal.SIGCONT)
        for p in procs:
            p.wait(timeout=240)
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
        for log in logs:
            log.close()
    out = (tmp_path / f"worker{procs.index(paused)}.log").read_text()
    assert paused.returncode == 0 and "Traceback" not in out, out
    assert "was taken over by another worker" in out, out
    assert all(p.returncode == 0 for p in procs), [p.returncode for p in procs]

    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    assert states[number] == optuna.trial.TrialState.FAIL
    rows = store.read_rows(results / "paused", kind="trial")
    assert len(rows) == 2 * 2 and not rows.duplicated(["trial", "seed"]).any(), rows[["trial", "seed", "worker"]]
    assert all(states[n] == optuna.trial.TrialState.COMPLETE for n in rows["optuna_trial"]), \
        rows[["trial", "optuna_trial", "worker"]]
    assert not rows[rows["trial"] == number]["worker"].str.endswith(f":{paused.pid}").any(), "the re-run's rows"


def _pause_one_mid_trial(procs: list[subprocess.Popen], url: str, name: str,
                         after_complete: int = 0) -> tuple[subprocess.Popen, int]:
    """SIGSTOP the worker of a trial it has started and not finished (checked after the stop, and
    resumed to try again if it finished first), once ``after_complete`` trials are complete;
    returns (its process, the trial number)."""
    by_pid = {p.pid: p for p in procs}
    deadline = time.monotonic() + 180
    study = None
    while time.monotonic() < deadline:
        for p in procs:
            assert p.poll() is None, f"worker {p.pid} exited early with {p.returncode}"
        try:
            study = study or optuna.load_study(study_name=name, storage=url)
        except Exception:  # noqa: BLE001 - the schema or the study is not created yet
            time.sleep(0.2)
            continue
        trials = study.get_trials(deepcopy=False)
        if sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) < after_complete:
            time.sleep(0.1)
            continue
        for t in (t for t in trials if t.state == optuna.trial.TrialState.RUNNING):
            pid = int(str(t.user_attrs.get("worker", ":0")).rsplit(":", 1)[1])
            if pid in by_pid:
                os.kill(pid, signal.SIGSTOP)
                now = next(u for u in study.get_trials(deepcopy=False) if u.number == t.number)
                if now.state == optuna.trial.TrialState.RUNNING:
                    return by_pid[pid], t.number
                os.kill(pid, signal.SIGCONT)
        time.sleep(0.1)
    raise AssertionError("no worker was seen running a trial")
