"""Sweeps end to end on tiny budgets: rows, provenance, failing trials, resuming after interruption."""
from __future__ import annotations

import json
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

from attnbench.variant import AttentionVariant
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


class NaNAttention(AttentionVariant):
    """Always diverges: its output is NaN."""

    def attend(self, q, k, v, attn_mask):
        return v * float("nan")

    def core_macs(self, num_tokens):
        return 0


@pytest.fixture
def nan_variant(registered):
    return registered(NaNAttention, "nan-test-attn")


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


def test_ctrl_c_while_optuna_stores_a_finished_trial_waits_until_it_is_stored(tmp_path, monkeypatch, sigint_handler):
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
    before = sigint_handler
    with pytest.raises(KeyboardInterrupt):
        run_sweep(experiment, results_dir=tmp_path / "results")
    assert sent and signal.getsignal(signal.SIGINT) is before   # the handler that was there, restored
    monkeypatch.undo()
    summary = run_sweep(experiment, results_dir=tmp_path / "results")
    assert (summary.done, summary.ran_here) == (2, 1), "the first trial was stored complete, not re-run"
    df = rows(tmp_path / "results", "tiny")
    assert len(df) == 4 and not df.duplicated(["trial", "seed"]).any()


@pytest.fixture
def sigint_handler():
    """A SIGINT handler of the test's own (raising KeyboardInterrupt), whatever the suite inherited
    (started as a background job, it inherits SIGINT ignored), put back as it was after: a guard
    must restore the handler that was there before it, not Python's default."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    yield handler
    signal.signal(signal.SIGINT, previous)


def test_sigint_guard_holds_ctrl_c_outside_work_and_gives_way_to_a_second(sigint_handler):
    from attnbench.sweep import SigintGuard

    before = sigint_handler
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
    assert signal.getsignal(signal.SIGINT) is before


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


# --- pruning ------------------------------------------------------------------------------------

class ZeroAttention(AttentionVariant):
    """Mixes nothing: the class token never sees the image, so the model stays at chance."""

    def attend(self, q, k, v, attn_mask):
        return torch.zeros_like(v)

    def core_macs(self, num_tokens):
        return 0


@pytest.fixture
def zero_variant(registered):
    return registered(ZeroAttention, "zero-test-attn")


PRUNING = """
name: pruning
data: {{dataset: digits, options: {{val_fraction: 0.3, test_fraction: 0.3}}}}
train: {{epochs: 2, batch_size: 32, lr: 0.005, num_threads: 1, eval_batch_size: 1024}}
seeds: [0, 1]
variants:
  - {{label: base, variant: zero-test-attn}}
  - {{label: good1, variant: softmax}}
  - {{label: good2, variant: softmax}}
  - {{label: good3, variant: softmax}}
  - {{label: bad, variant: zero-test-attn}}
baseline: base
sampler: {{type: grid, seed: {seed}}}
pruning: true
measure: {{latency: false, memory: false}}
"""


def _grid_order(experiment) -> list[str]:
    """The order in which the sweep's grid sampler visits the configurations (simulated)."""
    import optuna

    from attnbench.sweep.study import make_sampler, worker_sampler_seed

    study = optuna.create_study(sampler=make_sampler(experiment, worker_sampler_seed(experiment, 0)))
    study.optimize(lambda t: t.suggest_categorical("config", experiment.config_choices()) and 0.0,
                   n_trials=len(experiment.configs))
    return [t.params["config"] for t in study.trials]


def test_pruning_is_off_unless_the_file_asks(tmp_path):
    import optuna

    from attnbench.sweep import open_study

    experiment = load_experiment(experiment_file(tmp_path))
    assert "pruning" not in TINY.replace("pruning: false\n", "") and experiment.pruning is False
    path = tmp_path / "default.yaml"
    path.write_text(TINY.replace("pruning: false\n", "").format(name="default", variants="  - softmax", steps=1,
                                                                latency="false"))
    experiment = load_experiment(path)
    assert experiment.pruning is False
    study = open_study(experiment, "sqlite:///:memory:", 0)
    assert isinstance(study.pruner, optuna.pruners.NopPruner)


def test_pruning_never_prunes_the_baseline_and_stores_a_pruned_trial_once(tmp_path, zero_variant):
    from optuna.trial import TrialState

    path = tmp_path / "pruning.yaml"
    for seed in range(100):   # a grid order that runs the three good ones first (the pruner's 3 startup trials)
        path.write_text(PRUNING.format(seed=seed))
        experiment = load_experiment(path)
        if set(_grid_order(experiment)[:3]) == {"good1", "good2", "good3"}:
            break
    summary = run_sweep(experiment, results_dir=tmp_path / "results", device="cpu")
    import optuna
    study = optuna.load_study(study_name="pruning", storage=summary.storage)
    by_label = {t.user_attrs["label"]: t for t in study.trials}
    assert [t.user_attrs["label"] for t in study.trials][:3] == _grid_order(experiment)[:3], "the order as simulated"
    assert by_label["bad"].state == TrialState.PRUNED
    assert by_label["base"].state == TrialState.COMPLETE
    goods = sorted(by_label[g].intermediate_values[1] for g in ("good1", "good2", "good3"))
    assert by_label["base"].intermediate_values[1] < goods[1], "the baseline was worse than the median: it was spared"
    assert (summary.done, summary.failed, summary.pruned) == (5, 0, 1)

    df = rows(tmp_path / "results", "pruning")
    assert not df.duplicated(["trial", "seed"]).any()
    pruned = df[df["label"] == "bad"]
    assert list(pruned["seed"]) == [0] and list(pruned["status"]) == ["pruned"], pruned[["seed", "status", "error"]]
    assert (df[df["label"] != "bad"]["status"] == "complete").all()
    assert len(df) == 4 * 2 + 1


# --- per-configuration search -------------------------------------------------------------------

PER_CONFIG = """
name: {name}
data: {{dataset: digits}}
train: {{epochs: 1, max_steps: 2, batch_size: 32, num_threads: 1, eval_batch_size: 1024}}
seeds: [0]
variants:
  - softmax
  - {{label: angular, variant: angular, search: {{order: {order}}}}}
{rest}
measure: {{latency: false, memory: false}}
"""


def test_per_configuration_search_sweeps_an_option_the_baseline_lacks(tmp_path):
    from attnbench.results import report

    path = tmp_path / "own.yaml"
    path.write_text(PER_CONFIG.format(name="own", order="[0, 1]", rest="sampler: grid"))
    experiment = load_experiment(path)
    assert experiment.config_choices() == ["softmax", "angular order=0", "angular order=1"]
    assert experiment.n_trials() == 3
    summary = run_sweep(experiment, results_dir=tmp_path / "results", device="cpu")
    assert (summary.done, summary.failed) == (3, 0)
    df = rows(tmp_path / "results", "own")
    assert sorted(df["label"]) == ["angular", "angular", "softmax"]
    assert sorted(json.loads(o)["order"] for o in df[df["label"] == "angular"]["options"]) == [0, 1]
    assert sorted(report.summarize(df)["config"]) == ["angular (order=0)", "angular (order=1)", "softmax"]


def test_per_configuration_search_is_conditional_for_other_samplers(tmp_path):
    import optuna

    from attnbench.sweep.trial import _suggest

    path = tmp_path / "own.yaml"
    path.write_text(PER_CONFIG.format(name="own", order="{low: 0, high: 3}", rest="sampler: random\n"
                                      "budget: {trials: 4}\nsearch: {data.img_size: [8, 16]}"))
    experiment = load_experiment(path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(20):
        trial = study.ask()
        params = _suggest(trial, experiment)
        config = experiment.resolve(params)
        assert config.data_options == {"img_size": params["data.img_size"]}
        if config.variant == "angular":
            assert set(params) == {"config", "data.img_size", "angular/order"}, params
            assert config.options == {"order": params["angular/order"]}
        else:
            assert set(params) == {"config", "data.img_size"} and config.options == {}, params
        seen.add(config.variant)
        study.tell(trial, 0.0)
    assert seen == {"softmax", "angular"}


# --- failures: named, exit 1, and a fixed file runs them again ----------------------------------

def test_failed_trials_exit_1_and_a_fixed_file_runs_them_again(tmp_path):
    path = experiment_file(tmp_path, name="fixme", variants=("softmax", "identity"), latency="false")
    broken = path.read_text() + "constraints: {max_macs: 10}\n"   # a mistake only a trial finds
    path.write_text(broken)
    command = ["sweep", str(path), "--results", str(tmp_path / "results"), "--device", "cpu"]
    first = CliRunner().invoke(main, command, env={"COLUMNS": "200"})
    assert first.exit_code == 1, first.output
    assert "2 trials finished (2 failed), 2 run now" in first.output
    assert "failed: trial 0 (" in first.output and "exceed constraints.max_macs 10" in first.output
    again = CliRunner().invoke(main, command, env={"COLUMNS": "200"})
    assert again.exit_code == 1 and "2 failed), 0 run now" in again.output, "same file: not run again"

    path.write_text(broken.replace("constraints: {max_macs: 10}\n", ""))
    fixed = CliRunner().invoke(main, command, env={"COLUMNS": "200"})
    assert fixed.exit_code == 0, fixed.output
    assert "2 trials finished (0 failed), 2 run now" in fixed.output
    df = rows(tmp_path / "results", "fixme")
    assert len(df) == 4 and not df.duplicated(["trial", "seed"]).any() and (df["status"] == "complete").all()

    retry = run_sweep(load_experiment(path), results_dir=tmp_path / "results", device="cpu", retry_failed=True)
    assert (retry.retried, retry.ran_here) == (0, 0), "nothing failed: nothing to retry"


def test_retry_failed_runs_failures_of_an_unchanged_file_again(tmp_path, nan_variant):
    path = experiment_file(tmp_path, variants=("nan-test-attn",), latency="false")
    first = run_sweep(load_experiment(path), results_dir=tmp_path / "results", device="cpu")
    assert (first.failed, first.ran_here) == (1, 1)
    assert first.failures[0].label == "nan-test-attn" and "nan" in first.failures[0].reason.lower()
    same = run_sweep(load_experiment(path), results_dir=tmp_path / "results", device="cpu")
    assert (same.retried, same.ran_here) == (0, 0)
    forced = run_sweep(load_experiment(path), results_dir=tmp_path / "results", device="cpu", retry_failed=True)
    assert (forced.retried, forced.ran_here, forced.done, forced.failed) == (1, 1, 1, 1)
    df = rows(tmp_path / "results", "tiny")
    assert len(df) == 1 and df["optuna_trial"].iloc[0] == 1, "the re-run's row replaced the first run's"


# --- a trial taken over by another worker -------------------------------------------------------

def test_a_worker_whose_trial_was_taken_over_stores_nothing_and_goes_on(tmp_path, monkeypatch):
    """What a stalled worker meets when it comes back: meanwhile another worker failed its trial,
    ran it again and stored the re-run's rows (simulated here while the first seed trains). The
    stalled worker must not replace that file, must raise nothing, and the sweep goes on."""
    import optuna
    from optuna.trial import TrialState

    import attnbench.sweep.trial as trial_module
    from attnbench.sweep.study import RETRY_ATTR, _fail_trial_of_another_worker

    real_fit, taken = trial_module.fit, []

    def fit_while_another_worker_takes_over(*args, **kwargs):
        result = real_fit(*args, **kwargs)
        if not taken:
            other = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'results/tiny/study.db'}")
            mine = other.get_trials(states=(TrialState.RUNNING,))[0]
            _fail_trial_of_another_worker(other, mine)   # as fail_stale_trials does
            other.add_trial(optuna.trial.create_trial(   # the re-run, finished by the other worker
                state=TrialState.COMPLETE, value=50.0, params=mine.params, distributions=mine.distributions,
                user_attrs={RETRY_ATTR: mine.number, "label": "softmax"}, system_attrs=dict(mine.system_attrs)))
            rerun = other.trials[-1].number
            store.write_rows(tmp_path / "results" / "tiny", [
                {"kind": "trial", "study": "tiny", "trial": mine.number, "optuna_trial": rerun, "seed": seed,
                 "label": mine.user_attrs["label"], "status": "complete", "worker": "other:1"} for seed in (0, 1)],
                f"trials/trial-{mine.number:05d}")
            taken.append(mine.number)
        return result

    monkeypatch.setattr(trial_module, "fit", fit_while_another_worker_takes_over)
    logged = []

    class Display:
        def update(self, *args):
            pass

        def log(self, message):
            logged.append(message)

    experiment = load_experiment(experiment_file(tmp_path, variants=("softmax", "identity"), latency="false"))
    summary = run_sweep(experiment, results_dir=tmp_path / "results", device="cpu", display=Display())
    assert taken and (summary.done, summary.failed, summary.ran_here) == (2, 0, 1)
    assert any("was taken over by another worker" in m for m in logged), logged
    study = optuna.load_study(study_name="tiny", storage=summary.storage)
    states = {t.number: t.state for t in study.trials}
    assert states[taken[0]] == TrialState.FAIL and len(states) == 3
    df = rows(tmp_path / "results", "tiny")
    assert len(df) == 4 and not df.duplicated(["trial", "seed"]).any()
    assert all(states[n] == TrialState.COMPLETE for n in df["optuna_trial"]), df[["trial", "optuna_trial"]]
    assert (df[df["trial"] == taken[0]]["worker"] == "other:1").all(), "the re-run's file stands"


def test_failing_another_workers_trial_uses_tell_and_keeps_the_grid_sampler():
    """A dead worker's trial is failed through the public Study.tell: no Study.stop() from the grid
    sampler's hook (it would raise outside optimize), the study's sampler is put back, and a trial
    finished meanwhile stays finished."""
    import optuna
    from optuna.trial import TrialState

    from attnbench.sweep.study import _fail_trial_of_another_worker

    grid = optuna.samplers.GridSampler({"x": [0, 1]})
    study = optuna.create_study(sampler=grid)
    running = study.ask()
    running.suggest_categorical("x", [0, 1])
    done = study.ask()
    done.suggest_categorical("x", [0, 1])
    study.tell(done, 1.0)
    for trial in study.get_trials():
        _fail_trial_of_another_worker(study, trial)
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.COMPLETE]
    assert study.sampler is grid
