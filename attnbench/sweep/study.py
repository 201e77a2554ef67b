"""Bookkeeping of a study's trials: retry chains, progress, orphans and re-queued re-runs."""
from __future__ import annotations

import contextlib
import dataclasses
import datetime

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from attnbench.sweep.storage import heartbeat_settings

RETRY_ATTR = "attnbench_retry_of"        # user attr: the key of the trial this one re-runs
INTERRUPTED_ATTR = "attnbench_interrupted"
ERROR_ATTR = "attnbench_error"

def trial_key(trial: FrozenTrial) -> int:
    """The number of the first trial of a retry chain: a re-run writes the same result file."""
    if RETRY_ATTR in trial.user_attrs:
        return int(trial.user_attrs[RETRY_ATTR])
    history = RetryHeartbeatStaleTrialCallback.retry_history(trial)
    return history[0] if history else trial.number


@dataclasses.dataclass
class StudyProgress:
    done: int            # trial keys with a final outcome (complete, pruned or failed for a reason)
    failed: int
    running: int
    interrupted: list[FrozenTrial]   # cut short and not yet re-run
    waiting: int = 0     # queued re-runs (of killed workers' trials) that no worker has taken yet


def study_progress(study: optuna.Study) -> StudyProgress:
    trials = study.get_trials(deepcopy=False)
    final: dict[int, TrialState] = {}
    live: set[int] = set()
    waiting: set[int] = set()
    for t in trials:
        key = trial_key(t)
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
                t.state == TrialState.FAIL and ERROR_ATTR in t.user_attrs):
            final[key] = t.state
        elif t.state in (TrialState.RUNNING, TrialState.WAITING):
            live.add(key)
            if t.state == TrialState.WAITING:
                waiting.add(key)
    interrupted, requeued = [], set()
    for t in trials:
        key = trial_key(t)
        if t.state == TrialState.FAIL and ERROR_ATTR not in t.user_attrs and key not in final \
                and key not in live and key not in requeued:
            # Heartbeat-stale trials were already re-queued by Optuna's retry callback.
            retried = any(trial_key(o) == key and o.number > t.number for o in trials)
            if not retried:
                interrupted.append(t)
                requeued.add(key)
    failed = sum(1 for state in final.values() if state == TrialState.FAIL)
    running = live - waiting - set(final)
    return StudyProgress(len(final), failed, len(running), interrupted, len(waiting - running - set(final)))


def fail_orphaned_trials(study: optuna.Study) -> None:
    """Fail trials a worker created but never started: it died between Optuna's ``ask`` and the
    objective (Ctrl-C at that moment, say), so the trial has no heartbeat and would stay RUNNING
    forever. A started trial names its worker at once; one that still names none after the grace
    period is an orphan, and :func:`study_progress` then sees it as interrupted and re-queues it."""
    cutoff = datetime.datetime.now() - datetime.timedelta(seconds=heartbeat_settings()[1])
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if "worker" not in t.user_attrs and t.datetime_start is not None and t.datetime_start < cutoff:
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)


def _requeue(study: optuna.Study, trials: list[FrozenTrial]) -> None:
    """Queue each interrupted trial again with its parameters, as Optuna's heartbeat retry does
    (system attributes such as the grid point are kept, so the grid sampler stays consistent)."""
    for t in trials:
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.WAITING, params=t.params, distributions=t.distributions,
            user_attrs={RETRY_ATTR: trial_key(t)}, system_attrs=dict(t.system_attrs)))
