"""The sweep loop: check the experiment, open the study, claim room under the lock, run one trial
at a time, with Ctrl-C and SIGTERM held outside a trial's work (:mod:`attnbench.sweep.signals`)."""
from __future__ import annotations

import dataclasses
import math
import os
import socket
import time
from pathlib import Path
from typing import Any, Optional

import optuna
from optuna.trial import FrozenTrial, TrialState

from attnbench import provenance
from attnbench.experiment import Experiment
from attnbench.experiment_check import check_experiment
from attnbench.sweep.resume import Audit, audit_end, audit_start, check_resume
from attnbench.sweep.signals import SigintGuard
from attnbench.sweep.storage import StorageLock, heartbeat_settings, redact, storage_url, study_lock
from attnbench.sweep.study import (ERROR_ATTR, INTERRUPTED_ATTR, StudyProgress, claim_worker_slot,
                                   fail_orphaned_trials, make_sampler, open_study, quiet_optuna, requeue,
                                   requeue_failures, study_progress, trial_by_number, trial_key, was_taken_over,
                                   worker_sampler_seed)
from attnbench.sweep.trial import TrialContext, TrialFailed, TrialTakenOver, run_trial


@dataclasses.dataclass(frozen=True)
class TrialFailure:
    """A trial whose latest run failed, and why."""

    key: int
    label: str
    reason: str


@dataclasses.dataclass
class SweepSummary:
    study: str
    storage: str
    results: Path
    done: int                # trial keys with a final outcome (complete, pruned or failed)
    failed: int
    target: Optional[int]
    ran_here: int
    pruned: int = 0
    failures: list[TrialFailure] = dataclasses.field(default_factory=list)
    retried: int = 0         # failed trials queued again at the start (see requeue_failures)
    audit: Optional[Audit] = None   # the store checked at the end: one row per (trial, seed)
    timed_out: bool = False  # budget.timeout_s ended the sweep with trials of the budget left
    rerun: int = 0           # complete trials whose result file was missing or unreadable, run again


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run_sweep(experiment: Experiment, *, results_dir: Path = Path("results"), storage: Optional[str] = None,
              device: str = "auto", worker_index: Optional[int] = None, display: Optional["SweepDisplay"] = None,
              wait_for_others: bool = True, retry_failed: bool = False) -> SweepSummary:
    """Check the experiment, then run (or resume) its study until its budget is met.

    Nothing is written (no results folder, no study) unless :func:`check_experiment` passes.

    Args:
        experiment: the validated experiment.
        results_dir: the results folder; rows go to ``<results_dir>/<name>/trials/``.
        storage: an Optuna storage URL overriding the experiment's.
        device: ``cpu``, ``cuda`` (``cuda:N``) or ``auto``.
        worker_index: fixes this worker's sampler seed (``sampler seed x 1000 + index``); by
            default the worker takes the study's next free slot as its index (0 for the first
            worker of a study), so workers started separately get distinct seeds.
        display: progress callbacks (Rich in the CLI).
        wait_for_others: when nothing is left to start but other workers' trials still run,
            wait for them (and re-run theirs if they die) instead of returning.
        retry_failed: queue every failed trial again, not only those that failed under another
            version of the experiment file.

    Raises:
        ExperimentRefused: the experiment cannot run (one line per problem); nothing written.
        StorageError: the storage cannot be opened.
        Interrupted: SIGINT (Ctrl-C) or SIGTERM, a KeyboardInterrupt; finished trials are stored,
            the one cut short runs again at once on a resume.
    """
    checked = check_experiment(experiment, device=device, results_dir=results_dir)
    results = results_dir / experiment.name
    with quiet_optuna():
        url = storage_url(experiment, results_dir, storage)
        study = open_study(experiment, url, worker_sampler_seed(experiment, worker_index or 0))
        claim = study_lock(url, experiment.name)
        with claim:   # before this worker writes anything to the study
            check_resume(study, experiment, results, redact(url))
        if worker_index is None:
            worker_index = claim_worker_slot(study, url)
            study.sampler = make_sampler(experiment, worker_sampler_seed(experiment, worker_index))
        if experiment.multi_objective:
            study.set_metric_names([o.metric for o in experiment.objectives])
        env = provenance.environment(checked.device, threads=experiment.measure.threads)
        sigint = SigintGuard()
        ctx = TrialContext(experiment, results, checked.data, device=checked.device,
                           sampler_seed=worker_sampler_seed(experiment, worker_index), worker=_worker_name(),
                           environment=env, storage_url=url, point_data=checked.point_data, signals=sigint)
        target = experiment.n_trials()
        deadline = time.monotonic() + experiment.timeout_s if experiment.timeout_s else math.inf
        # Checking for room and creating the trial happen under one lock shared by all workers, so
        # together they start no more trials than the budget; the lock is let go once the trial exists.
        with claim:
            retried = requeue_failures(study, experiment, everything=retry_failed)
            lost = audit_start(study, results)
        if display:
            for t in retried:
                display.log(f"trial {trial_key(t)} ({t.user_attrs.get('label', '')}) failed before; it runs again")
            for t, reason in lost:
                display.log(f"trial {trial_key(t)} ({t.user_attrs.get('label', '')}) is complete in the study but "
                            f"{reason}; it runs again")
        with sigint:
            ran = _sweep_loop(study, ctx, claim, sigint, deadline, target, display, wait_for_others)
        state = study_progress(study)
        failures = [TrialFailure(trial_key(t), str(t.user_attrs.get("label", "")),
                                 str(t.user_attrs.get(ERROR_ATTR, ""))) for t in state.failures]
        audit = audit_end(study, experiment, results)
    if display:
        display.update(study, state, target)
    timed_out = time.monotonic() >= deadline and target is not None and state.done < target
    return SweepSummary(experiment.name, url, ctx.results, state.done, state.failed, target, ran, state.pruned,
                        failures, len(retried), audit=audit, timed_out=timed_out, rerun=len(lost))


def _sweep_loop(study: optuna.Study, ctx: TrialContext, claim: StorageLock, sigint: "SigintGuard",
                deadline: float, target: Optional[int], display: Optional["SweepDisplay"],
                wait_for_others: bool) -> int:
    """Start trials until the budget is met (or time is up); return how many ran here."""
    ran = 0
    while time.monotonic() < deadline:
        sigint.check()
        mine = None
        with claim:
            optuna.storages.fail_stale_trials(study)
            fail_orphaned_trials(study)
            state = study_progress(study)
            if display:
                display.update(study, state, target)
            if target is not None and state.done >= target:
                break
            if state.interrupted:
                requeue(study, state.interrupted)
                continue
            room = target is None or state.waiting > 0 or state.done + state.running < target
            if room:   # a queued re-run is taken first; otherwise a new trial is created
                mine = _optimize_one(study, ctx, claim, sigint, deadline, display)
        if not room:
            if not wait_for_others:
                break
            time.sleep(min(heartbeat_settings()[0], 2.0))
            continue
        if mine is None:
            continue
        ran += 1
        if display and mine.state == TrialState.FAIL and ERROR_ATTR in mine.user_attrs:
            display.log(f"trial {trial_key(mine)} ({mine.user_attrs.get('label', '')}) failed: "
                        f"{mine.user_attrs[ERROR_ATTR]}")
    sigint.check()
    return ran


def _optimize_one(study: optuna.Study, ctx: TrialContext, claim: StorageLock, sigint: SigintGuard,
                  deadline: float, display: Optional["SweepDisplay"]) -> Optional[FrozenTrial]:
    """Run one trial (a queued re-run, else a new one); ``claim`` is released once it exists.
    Returns the trial as stored, or None if none started or another worker took it over."""
    started: dict[str, Any] = {}

    def objective(trial: optuna.Trial) -> Any:
        claim.release()
        started["number"] = trial.number
        try:
            return run_trial(ctx, trial)   # a stop signal interrupts only its work (ctx.signals)
        except KeyboardInterrupt:   # wherever in the trial it landed: marked, so it runs again at once
            trial.set_user_attr(INTERRUPTED_ATTR, True)   # (a signal now is held by the guard)
            raise
        except Exception as err:
            started["raised"] = err
            raise

    try:
        study.optimize(objective, n_trials=1, catch=(TrialFailed,),
                       timeout=None if deadline is math.inf else max(deadline - time.monotonic(), 1))
    except Exception as err:
        # Taken over: this worker missed heartbeats for the grace period (a stall, a lost
        # connection, SIGSTOP), another worker failed its trial and queued a re-run, and Optuna
        # cannot record this outcome any more (which exception says so differs between Optuna
        # versions: "Cannot tell a FAIL trial", UpdateFinishedTrialError, "Should not reach").
        # The storage decides, not the exception. An exception the objective raised and Optuna
        # recorded (it raises it again after storing the trial FAIL) is no takeover: a bug, shown.
        mine = trial_by_number(study, started["number"]) if "number" in started else None
        recorded = err is started.get("raised") and not isinstance(err, TrialTakenOver)
        if mine is None or recorded or not was_taken_over(mine):
            raise
        if display:
            display.log(f"trial {trial_key(mine)} was taken over by another worker (no heartbeat for "
                        f"{heartbeat_settings()[1]} s); its re-run's result stands")
        return None
    return trial_by_number(study, started["number"]) if "number" in started else None


class SweepDisplay:
    """Progress callbacks; the CLI supplies a Rich implementation."""

    def update(self, study: optuna.Study, state: StudyProgress, target: Optional[int]) -> None:
        """Called before and after each trial."""

    def log(self, message: str) -> None:
        """A line worth showing (a failed trial and its reason)."""
