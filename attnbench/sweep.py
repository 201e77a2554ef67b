"""One Optuna study per experiment: trial -> build -> count -> train every seed -> castle -> measure -> store.

Resuming is the default: the study lives in Optuna storage (a SQLite file under ``results/``
unless ``--storage`` names another), each finished trial's rows are one Parquet file named
after the trial, and a sweep started again runs only the work that is missing. A trial cut
short (Ctrl-C, a killed worker) is run again under the same trial key, so its file is
written once: nothing lost, nothing doubled. Several workers may share one study (see
:func:`run_worker`); attnbench adds no scheduler of its own.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import json
import math
import os
import signal
import socket
import statistics
import threading
import time
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable, Optional

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from attnbench import data, measure, models, store
from attnbench.experiment import CONFIG_PARAM, Experiment, VariantConfig
from attnbench.train import TrainConfig, TrainResult, default_arch, fit

__all__ = ["SweepSummary", "open_study", "run_sweep", "storage_url", "trial_key", "study_progress",
           "StorageLock", "claim_worker_slot", "heartbeat_settings", "worker_sampler_seed"]

HEARTBEAT_S = 10          # a worker that stops beating for GRACE_S has its trial failed and retried
GRACE_S = 30              # both may be set per process: ATTNBENCH_HEARTBEAT_S, ATTNBENCH_GRACE_S
SLOT_ATTR = "attnbench_worker_slots"     # study user attr: worker slots handed out (sampler seeds)
RETRY_ATTR = "attnbench_retry_of"        # user attr: the key of the trial this one re-runs
INTERRUPTED_ATTR = "attnbench_interrupted"
ERROR_ATTR = "attnbench_error"


# --- storage and study --------------------------------------------------------------------------

def storage_url(experiment: Experiment, results_dir: Path, storage: Optional[str] = None) -> str:
    """``storage`` (CLI) > the experiment's ``storage`` > ``sqlite:///<results>/<name>/study.db``."""
    url = storage or experiment.storage
    if url:
        return url
    path = (results_dir / experiment.name / "study.db").resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def heartbeat_settings() -> tuple[int, int]:
    """(heartbeat interval, grace period) in seconds: ``ATTNBENCH_HEARTBEAT_S`` and
    ``ATTNBENCH_GRACE_S`` from the environment, else :data:`HEARTBEAT_S` and :data:`GRACE_S`."""
    values = []
    for name, default in (("ATTNBENCH_HEARTBEAT_S", HEARTBEAT_S), ("ATTNBENCH_GRACE_S", GRACE_S)):
        raw = os.environ.get(name, "").strip()
        try:
            value = int(raw) if raw else default
        except ValueError:
            value = 0
        if value <= 0:
            raise StorageError(f"{name}={raw!r}: expected a positive whole number of seconds")
        values.append(value)
    if values[1] <= values[0]:
        raise StorageError(f"the grace period ({values[1]} s, ATTNBENCH_GRACE_S) must be longer than the "
                           f"heartbeat interval ({values[0]} s, ATTNBENCH_HEARTBEAT_S)")
    return values[0], values[1]


def _storage(url: str) -> optuna.storages.BaseStorage:
    retry = RetryHeartbeatStaleTrialCallback(max_retry=3)
    if _is_journal(url):
        from optuna.storages.journal import JournalFileBackend, JournalStorage
        return JournalStorage(JournalFileBackend(url))
    engine = {"pool_pre_ping": True} if not url.startswith("sqlite") else {"connect_args": {"timeout": 60}}
    heartbeat, grace = heartbeat_settings()
    return _with_retries(lambda: optuna.storages.RDBStorage(
        url, engine_kwargs=engine, heartbeat_interval=heartbeat, grace_period=grace,
        heartbeat_stale_trial_callback=retry))


def _is_journal(url: str) -> bool:
    return url.endswith((".log", ".jsonl")) and "://" not in url   # a journal file path


class StorageLock:
    """A lock shared by every attnbench worker of one storage, held only for moments: a
    PostgreSQL session advisory lock (released by the server if the worker dies), an
    ``flock`` on a file beside a SQLite or journal file, or nothing for other storages.

    It serializes what Optuna leaves racy between processes: creating the schema and the
    study on an empty database, and "is there room for another trial? then create it", so
    several workers never start more trials than the budget. Re-entrant use is not supported;
    :meth:`release` may be called early (and again).
    """

    def __init__(self, url: str, name: str):
        self.url, self.key = url, zlib.crc32(name.encode())
        self._held: Any = None
        self._engine = None

    def acquire(self) -> None:
        if self.url.startswith(("postgresql", "postgres://")):
            import sqlalchemy
            if self._engine is None:
                self._engine = sqlalchemy.create_engine(self.url, poolclass=sqlalchemy.pool.NullPool)
            conn = _with_retries(self._engine.connect, attempts=4)   # a server busy with many workers
            try:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
                conn.commit()
            except BaseException:
                conn.close()
                raise
            self._held = conn
        elif path := self._file():
            import fcntl
            handle = open(path, "a+")   # noqa: SIM115 - closed in release()
            fcntl.flock(handle, fcntl.LOCK_EX)
            self._held = handle

    def release(self) -> None:
        held, self._held = self._held, None
        if held is None:
            return
        with contextlib.suppress(Exception):   # closing the session or the file releases it anyway
            if hasattr(held, "execute"):
                import sqlalchemy
                held.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
                held.commit()
        with contextlib.suppress(Exception):
            held.close()

    def _file(self) -> Optional[str]:
        try:
            import fcntl  # noqa: F401 - POSIX only; elsewhere no lock
        except ImportError:
            return None
        if _is_journal(self.url):
            return self.url + ".lock"
        if self.url.startswith("sqlite:///") and ":memory:" not in self.url:
            return self.url[len("sqlite:///"):] + ".lock"
        return None

    def __enter__(self) -> "StorageLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _with_retries(make: Callable[[], Any], attempts: int = 8):
    """Several workers starting together on an empty database race to create the schema and the
    study; the loser sees an integrity or duplicate error. Retry with jittered backoff."""
    for attempt in range(attempts):
        try:
            return make()
        except Exception:  # noqa: BLE001 - the last attempt re-raises
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1) + (os.getpid() % 7) * 0.05)


def worker_sampler_seed(experiment: Experiment, worker_index: int) -> int:
    """The sampler seed of one worker of the study: ``sampler seed x 1000 + worker index``.

    Except for the grid sampler: its seed shuffles the grid, and a trial's grid id must name the
    same configuration in every worker (and in every resumed run), so all share the index-0
    seed. Grid workers never pick the same point anyway: trial number n runs grid point n.
    """
    return experiment.sampler_seed * 1000 + (0 if experiment.sampler == "grid" else worker_index)


def _sampler(experiment: Experiment, seed: int) -> optuna.samplers.BaseSampler:
    if experiment.sampler == "grid":
        return optuna.samplers.GridSampler(experiment.grid(), seed=seed)
    if experiment.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if experiment.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


class StorageError(RuntimeError):
    """The Optuna storage cannot be opened, or holds a study of another shape."""


def open_study(experiment: Experiment, url: str, sampler_seed: int) -> optuna.Study:
    """Create or load the experiment's study (safe when workers start together).

    Raises:
        StorageError: an unreachable or malformed storage URL, a missing driver, or an existing
            study with other objectives (one line, naming the storage).
    """
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
              if experiment.pruning and not experiment.multi_objective else optuna.pruners.NopPruner())
    directions = [optuna.study.StudyDirection.MAXIMIZE if o.direction == "maximize"
                  else optuna.study.StudyDirection.MINIMIZE for o in experiment.objectives]
    try:
        # Workers starting together on an empty database race to create Optuna's schema (tables,
        # enum types, the alembic stamp) and the study: take turns, and retry against other tools.
        # Once the schema is complete, many workers may open the storage at once.
        with contextlib.nullcontext() if _schema_ready(url) else StorageLock(url, "attnbench:create"):
            storage = _storage(url)
            study = _with_retries(lambda: optuna.create_study(
                study_name=experiment.name, storage=storage, load_if_exists=True, pruner=pruner,
                sampler=_sampler(experiment, sampler_seed), directions=[o.direction for o in experiment.objectives]))
    except StorageError:
        raise
    except Exception as err:  # noqa: BLE001 - reported in one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise StorageError(f"storage '{_redact(url)}': {type(err).__name__}: {first}") from err
    if list(study.directions) != directions:
        raise StorageError(f"storage '{_redact(url)}': study '{experiment.name}' exists with directions "
                           f"{[d.name.lower() for d in study.directions]}, but the experiment asks for "
                           f"{[o.direction for o in experiment.objectives]}; rename the experiment")
    return study


def _schema_ready(url: str) -> bool:
    """Whether a PostgreSQL storage already holds Optuna's complete schema (False if unsure)."""
    if not url.startswith("postgresql"):
        return False
    import sqlalchemy
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            if not sqlalchemy.inspect(conn).has_table("alembic_version"):
                return False
            return conn.execute(sqlalchemy.text("SELECT count(*) FROM alembic_version")).scalar() > 0
    except Exception:  # noqa: BLE001 - the locked path reports the error
        return False
    finally:
        engine.dispose()


def claim_worker_slot(study: optuna.Study, url: str) -> int:
    """The next free worker slot of the study (0 for its first worker): workers started
    separately, on one machine or several, get distinct sampler seeds without coordination."""
    with StorageLock(url, f"attnbench:study:{study.study_name}"):
        slot = int(study.user_attrs.get(SLOT_ATTR, 0))
        study.set_user_attr(SLOT_ATTR, slot + 1)
    return slot


def _redact(url: str) -> str:
    """The URL without its password."""
    head, sep, tail = url.partition("://")
    if sep and "@" in tail and ":" in tail.split("@", 1)[0]:
        user = tail.split("@", 1)[0].split(":", 1)[0]
        return f"{head}://{user}:***@{tail.split('@', 1)[1]}"
    return url


# --- bookkeeping of the study's trials ----------------------------------------------------------

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


# --- one trial ----------------------------------------------------------------------------------

class TrialFailed(Exception):
    """A trial that failed for a reason worth recording (diverged, out of budget, crashed)."""


@dataclasses.dataclass
class TrialContext:
    experiment: Experiment
    results: Path                 # results/<study>
    data: Callable[[dict], Any]   # data set options swept by the trial -> splits (cached)
    device: str
    sampler_seed: int
    worker: str
    environment: dict[str, Any]
    splits: Any = None            # this trial's splits

    @property
    def arch(self) -> str:
        return self.experiment.arch or default_arch(self.splits)


def _suggest(trial: optuna.Trial, experiment: Experiment) -> dict[str, Any]:
    params = {}
    if len(experiment.configs) > 1:
        params[CONFIG_PARAM] = trial.suggest_categorical(CONFIG_PARAM, [c.label for c in experiment.configs])
    for p in experiment.search:
        if p.kind == "categorical":
            params[p.name] = trial.suggest_categorical(p.name, list(p.choices))
        elif p.kind == "int":
            params[p.name] = trial.suggest_int(p.name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            params[p.name] = trial.suggest_float(p.name, p.low, p.high, step=p.step, log=p.log)
    return params


def _model_kwargs(ctx: TrialContext) -> dict[str, Any]:
    s = ctx.splits
    return dict(num_classes=s.num_classes, in_chans=s.in_chans, img_size=s.img_size, **ctx.experiment.model_kwargs)


def _build(ctx: TrialContext, config: VariantConfig, seed: int):
    return models.create_model(ctx.arch, config.variant, config.options, seed=seed, **_model_kwargs(ctx))


def _input_shape(ctx: TrialContext) -> tuple[int, int, int]:
    return (ctx.splits.in_chans, ctx.splits.img_size, ctx.splits.img_size)


def _costs(ctx: TrialContext, config: VariantConfig) -> dict[str, Any]:
    """MACs and parameters of the inference form, counted before any training."""
    model = models.castle(_build(ctx, config, seed=0))
    tokens = model.patch_embed.num_patches + getattr(model, "num_prefix_tokens", 1)
    attention = sum(layer.macs(tokens) for _, layer in models.variant_layers(model))
    return {"macs": measure.count_macs(model, _input_shape(ctx)), "attention_macs": attention,
            "params": measure.count_params(model), "num_tokens": tokens, "arch": ctx.arch}


def _speed(ctx: TrialContext, config: VariantConfig, model) -> dict[str, Any]:
    spec = ctx.experiment.measure
    out: dict[str, Any] = {}
    if spec.latency:
        import torch
        x = torch.randn(spec.batch_size, *_input_shape(ctx), device=ctx.device)
        lat = measure.time_latency(model.eval(), x, threads=spec.threads, repeats=spec.repeats, device=ctx.device)
        out.update(latency_median_ms=lat.median_ms, latency_iqr_ms=lat.iqr_ms, latency_batch=spec.batch_size,
                   latency_threads=lat.threads, samples_per_s=lat.samples_per_s)
    if spec.memory:
        build = functools.partial(_castled_model, ctx.arch, config.variant, config.options, **_model_kwargs(ctx))
        mem = measure.peak_memory(build, (spec.batch_size, *_input_shape(ctx)), device=ctx.device,
                                  threads=spec.threads)
        # The forward's own peak; the process peak is mostly the interpreter and torch itself.
        out.update(peak_memory_mb=mem.forward_bytes / 2**20, process_peak_memory_mb=mem.peak_bytes / 2**20,
                   memory_method=mem.method)
    return out


def _castled_model(arch: str, variant: str, options: dict, **model_kwargs):
    """Module-level (picklable) builder of the inference form, for the memory child process."""
    return models.castle(models.create_model(arch, variant, options, **model_kwargs))


def _row(ctx: TrialContext, trial: optuna.Trial, key: int, config: VariantConfig, seed: int,
         costs: dict, result: Optional[TrainResult], status: str, error: Optional[str], wall: float) -> dict[str, Any]:
    """One (trial, seed) row with its provenance; DESIGN.md "Results"."""
    e = ctx.experiment
    row = {
        "kind": "trial", "study": e.name, "trial": key, "optuna_trial": trial.number, "seed": seed,
        "label": config.label, "variant": config.variant, "options": json.dumps(config.options, sort_keys=True),
        "params_json": json.dumps(trial.params, sort_keys=True, default=str),
        "arch": ctx.arch, "model_kwargs": json.dumps(e.model_kwargs, sort_keys=True),
        **ctx.splits.summary(), "data_root": e.data_root,
        "train_config": json.dumps(e.train, sort_keys=True), "sampler": e.sampler,
        "sampler_seed": ctx.sampler_seed, "worker": ctx.worker, "status": status, "error": error,
        "wall_time_s": wall, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **costs, **ctx.environment,
    }
    row.update({f"opt_{k}": v for k, v in config.options.items()})
    if result is not None:
        row.update(_result_columns(result))
    return row


def _result_columns(result: TrainResult) -> dict[str, Any]:
    summary = result.summary()
    curve = [{k: d[k] for k in ("progress", "layer", "mask_density", "branch_ratio") if k in d}
             for d in result.diagnostics if "mask_density" in d]
    return {
        "top1": result.test_top1_castled, "top1_train_form": result.test_top1, "switch_cost": result.switch_cost,
        "switch_flips": result.switch_flips, "best_val_top1": result.val_top1,
        "best_val_top1_castled": result.val_top1_castled, "checkpoint": result.checkpoint,
        "best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "steps": result.steps,
        "train_time_s": result.train_time_s, "stopped": result.stopped,
        "mask_density_end": result.mask_density, "branch_ratio_end": result.branch_ratio,
        "mask_density_curve": json.dumps(curve) if curve else None,
        "train_device": summary["device"], "train_threads": summary["num_threads"],
    }


def run_trial(ctx: TrialContext, trial: optuna.Trial) -> Any:
    """The Optuna objective: returns the objectives' means over seeds."""
    e = ctx.experiment
    frozen = trial.study._storage.get_trial(trial._trial_id)
    key = trial_key(frozen)
    config = e.resolve(_suggest(trial, e))
    ctx = dataclasses.replace(ctx, splits=ctx.data(config.data_options))
    trial.set_user_attr("label", config.label)
    trial.set_user_attr("worker", ctx.worker)   # which worker runs it (host:pid), for watching a study
    rows: list[dict] = []
    started = time.perf_counter()
    try:
        costs = _costs(ctx, config)
        if e.max_macs is not None and costs["macs"] > e.max_macs:
            raise TrialFailed(f"{costs['macs']:,} MACs exceed constraints.max_macs {e.max_macs:,}")
        results, last_model = [], None
        for index, seed in enumerate(e.seeds):
            seed_start = time.perf_counter()
            model = _build(ctx, config, seed).to(ctx.device)
            report = _pruning_reporter(trial, e) if index == 0 else None
            try:
                result = fit(model, ctx.splits, TrainConfig(**{**e.train, "seed": seed, "device": ctx.device}),
                             callback=report, progress=False)
            except optuna.TrialPruned:
                rows.append(_row(ctx, trial, key, config, seed, costs, None, "pruned", None,
                                 time.perf_counter() - seed_start))
                raise
            if not result.ok:
                rows.append(_row(ctx, trial, key, config, seed, costs, result, "failed", result.error,
                                 time.perf_counter() - seed_start))
                raise TrialFailed(f"seed {seed}: {result.error}")
            results.append(result)
            rows.append(_row(ctx, trial, key, config, seed, costs, result, "complete", None,
                             time.perf_counter() - seed_start))
            last_model = model
        speed = _speed(ctx, config, models.castle(last_model))
        for row in rows:
            row.update(speed)
        values = _objective_values(e, rows)
        return values if len(values) > 1 else values[0]
    except TrialFailed as err:
        trial.set_user_attr(ERROR_ATTR, str(err))
        if not rows:
            rows.append(_row(ctx, trial, key, config, e.seeds[0], locals().get("costs", {}), None, "failed",
                             str(err), time.perf_counter() - started))
        raise
    except (KeyboardInterrupt, SystemExit):
        trial.set_user_attr(INTERRUPTED_ATTR, True)
        rows = []   # an interrupted trial is re-run in full; write nothing
        raise
    except Exception as err:  # a crash in one trial is recorded; the sweep goes on
        message = f"{type(err).__name__}: {err}"
        trial.set_user_attr(ERROR_ATTR, message)
        rows.append(_row(ctx, trial, key, config, e.seeds[min(len(rows), len(e.seeds) - 1)],
                         locals().get("costs", {}), None, "failed", message, time.perf_counter() - started))
        raise TrialFailed(message) from err
    finally:
        if rows:
            store.write_rows(ctx.results, rows, f"trials/trial-{key:05d}")


def _pruning_reporter(trial: optuna.Trial, e: Experiment) -> Optional[Callable[[int, float], None]]:
    if e.multi_objective or not e.pruning:
        return None

    def report(record: dict[str, Any]) -> None:
        trial.report(record["val_top1"], record["epoch"])
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {record['epoch']} (validation top-1 {record['val_top1']:.2f})")

    return report


def _objective_values(e: Experiment, rows: list[dict]) -> list[float]:
    values = []
    for objective in e.objectives:
        samples = [r[objective.metric] for r in rows if r.get(objective.metric) is not None]
        if not samples:
            raise TrialFailed(f"objective '{objective.metric}' was not measured "
                              f"(enable it under 'measure')")
        values.append(float(statistics.fmean(samples)))
    return values


def data_loader(experiment: Experiment) -> Callable[[dict], Any]:
    """Splits for the experiment's data with a trial's swept ``data.*`` options, loaded once each.

    Raises ``attnbench.data.DataError`` for bad paths or options.
    """

    @functools.lru_cache(maxsize=4)
    def load(frozen: tuple) -> Any:
        return data.load_dataset(experiment.dataset, root=experiment.data_root,
                                 **{**experiment.data_options, **dict(frozen)})

    return lambda overrides: load(tuple(sorted(overrides.items())))


def plan(experiment: Experiment) -> tuple[str, list[tuple[VariantConfig, dict[str, Any]]]]:
    """(architecture, [(configuration, MACs and params of its inference form)]) without training.

    A continuous search space has no finite plan; then only the base configuration is listed.
    """
    ctx = TrialContext(experiment, Path("."), data_loader(experiment), device="cpu",
                       sampler_seed=experiment.sampler_seed, worker="", environment={})
    configs = experiment.plan() or [experiment.resolve({})]
    costs = [(c, _costs(dataclasses.replace(ctx, splits=ctx.data(c.data_options)), c)) for c in configs]
    return costs[0][1]["arch"], costs


# --- the sweep ----------------------------------------------------------------------------------

@dataclasses.dataclass
class SweepSummary:
    study: str
    storage: str
    results: Path
    done: int
    failed: int
    target: Optional[int]
    ran_here: int


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run_sweep(experiment: Experiment, *, results_dir: Path = Path("results"), storage: Optional[str] = None,
              device: str = "auto", worker_index: Optional[int] = None, display: Optional["SweepDisplay"] = None,
              wait_for_others: bool = True) -> SweepSummary:
    """Run (or resume) the experiment's study until its budget is met.

    Args:
        experiment: the validated experiment.
        results_dir: the results folder; rows go to ``<results_dir>/<name>/trials/``.
        storage: an Optuna storage URL overriding the experiment's.
        device: ``cpu``, ``cuda`` or ``auto``.
        worker_index: fixes this worker's sampler seed (``sampler seed x 1000 + index``); by
            default the worker takes the study's next free slot as its index (0 for the first
            worker of a study), so workers started separately get distinct seeds.
        display: progress callbacks (Rich in the CLI).
        wait_for_others: when nothing is left to start but other workers' trials still run,
            wait for them (and re-run theirs if they die) instead of returning.
    """
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    optuna.logging.set_verbosity(optuna.logging.ERROR)   # failures are reported through ``display``
    # Heartbeats and retries are marked experimental; they are what makes resuming safe.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    url = storage_url(experiment, results_dir, storage)
    study = open_study(experiment, url, worker_sampler_seed(experiment, worker_index or 0))
    if worker_index is None:
        worker_index = claim_worker_slot(study, url)
        study.sampler = _sampler(experiment, worker_sampler_seed(experiment, worker_index))
    sampler_seed = worker_sampler_seed(experiment, worker_index)
    if experiment.multi_objective:
        study.set_metric_names([o.metric for o in experiment.objectives])
    loader = data_loader(experiment)
    loader({})   # fail on bad data before any trial starts
    env = measure.environment(device, threads=experiment.measure.threads)
    ctx = TrialContext(experiment, results_dir / experiment.name, loader, device=device, sampler_seed=sampler_seed,
                       worker=_worker_name(), environment=env)
    target = experiment.n_trials()
    deadline = time.monotonic() + experiment.timeout_s if experiment.timeout_s else math.inf
    # Checking for room and creating the trial happen under one lock shared by all workers, so
    # together they start no more trials than the budget; the lock is let go once the trial exists.
    claim = StorageLock(url, f"attnbench:study:{experiment.name}")
    with SigintGuard() as sigint:
        ran = _sweep_loop(study, ctx, claim, sigint, deadline, target, display, wait_for_others)
    state = study_progress(study)
    if display:
        display.update(study, state, target)
    return SweepSummary(experiment.name, url, ctx.results, state.done, state.failed, target, ran)


def _sweep_loop(study: optuna.Study, ctx: TrialContext, claim: "StorageLock", sigint: "SigintGuard",
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
                _requeue(study, state.interrupted)
                continue
            room = target is None or state.waiting > 0 or state.done + state.running < target
            if room:   # a queued re-run is taken first; otherwise a new trial is created
                mine = _optimize_one(study, ctx, claim, sigint, deadline, display)
        if not room:
            if not wait_for_others:
                break
            time.sleep(min(heartbeat_settings()[0], 2.0))
            continue
        ran += 1
        if display and mine is not None and mine.state == TrialState.FAIL and ERROR_ATTR in mine.user_attrs:
            display.log(f"trial {trial_key(mine)} ({mine.user_attrs.get('label', '')}) failed: "
                        f"{mine.user_attrs[ERROR_ATTR]}")
    sigint.check()
    return ran


class SigintGuard:
    """Ctrl-C stops a trial's own work at once, but waits out Optuna's bookkeeping around it.

    Optuna's ``_run_trial`` cannot take a KeyboardInterrupt that arrives after the objective has
    returned, while it tells the storage (it fails with an UnboundLocalError, and the process
    exits 1 with a traceback instead of 130). So, while installed (main thread only), SIGINT
    raises KeyboardInterrupt only inside :meth:`work`; elsewhere it is held, and :meth:`check`
    raises it at the next safe point. A second SIGINT while one is held raises at once (a
    storage that hangs must not make Ctrl-C useless).
    """

    def __init__(self) -> None:
        self.pending = False
        self._open = False
        self._previous = None

    def __enter__(self) -> "SigintGuard":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        if self._open or self.pending:
            self._open = False          # raised once: the bookkeeping that follows is held again
            raise KeyboardInterrupt
        self.pending = True

    @contextlib.contextmanager
    def work(self):
        """The region where Ctrl-C interrupts at once (a trial's training and measuring)."""
        self.check()
        self._open = True
        try:
            yield
        finally:
            self._open = False

    def check(self) -> None:
        """Raise the held Ctrl-C, if any."""
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt


def _optimize_one(study: optuna.Study, ctx: TrialContext, claim: StorageLock, sigint: SigintGuard,
                  deadline: float, display: Optional["SweepDisplay"]) -> Optional[FrozenTrial]:
    """Run one trial (a queued re-run, else a new one); ``claim`` is released once it exists."""
    started: dict[str, int] = {}

    def objective(trial: optuna.Trial) -> Any:
        claim.release()
        started["id"] = trial._trial_id
        try:
            with sigint.work():
                value = run_trial(ctx, trial)
        except (TrialFailed, optuna.TrialPruned):
            started["ended"] = 1
            raise
        started["ended"] = 1
        return value

    try:
        study.optimize(objective, n_trials=1, catch=(TrialFailed,),
                       timeout=None if deadline is math.inf else max(deadline - time.monotonic(), 1))
    except (ValueError, optuna.exceptions.UpdateFinishedTrialError) as err:
        # This worker missed heartbeats for the grace period (a stall, a lost connection), so
        # another worker failed its trial and queued a re-run; the re-run's file replaces ours.
        # Optuna then refuses to record the outcome ("Cannot tell a FAIL trial").
        mine = study._storage.get_trial(started["id"]) if "id" in started else None
        ours = "ended" in started or isinstance(err, optuna.exceptions.UpdateFinishedTrialError)
        if mine is None or mine.state != TrialState.FAIL or not ours:
            raise
        if display:
            display.log(f"trial {trial_key(mine)} was taken over by another worker (no heartbeat for "
                        f"{heartbeat_settings()[1]} s); it runs again")
    return study._storage.get_trial(started["id"]) if "id" in started else None


class SweepDisplay:
    """Progress callbacks; the CLI supplies a Rich implementation."""

    def update(self, study: optuna.Study, state: StudyProgress, target: Optional[int]) -> None:
        """Called before and after each trial."""

    def log(self, message: str) -> None:
        """A line worth showing (a failed trial and its reason)."""
