"""SIGTERM stops a sweep as Ctrl-C does (finished trials kept, the cut trial marked to run again at
once, exit 143, one message), a parent with --workers passes the signal on and waits for its
workers (no orphans), and a signal inherited as ignored stays ignored (issue 21)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from attnbench.sweep import INTERRUPTED_ATTR, Interrupted, SigintGuard
from test_sweep import experiment_file, rows


def test_a_signal_ignored_at_start_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with SigintGuard() as guard:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)   # ignored, as nohup or a background job asked
            time.sleep(0.1)
            assert guard.pending is None
            guard.check()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_sigterm_is_held_like_ctrl_c_and_restored_after():
    before = signal.getsignal(signal.SIGTERM)
    if before is signal.SIG_IGN:
        pytest.skip("SIGTERM is ignored in this process")
    with SigintGuard() as guard:
        os.kill(os.getpid(), signal.SIGTERM)   # bookkeeping: held
        assert guard.pending == signal.SIGTERM
        with pytest.raises(Interrupted) as held:
            guard.check()
        assert held.value.signum == signal.SIGTERM and isinstance(held.value, KeyboardInterrupt)
        with pytest.raises(Interrupted), guard.work():
            os.kill(os.getpid(), signal.SIGTERM)   # a trial's work: at once
            time.sleep(5)
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("call", ["set_trial_user_attr", "set_trial_intermediate_value"])
def test_a_stop_signal_during_a_storage_call_waits_for_the_call(tmp_path, monkeypatch, call):
    """A SIGTERM that lands while a running trial is inside a storage call (its labels, its
    pruning reports) is raised once the call has returned. Cut short inside SQLAlchemy, a commit
    can leave SQLite's write lock held; every later write (the heartbeat thread's too) then waits
    for it, and the sweep hangs instead of stopping."""
    from attnbench.experiment import load_experiment
    from attnbench.sweep import run_sweep

    path = experiment_file(tmp_path, variants=("softmax", "identity"), steps=6, latency="false")
    path.write_text(path.read_text().replace("pruning: false", "pruning: true"))
    original = getattr(optuna.storages.RDBStorage, call)
    calls = {"started": 0, "finished": 0}

    def signalled(self, *args, **kwargs):
        if calls["started"] or (call == "set_trial_user_attr" and kwargs.get("key") != "label"):
            return original(self, *args, **kwargs)
        calls["started"] += 1
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)   # the handler runs here, in the middle of the call
        result = original(self, *args, **kwargs)
        calls["finished"] += 1
        return result

    monkeypatch.setattr(optuna.storages.RDBStorage, call, signalled)
    with pytest.raises(Interrupted) as stopped:
        run_sweep(load_experiment(path), results_dir=tmp_path / "results")
    assert stopped.value.signum == signal.SIGTERM
    assert calls == {"started": 1, "finished": 1}, "the storage call was cut short"
    _cut_trials_marked(tmp_path)
    monkeypatch.setattr(optuna.storages.RDBStorage, call, original)
    summary = run_sweep(load_experiment(path), results_dir=tmp_path / "results")
    assert summary.done == 2 and summary.failed == 0
    df = rows(tmp_path / "results", "tiny")
    assert len(df) == 4 and not df.duplicated(["trial", "seed"]).any() and (df["status"] == "complete").all()


VARIANTS = ("softmax", "identity", "linear", "angular")
MESSAGE = "interrupted (SIGTERM): finished trials are stored; run the same command again to resume."


def _start(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, list[str], dict]:
    path = experiment_file(tmp_path, variants=VARIANTS, steps=6, latency="false")
    command = [sys.executable, "-m", "attnbench.cli", "sweep", str(path), "--results", "results", "--device", "cpu"]
    env = {**os.environ, "COLUMNS": "120"}   # the default 30 s grace: a resume must not need to wait it out
    proc = subprocess.Popen(command + list(extra), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    return proc, command, env


def _wait_for_a_stored_trial(tmp_path: Path, proc: subprocess.Popen) -> None:
    trials = tmp_path / "results" / "tiny" / "trials"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(trials.glob("*.parquet")) and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0].decode()


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _study(tmp_path: Path) -> optuna.Study:
    url = f"sqlite:///{tmp_path / 'results' / 'tiny' / 'study.db'}"
    return optuna.load_study(study_name="tiny", storage=url)


def _cut_trials_marked(tmp_path: Path) -> None:
    """No trial is left RUNNING (a resume would wait out the grace period for it): each one cut
    short is FAIL and marked interrupted, so the next run queues it again at once."""
    study = _study(tmp_path)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert optuna.trial.TrialState.RUNNING not in states, states
    cut = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.FAIL]
    assert all(t.user_attrs.get(INTERRUPTED_ATTR) for t in cut), [t.user_attrs for t in cut]


def _resume_completes(tmp_path: Path, command: list[str], env: dict) -> None:
    _cut_trials_marked(tmp_path)
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    df = rows(tmp_path / "results", "tiny")
    assert len(df) == 2 * len(VARIANTS) and not df.duplicated(["trial", "seed"]).any()
    assert (df["status"] == "complete").all()


@pytest.mark.slow
def test_sigterm_to_a_sweep_stops_it_like_ctrl_c_and_the_same_command_resumes(tmp_path):
    proc, command, env = _start(tmp_path)
    _wait_for_a_stored_trial(tmp_path, proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 143, out
    assert MESSAGE in out and "Traceback" not in out, out
    assert 1 <= len(list((tmp_path / "results" / "tiny" / "trials").glob("*.parquet"))) < len(VARIANTS)
    _resume_completes(tmp_path, command, env)


@pytest.mark.slow
def test_sigterm_to_the_parent_of_two_workers_stops_both_and_leaves_no_orphan(tmp_path):
    proc, command, env = _start(tmp_path, "--workers", "2")
    _wait_for_a_stored_trial(tmp_path, proc)
    workers = _children(proc.pid)
    assert len(workers) == 2, workers
    proc.send_signal(signal.SIGTERM)   # to the parent only, as a scheduler does
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 143, out
    assert out.strip().splitlines()[-1] == MESSAGE and "Traceback" not in out, out
    assert not any(_alive(pid) for pid in workers), "a worker outlived its parent"
    _cut_trials_marked(tmp_path)   # (the resume itself is the single worker's test above)
