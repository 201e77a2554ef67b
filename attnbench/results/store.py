"""The Parquet result store, shared by benchmarks and sweeps.

A store is a folder (``root``) of Parquet files, any depth below it. Each file holds the rows of
one unit of work and is written once, atomically, by :func:`write_rows`: a temporary file in the
same folder, flushed and fsynced, then ``os.replace``-d into place, so a reader never sees a
partial file and a crash loses at most the unit in flight. Concurrent writers are safe as long
as they use different names (e.g. one file per trial, ``name=f"trial-{number:05d}"``, with one row
per seed; ``root`` per study, e.g. ``results/<study>``). Files are created with the process umask
(mode 0644 under the usual umask 022), so colleagues sharing a results folder can read them.

Every file has exactly the columns and types of :data:`attnbench.results.schema.ARROW_SCHEMA`,
values a row does not have stored as typed nulls, so any mix of files reads as one table with
pandas, pyarrow or DuckDB alone::

    pandas.read_parquet("results/<study>/trials")
    attnbench.results.store.read_rows("results/", kind="trial")   # every file below, checked

Files of schema version 1 (before the schema existed) are upgraded on read, and so are files of a
later version that lack only the columns added since (read as nulls); files of another
version are refused with :class:`StoreError` naming file and version, never misread. The lenient
readers skip a file they cannot read (zero bytes, not Parquet, not attnbench's, another version)
and say which; ``strict=True`` raises instead.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import secrets
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from attnbench.results import schema

__all__ = ["SCHEMA_VERSION", "StoreError", "StoreWarning", "SkippedFile", "StoreContents", "write_rows",
           "read_rows", "read_store", "read_file", "store_files"]

SCHEMA_VERSION = schema.SCHEMA_VERSION
#: Versions this store reads: the current one, and older ones it upgrades.
READABLE_VERSIONS = tuple(range(1, SCHEMA_VERSION + 1))

_META_KEY = b"attnbench.schema_version"
SOURCE_FILE = "source_file"   # added by the readers: the file a row came from, relative to the root


class StoreError(RuntimeError):
    """A result file that cannot be read or has another schema version, or rows that cannot be stored."""


class StoreWarning(UserWarning):
    """A result file skipped by a lenient reader."""


@dataclasses.dataclass(frozen=True)
class SkippedFile:
    path: Path
    reason: str

    def __str__(self) -> str:
        return f"skipped {self.path}: {self.reason}"


@dataclasses.dataclass
class StoreContents:
    """What :func:`read_store` found: the rows and the files it skipped."""

    rows: pd.DataFrame
    skipped: list[SkippedFile]


# ----------------------------------------------------------------------------------- writing

def _plain(value: Any) -> Any:
    """numpy and pandas scalars as Python values."""
    if isinstance(value, pd.Timestamp):
        return value.to_pydatetime()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _coerce(column: schema.Column, value: Any, where: str) -> Any:
    value = _plain(value)
    if value is None:
        return None
    t = column.type
    if pa.types.is_list(t):
        return _coerce_list(column, value, where)
    if isinstance(value, (dict, list, tuple, set)):
        raise StoreError(f"{where}: column '{column.name}' holds a {type(value).__name__}; encode nested "
                         f"values with json.dumps")
    if pa.types.is_integer(t):
        if isinstance(value, float):
            if math.isnan(value):
                return None
            if value.is_integer():
                return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise StoreError(f"{where}: column '{column.name}' expects an integer, got {value!r}")
    elif pa.types.is_floating(t):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise StoreError(f"{where}: column '{column.name}' expects a number, got {value!r}")
        return float(value)
    elif pa.types.is_boolean(t):
        if not isinstance(value, bool):
            raise StoreError(f"{where}: column '{column.name}' expects a boolean, got {value!r}")
    elif pa.types.is_timestamp(t):
        if isinstance(value, str):
            value = pd.Timestamp(value).to_pydatetime()
        if not isinstance(value, datetime.datetime):
            raise StoreError(f"{where}: column '{column.name}' expects a datetime, got {value!r}")
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.timezone.utc)
        return value.astimezone(datetime.timezone.utc).replace(microsecond=0)
    elif pa.types.is_string(t) and not isinstance(value, str):
        raise StoreError(f"{where}: column '{column.name}' expects text, got {type(value).__name__} {value!r}")
    return value


def _coerce_list(column: schema.Column, value: Any, where: str) -> list:
    """A list column's value: a list (tuple, numpy array) of numbers; NaN is kept, not nulled."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise StoreError(f"{where}: column '{column.name}' expects a list of numbers, got {value!r}")
    items = [_plain(v) for v in value]
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in items):
        raise StoreError(f"{where}: column '{column.name}' expects a list of numbers, got {value!r}")
    if pa.types.is_integer(column.type.value_type):
        if not all(float(v).is_integer() for v in items):
            raise StoreError(f"{where}: column '{column.name}' expects a list of integers, got {value!r}")
        return [int(v) for v in items]
    return [float(v) for v in items]


def _check_row(index: int, row: Any, upgrading: bool = False) -> dict:
    if not isinstance(row, dict):
        raise StoreError(f"row {index} is a {type(row).__name__}, not a dict")
    if not isinstance(row.get("kind"), str) or not row["kind"]:
        raise StoreError(f"row {index} has no 'kind' ({' or '.join(schema.KINDS)})")
    try:
        schema.check_row(row)
    except schema.SchemaError as err:
        raise StoreError(f"row {index}: {err}") from None
    version = row.get("schema_version", SCHEMA_VERSION)
    if version not in (READABLE_VERSIONS if upgrading else (SCHEMA_VERSION,)):
        raise StoreError(f"row {index}: schema_version {version!r} is not this store's {SCHEMA_VERSION}")
    checked = {key: _coerce(schema.BY_NAME[key], value, f"row {index}") for key, value in row.items()}
    checked["schema_version"] = version
    return checked


def _table(rows: list[dict], upgrading: bool = False) -> pa.Table:
    checked = [_check_row(i, row, upgrading) for i, row in enumerate(rows)]
    try:
        table = pa.Table.from_pylist(checked, schema=schema.ARROW_SCHEMA)
    except (pa.ArrowException, TypeError, ValueError) as err:
        raise StoreError(f"rows cannot be stored as Parquet: {err}") from None
    return table.replace_schema_metadata({_META_KEY: str(SCHEMA_VERSION).encode()})


def _target(root: Path, name: str) -> Path:
    if not name or name.startswith(("/", "\\")) or ".." in Path(name).parts:
        raise StoreError(f"result file name {name!r} must be a relative name inside the store")
    if Path(name).name.startswith("."):
        raise StoreError(f"result file name {name!r} must not start with '.' (reserved for temp files)")
    return root / (name if name.endswith(".parquet") else name + ".parquet")


def write_rows(root: Union[str, os.PathLike], rows: list[dict], name: str) -> Path:
    """Write ``rows`` as ONE Parquet file ``root/name.parquet``, atomically, with the full schema.

    Args:
        root: the store's folder; created if missing.
        rows: dicts with a ``kind`` (``trial`` or ``benchmark``) whose keys are columns of that
            kind (:mod:`attnbench.results.schema`); ``schema_version`` is added. Columns a row
            lacks are stored as nulls of the column's type.
        name: file name relative to ``root`` (``.parquet`` added if missing); may contain
            sub-folders (``"study-a/trial-00003"``). An existing file of that name is replaced
            atomically.

    Returns:
        The path written.

    Raises:
        StoreError: no rows, a row without ``kind``, a column not in the schema, a value of
            the wrong type, or a bad name (one line, naming the row and column).
    """
    if not rows:
        raise StoreError("no rows to write")
    table = _table(rows)
    target = _target(Path(root), name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
    # os.open honours the umask (tempfile.mkstemp would force 0600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            pq.write_table(table, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return target


# ----------------------------------------------------------------------------------- reading

def store_files(root: Union[str, os.PathLike]) -> list[Path]:
    """The finished result files below ``root``, sorted (temp and hidden files are skipped)."""
    root = Path(root)
    if not root.exists():
        return []
    return sorted(p for p in root.rglob("*.parquet")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))


# Version 1 (no schema module yet): names that changed, and values stored in other units.
_V1_RENAMES = {"finished_at": "created_at", "peak_memory_mb": "forward_memory_mb", "latency_batch": "measure_batch",
               "batch": "measure_batch", "ops": "kernel_requested", "attn_macs_analytic": "attention_macs",
               "peak_mem_bytes": "process_peak_memory_mb", "forward_mem_bytes": "forward_memory_mb",
               "mem_method": "memory_method"}
_V1_BYTES = ("peak_mem_bytes", "forward_mem_bytes")
_V1_DROPPED = ("latency_threads",)   # the same number as 'threads'
_V1_FOLDED_DATA = ("data_seed", "data_root", "data_options")   # data_* columns that are not data set options


def _upgrade_v1_row(row: dict[str, Any], path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    data_options = {}
    for key, value in row.items():
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        if key.startswith("opt_") or key in _V1_DROPPED:   # opt_* repeat the options JSON
            continue
        if key.startswith("data_") and key not in _V1_FOLDED_DATA:
            data_options[key[len("data_"):]] = value
            continue
        if key in _V1_BYTES:
            value = value / 2**20
        if key == "ops" and isinstance(value, str):
            value = value.split("+")[0]   # v1 wrote 'compile+fast' where compiling fell back
        key = _V1_RENAMES.get(key, key)
        if key not in schema.BY_NAME:
            raise StoreError(f"{path}: schema version 1 column '{key}' has no place in schema version "
                             f"{SCHEMA_VERSION}; refusing to misread it")
        out[key] = value
    if data_options and "data_options" not in out:
        out["data_options"] = json.dumps(data_options, sort_keys=True, default=str)
    out["schema_version"] = 1   # kept: its options lack defaults and it does not say which kernels ran
    kind = out.get("kind")
    if kind in schema.KINDS:   # columns of the other kind (v1 mixed them freely) carry no information
        out = {k: v for k, v in out.items() if kind in schema.BY_NAME[k].kinds}
    return out


def _upgrade_v1(table: pa.Table, path: Path) -> pa.Table:
    rows = [_upgrade_v1_row(row, path) for row in table.to_pylist()]
    try:
        return _table(rows, upgrading=True)
    except StoreError as err:
        raise StoreError(f"{path}: schema version 1 file cannot be upgraded: {err}") from None


def _upgrade_added(table: pa.Table, version: int, path: Path) -> pa.Table:
    """A file of ``version`` (2 or later) with the columns added since as typed nulls; its rows keep
    their version (they do not have those values)."""
    expected = pa.schema([pa.field(c.name, c.type, nullable=True) for c in schema.columns_since(version)])
    if not table.schema.equals(expected, check_metadata=False):
        raise StoreError(f"{path}: says schema version {version} but its columns differ from it")
    if version == SCHEMA_VERSION:
        return table
    columns = [table.column(c.name) if c.since <= version else pa.nulls(len(table), c.type)
               for c in schema.COLUMNS]
    return pa.Table.from_arrays(columns, schema=schema.ARROW_SCHEMA).replace_schema_metadata(table.schema.metadata)


def _version(table: pa.Table, path: Path) -> int:
    meta = (table.schema.metadata or {}).get(_META_KEY)
    versions = set()
    if "schema_version" in table.column_names:
        versions |= {v for v in table.column("schema_version").to_pylist() if v is not None}
    if meta is not None:
        with contextlib.suppress(ValueError):
            versions.add(int(meta))
    if not versions or not all(isinstance(v, int) for v in versions):
        raise StoreError(f"{path}: not an attnbench result file (no schema version)")
    if len(versions) > 1:
        raise StoreError(f"{path}: mixes schema versions {', '.join(map(str, sorted(versions)))}")
    return versions.pop()


def read_file(path: Union[str, os.PathLike]) -> pa.Table:
    """One result file as a table of the current schema (version-1 files upgraded).

    Raises:
        StoreError: an empty or unreadable file, a file not written by attnbench, or one of a
            schema version this attnbench cannot read (one line, naming the file and why).
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise StoreError(f"{path}: empty file (0 bytes)")
        table = pq.read_table(path)
    except OSError as err:
        raise StoreError(f"{path}: cannot be read ({err.strerror or err})") from None
    except pa.ArrowException as err:
        raise StoreError(f"{path}: not a readable Parquet file ({err})") from None
    version = _version(table, path)
    if version == 1:
        return _upgrade_v1(table, path)
    if version in READABLE_VERSIONS:
        return _upgrade_added(table, version, path)
    raise StoreError(f"{path}: written with schema version {version}; this attnbench reads versions "
                     f"{', '.join(map(str, READABLE_VERSIONS))} (re-run it, or read it with a matching attnbench)")


def read_store(root: Union[str, os.PathLike], kind: Optional[str] = None, strict: bool = False) -> StoreContents:
    """All rows of every result file below ``root`` (recursively), and the files skipped.

    Args:
        root: the store's folder (a missing folder reads as no rows).
        kind: keep only rows of this kind (``"benchmark"``, ``"trial"``).
        strict: raise on the first file that cannot be read, instead of skipping it.

    Returns:
        ``rows``: one row per stored row with every schema column (missing values are NA), plus
        ``source_file`` (path relative to ``root``); ``skipped``: the files left out and why.

    Raises:
        StoreError: with ``strict``, a file that cannot be read (see :func:`read_file`).
    """
    root = Path(root)
    tables, skipped = [], []
    for path in store_files(root):
        try:
            table = read_file(path)
        except StoreError as err:
            if strict:
                raise
            skipped.append(SkippedFile(path, str(err).removeprefix(f"{path}: ")))
            continue
        tables.append(table.append_column(SOURCE_FILE, pa.array([str(path.relative_to(root))] * len(table),
                                                                 pa.string())))
    if not tables:
        empty = schema.ARROW_SCHEMA.empty_table().append_column(SOURCE_FILE, pa.array([], pa.string()))
        return StoreContents(empty.to_pandas(), skipped)
    frame = pa.concat_tables([t.replace_schema_metadata(None) for t in tables]).to_pandas()
    if kind is not None:
        frame = frame[frame["kind"] == kind].reset_index(drop=True)
    return StoreContents(frame, skipped)


def read_rows(root: Union[str, os.PathLike], kind: Optional[str] = None, strict: bool = False) -> pd.DataFrame:
    """:func:`read_store`'s rows; each skipped file is one :class:`StoreWarning` naming it."""
    contents = read_store(root, kind, strict)
    for skipped in contents.skipped:
        warnings.warn(str(skipped), StoreWarning, stacklevel=2)
    return contents.rows
