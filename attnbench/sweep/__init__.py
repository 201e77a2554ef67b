"""One Optuna study per experiment: check -> trial -> build -> count -> train every seed -> castle -> measure -> store.

Resuming is the default: the study lives in Optuna storage (a SQLite file under ``results/``
unless ``--storage`` names another), each finished trial's rows are one Parquet file named
after the trial, and a sweep started again runs only the work that is missing. A trial cut
short (Ctrl-C, a killed worker) is run again under the same trial key, so its file is
written once: nothing lost, nothing doubled. Several workers may share one study (see
:func:`run_sweep`); attnbench adds no scheduler of its own.

``storage``: where a study lives and the lock its workers share; ``study``: opening the study,
samplers, worker slots, trial keys, progress and re-queues; ``trial``: one trial and who owns
its result file; ``signals``: where Ctrl-C and SIGTERM interrupt and where they wait; ``loop``: the
check and the loop over trials.
"""
from attnbench.sweep.loop import SweepDisplay, SweepSummary, TrialFailure, run_sweep
from attnbench.sweep.signals import STOP_SIGNALS, Interrupted, SigintGuard
from attnbench.sweep.storage import (GRACE_S, HEARTBEAT_S, StorageError, StorageLock, heartbeat_settings,
                                     storage_url, study_lock)
from attnbench.sweep.study import (ERROR_ATTR, EXPERIMENT_ATTR, INTERRUPTED_ATTR, RETRY_ATTR, SLOT_ATTR,
                                   StudyProgress, claim_worker_slot, fail_orphaned_trials, open_study,
                                   requeue_failures, study_progress, trial_key, worker_sampler_seed)
from attnbench.sweep.trial import TrialContext, TrialFailed, TrialTakenOver, plan, run_trial

__all__ = ["SweepSummary", "SweepDisplay", "SigintGuard", "Interrupted", "STOP_SIGNALS", "TrialFailure", "open_study", "run_sweep", "storage_url",
           "trial_key", "study_progress", "StudyProgress", "StorageLock", "StorageError", "study_lock",
           "claim_worker_slot", "heartbeat_settings", "worker_sampler_seed", "plan", "run_trial", "TrialContext",
           "TrialFailed", "TrialTakenOver", "fail_orphaned_trials", "requeue_failures", "HEARTBEAT_S", "GRACE_S",
           "SLOT_ATTR", "RETRY_ATTR", "INTERRUPTED_ATTR", "ERROR_ATTR", "EXPERIMENT_ATTR"]
