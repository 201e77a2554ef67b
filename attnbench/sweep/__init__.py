"""One Optuna study per experiment: trial -> build -> count -> train every seed -> castle -> measure -> store.

Resuming is the default: the study lives in Optuna storage (a SQLite file under ``results/``
unless ``--storage`` names another), each finished trial's rows are one Parquet file named
after the trial, and a sweep started again runs only the work that is missing. A trial cut
short (Ctrl-C, a killed worker) is run again under the same trial key, so its file is
written once: nothing lost, nothing doubled. Several workers may share one study (see
:func:`run_worker`); attnbench adds no scheduler of its own.
"""
from attnbench.sweep.bookkeeping import (ERROR_ATTR, INTERRUPTED_ATTR, RETRY_ATTR, StudyProgress,
                                         fail_orphaned_trials, study_progress, trial_key)
from attnbench.sweep.loop import SigintGuard, SweepDisplay, SweepSummary, run_sweep
from attnbench.sweep.storage import (GRACE_S, HEARTBEAT_S, SLOT_ATTR, StorageError, StorageLock,
                                     claim_worker_slot, heartbeat_settings, open_study, storage_url,
                                     worker_sampler_seed)
from attnbench.sweep.trial import TrialContext, TrialFailed, data_loader, plan, run_trial

__all__ = ["SweepSummary", "SweepDisplay", "SigintGuard", "open_study", "run_sweep", "storage_url", "trial_key",
           "study_progress", "StudyProgress", "StorageLock", "StorageError", "claim_worker_slot",
           "heartbeat_settings", "worker_sampler_seed", "plan", "run_trial", "data_loader", "TrialContext",
           "TrialFailed", "fail_orphaned_trials", "HEARTBEAT_S", "GRACE_S", "SLOT_ATTR", "RETRY_ATTR",
           "INTERRUPTED_ATTR", "ERROR_ATTR"]
