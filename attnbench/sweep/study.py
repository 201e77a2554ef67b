"""The study of an experiment: opening it, samplers and worker slots, trial keys and retry chains,
progress, and re-queued re-runs.

A trial that is run again (its worker was killed, interrupted, or it failed under an experiment
file since changed) is a new Optuna trial with the same *key*, the number of the first trial of
its chain; the result file is named after the key, so it is written once per key.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import warnings

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from attnbench.experiment import Experiment
from attnbench.sweep.storage import (StorageError, StorageLock, heartbeat_settings, make_storage, redact,
                                     schema_ready, sqlite_path, study_lock, with_retries)

RETRY_ATTR = "attnbench_retry_of"        # user attr: the key of the trial this one re-runs
INTERRUPTED_ATTR = "attnbench_interrupted"
ERROR_ATTR = "attnbench_error"           # user attr: why a trial failed (a failure of the trial itself)
EXPERIMENT_ATTR = "attnbench_experiment"  # user attr: Experiment.fingerprint() of the file it ran under
SLOT_ATTR = "attnbench_worker_slots"     # study user attr: worker slots handed out (sampler seeds)


# --- opening ----------------------------------------------------------------------------------

@contextlib.contextmanager
def quiet_optuna():
    """Optuna's own log lines and experimental-feature warnings off (failures are reported through
    attnbench's display; heartbeats and retries, marked experimental, are what make resuming
    safe), and back as they were after."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def open_study(experiment: Experiment, url: str, sampler_seed: int) -> optuna.Study:
    """Create or load the experiment's study (safe when workers start together).

    Raises:
        StorageError: an unreachable or malformed storage URL, a missing driver, or an existing
            study with other objectives (one line, naming the storage).
    """
    # Pruning is off unless the file asks (a study of one objective only; the parser enforces it).
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1) if experiment.pruning
              else optuna.pruners.NopPruner())
    database = sqlite_path(url)
    if database and os.path.isfile(database) and os.path.getsize(database) == 0:
        raise StorageError(f"storage '{database}' is an empty file (0 bytes), not a study database; move it away "
                           f"to start the study anew (a new study would overwrite the result files beside it)")
    directions = [optuna.study.StudyDirection.MAXIMIZE if o.direction == "maximize"
                  else optuna.study.StudyDirection.MINIMIZE for o in experiment.objectives]
    try:
        # Workers starting together on an empty database race to create Optuna's schema (tables,
        # enum types, the alembic stamp) and the study: take turns, and retry against other tools.
        # Once the schema is complete, many workers may open the storage at once.
        with quiet_optuna(), contextlib.nullcontext() if schema_ready(url) else StorageLock(url, "attnbench:create"):
            storage = make_storage(url)
            study = with_retries(lambda: optuna.create_study(
                study_name=experiment.name, storage=storage, load_if_exists=True, pruner=pruner,
                sampler=make_sampler(experiment, sampler_seed),
                directions=[o.direction for o in experiment.objectives]))
    except StorageError:
        raise
    except Exception as err:  # re-raised as one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise StorageError(f"storage '{redact(url)}': {type(err).__name__}: {first}") from err
    if list(study.directions) != directions:
        raise StorageError(f"storage '{redact(url)}': study '{experiment.name}' exists with directions "
                           f"{[d.name.lower() for d in study.directions]}, but the experiment asks for "
                           f"{[o.direction for o in experiment.objectives]}; rename the experiment")
    return study


def make_sampler(experiment: Experiment, seed: int) -> optuna.samplers.BaseSampler:
    if experiment.sampler == "grid":
        return optuna.samplers.GridSampler(experiment.grid(), seed=seed)
    if experiment.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if experiment.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def worker_sampler_seed(experiment: Experiment, worker_index: int) -> int:
    """The sampler seed of one worker of the study: ``sampler seed x 1000 + worker index``.

    Except for the grid sampler: its seed shuffles the grid, and a trial's grid id must name the
    same configuration in every worker (and in every resumed run), so all share the index-0
    seed. Grid workers never pick the same point anyway: trial number n runs grid point n.
    """
    return experiment.sampler_seed * 1000 + (0 if experiment.sampler == "grid" else worker_index)


def claim_worker_slot(study: optuna.Study, url: str) -> int:
    """The next free worker slot of the study (0 for its first worker): workers started
    separately, on one machine or several, get distinct sampler seeds without coordination."""
    with study_lock(url, study.study_name):
        slot = int(study.user_attrs.get(SLOT_ATTR, 0))
        study.set_user_attr(SLOT_ATTR, slot + 1)
    return slot


# --- trials and their keys ---------------------------------------------------------------------

def trial_key(trial: FrozenTrial) -> int:
    """The number of the first trial of a retry chain: a re-run writes the same result file."""
    if RETRY_ATTR in trial.user_attrs:
        return int(trial.user_attrs[RETRY_ATTR])
    history = RetryHeartbeatStaleTrialCallback.retry_history(trial)
    return history[0] if history else trial.number


def trial_by_number(study: optuna.Study, number: int) -> FrozenTrial:
    """The trial ``number`` of the study as the storage holds it now."""
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number)


def is_final(trial: FrozenTrial) -> bool:
    """Complete, pruned, or failed for a reason of its own (not cut short: those run again)."""
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        trial.state == TrialState.FAIL and ERROR_ATTR in trial.user_attrs)


def was_taken_over(trial: FrozenTrial) -> bool:
    """Failed by another worker while its own worker still ran it: the worker missed heartbeats
    for the grace period (a stall, a lost connection, SIGSTOP), so the trial was failed and queued
    to run again, and its re-run owns the result file."""
    return trial.state == TrialState.FAIL and ERROR_ATTR not in trial.user_attrs \
        and INTERRUPTED_ATTR not in trial.user_attrs


# --- progress ---------------------------------------------------------------------------------

@dataclasses.dataclass
class StudyProgress:
    """Where a study stands, by trial key (each key counts once: its latest trial decides)."""

    done: int            # keys with a final outcome (complete, pruned or failed for a reason)
    failed: int
    running: int
    interrupted: list[FrozenTrial]   # cut short and not yet re-run
    waiting: int = 0     # queued re-runs that no worker has taken yet
    failures: list[FrozenTrial] = dataclasses.field(default_factory=list)   # the failed keys' trials
    pruned: int = 0


def study_progress(study: optuna.Study) -> StudyProgress:
    latest: dict[int, FrozenTrial] = {}
    for t in study.get_trials(deepcopy=False):
        key = trial_key(t)
        if key not in latest or t.number > latest[key].number:
            latest[key] = t
    progress = StudyProgress(0, 0, 0, [])
    for key in sorted(latest):
        t = latest[key]
        if is_final(t):
            progress.done += 1
            progress.pruned += t.state == TrialState.PRUNED
            if t.state == TrialState.FAIL:
                progress.failures.append(t)
        elif t.state == TrialState.RUNNING:
            progress.running += 1
        elif t.state == TrialState.WAITING:
            progress.waiting += 1
        else:   # failed without a reason: killed, interrupted, or past the heartbeat retries
            progress.interrupted.append(t)
    progress.failed = len(progress.failures)
    return progress


def requeue(study: optuna.Study, trials: list[FrozenTrial]) -> None:
    """Queue each trial again with its parameters, as Optuna's heartbeat retry does (system
    attributes such as the grid point are kept, so the grid sampler stays consistent)."""
    for t in trials:
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.WAITING, params=t.params, distributions=t.distributions,
            user_attrs={RETRY_ATTR: trial_key(t)}, system_attrs=dict(t.system_attrs)))


def requeue_failures(study: optuna.Study, experiment: Experiment, everything: bool = False) -> list[FrozenTrial]:
    """Queue again the failed trials that failed under another version of the experiment file
    (a fixed mistake must not leave the study stuck), or every failed trial (``everything``).
    Call it under the study's lock; returns the trials re-queued."""
    fingerprint = experiment.fingerprint()
    stale = [t for t in study_progress(study).failures
             if everything or t.user_attrs.get(EXPERIMENT_ATTR) != fingerprint]
    requeue(study, stale)
    return stale


def fail_orphaned_trials(study: optuna.Study) -> None:
    """Fail trials a worker created but never started: it died between Optuna's ``ask`` and the
    objective (Ctrl-C at that moment, say), so the trial has no heartbeat and would stay RUNNING
    forever. A started trial names its worker at once; one that still names none after the grace
    period is an orphan, and :func:`study_progress` then sees it as interrupted and re-queues it."""
    cutoff = datetime.datetime.now() - datetime.timedelta(seconds=heartbeat_settings()[1])
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if "worker" not in t.user_attrs and t.datetime_start is not None and t.datetime_start < cutoff:
            _fail_trial_of_another_worker(study, t)


def _fail_trial_of_another_worker(study: optuna.Study, trial: FrozenTrial) -> None:
    """Mark a RUNNING trial of another (dead) worker FAIL, through ``Study.tell``.

    ``tell`` first runs the sampler's ``after_trial`` hook, and the grid sampler's calls
    ``Study.stop()``, which raises outside ``Study.optimize``; a random sampler's hook does nothing,
    so it stands in for that one call (the study's own sampler is put back at once). A trial that
    another worker finished meanwhile is left as it is.
    """
    sampler, study.sampler = study.sampler, optuna.samplers.RandomSampler()
    try:
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
    finally:
        study.sampler = sampler
