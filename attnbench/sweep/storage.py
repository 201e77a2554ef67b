"""Where a study lives and how its workers take turns: storage URLs, heartbeat settings, the
Optuna storage object, and the lock every worker of one storage shares."""
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

def storage_url(experiment: Experiment, results_dir: Path, storage: Optional[str] = None) -> str:
    """``storage`` (CLI) > the experiment's ``storage`` > ``sqlite:///<results>/<name>/study.db``."""
    url = storage or experiment.storage
    if url:
        return url
    path = (results_dir / experiment.name / "study.db").resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return sqlite_url(path)


def sqlite_url(path: Path) -> str:
    """The ``sqlite:///`` URL of the database file ``path``, quoted so that SQLAlchemy reads back
    exactly that path: a folder named ``%2E%2E`` or ``q?mode=ro`` stays a folder, never ``..`` or
    a query string."""
    from sqlalchemy.engine import URL

    return URL.create("sqlite", database=str(path)).render_as_string(hide_password=False)


def sqlite_path(url: str) -> Optional[str]:
    """The database file a ``sqlite:///`` URL names, as SQLAlchemy reads it (None for another URL
    or an in-memory database)."""
    if not url.startswith("sqlite:///"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(url).database
    return None if not database or database == ":memory:" or "mode=memory" in url else database


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


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """The Optuna storage of ``url``, with heartbeats (and retries of stale trials) where it has them."""
    retry = RetryHeartbeatStaleTrialCallback(max_retry=3)
    if _is_journal(url):
        from optuna.storages.journal import JournalFileBackend, JournalStorage
        return JournalStorage(JournalFileBackend(url))
    heartbeat, grace = heartbeat_settings()
    engine = {"pool_pre_ping": True} if not url.startswith("sqlite") else {"connect_args": {"timeout": 60}}
    if is_postgresql(url):
        # A worker stopped mid-transaction (SIGSTOP, a frozen VM) keeps its row locks, and every
        # other worker then waits on them forever. The server ends such a session after the
        # grace period, as the other workers end its trial; healthy transactions last milliseconds.
        engine["connect_args"] = {"options": f"-c idle_in_transaction_session_timeout={grace * 1000}"}
    return with_retries(lambda: optuna.storages.RDBStorage(
        url, engine_kwargs=engine, heartbeat_interval=heartbeat, grace_period=grace,
        heartbeat_stale_trial_callback=retry))


def is_postgresql(url: str) -> bool:
    """Whether ``url`` names a PostgreSQL storage (``postgresql://``, ``postgresql+psycopg2://``, ...)."""
    return url.startswith(("postgresql", "postgres://"))


def _is_journal(url: str) -> bool:
    return url.endswith((".log", ".jsonl")) and "://" not in url   # a journal file path


def study_lock(url: str, study_name: str) -> "StorageLock":
    """The lock of one study: held to claim room for a trial, to hand out worker slots, to fail
    other workers' stale trials (inside ``Study.optimize``, which a claim encloses) and to publish a
    trial's result file, so a worker whose trial was taken over can never replace the re-run's."""
    return StorageLock(url, f"attnbench:study:{study_name}")


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
        if is_postgresql(self.url):
            import sqlalchemy
            if self._engine is None:
                self._engine = sqlalchemy.create_engine(self.url, poolclass=sqlalchemy.pool.NullPool)
            conn = with_retries(self._engine.connect, attempts=4)   # a server busy with many workers
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
        database = sqlite_path(self.url)
        return None if database is None else database + ".lock"

    def __enter__(self) -> "StorageLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def with_retries(make: Callable[[], Any], attempts: int = 8):
    """Several workers starting together on an empty database race to create the schema and the
    study; the loser sees an integrity or duplicate error. Retry with jittered backoff."""
    for attempt in range(attempts):
        try:
            return make()
        except Exception:  # the last attempt re-raises
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1) + (os.getpid() % 7) * 0.05)


class StorageError(RuntimeError):
    """The Optuna storage cannot be opened, or holds a study of another shape."""


def schema_ready(url: str) -> bool:
    """Whether a PostgreSQL storage already holds Optuna's complete schema (False if unsure)."""
    if not is_postgresql(url):
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


def redact(url: str) -> str:
    """The URL without its password."""
    head, sep, tail = url.partition("://")
    if sep and "@" in tail and ":" in tail.split("@", 1)[0]:
        user = tail.split("@", 1)[0].split(":", 1)[0]
        return f"{head}://{user}:***@{tail.split('@', 1)[1]}"
    return url
