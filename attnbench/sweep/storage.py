"""Optuna storage and the study: URLs, heartbeats, the cross-worker lock, samplers, worker slots."""
from __future__ import annotations

import contextlib
import os
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Optional

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback

from attnbench.experiment import Experiment

HEARTBEAT_S = 10          # a worker that stops beating for GRACE_S has its trial failed and retried
GRACE_S = 30              # both may be set per process: ATTNBENCH_HEARTBEAT_S, ATTNBENCH_GRACE_S
SLOT_ATTR = "attnbench_worker_slots"     # study user attr: worker slots handed out (sampler seeds)

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
