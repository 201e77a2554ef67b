"""The Parquet result store, shared by benchmarks and sweeps.

A store is a folder (``root``) of Parquet files, any depth below it. Each file holds the rows of
one unit of work and is written once, atomically, by :func:`write_rows`: a temporary file in the
same folder, flushed and fsynced, then ``os.replace``-d into place, so a reader never sees a
partial file and a crash loses at most the unit in flight. Concurrent writers are safe as long
as they use different names (e.g. one file per trial, ``name=f"trial-{number:05d}"``, with one row
per seed; ``root`` per study, e.g. ``results/<study>``).

Rows are flat dicts of scalars (str, int, float, bool, None, numpy scalars, datetimes); encode
anything nested (option dicts, lists) as JSON text. Every row must carry ``kind`` (e.g.
``"benchmark"``, ``"trial"``); :func:`write_rows` adds ``schema_version``. Files from different
kinds or versions of a writer may have different columns: :func:`read_rows` concatenates them,
missing values as NA. The files are plain Parquet, readable with pandas or pyarrow alone::

    pandas.read_parquet("results/")                       # every file below results/
    attnbench.results.store.read_rows("results/", kind="trial")   # the same, checked and filtered

Bump :data:`SCHEMA_VERSION` when the meaning of an existing column changes; readers refuse
files of another version with :class:`StoreError` instead of mixing them silently.
"""
from __future__ import annotations

import contextlib
import datetime
import numbers
import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["SCHEMA_VERSION", "StoreError", "write_rows", "read_rows", "store_files"]

#: Version of the row layout; stored in every row and in each file's metadata.
SCHEMA_VERSION = 1

_META_KEY = b"attnbench.schema_version"
_SCALARS = (str, bytes, bool, numbers.Number, datetime.date, datetime.datetime, datetime.timedelta,
            pd.Timestamp, pd.Timedelta)


class StoreError(RuntimeError):
    """A result file that cannot be read or was written with another schema version, or bad rows."""


def _check_row(index: int, row: Any) -> dict:
    if not isinstance(row, dict):
        raise StoreError(f"row {index} is a {type(row).__name__}, not a dict")
    kind = row.get("kind")
    if not isinstance(kind, str) or not kind:
        raise StoreError(f"row {index} has no 'kind' (e.g. 'benchmark' or 'trial')")
    for key, value in row.items():
        if not isinstance(key, str):
            raise StoreError(f"row {index}: column name {key!r} is not a string")
        if value is not None and not isinstance(value, _SCALARS) and not (
                hasattr(value, "dtype") and getattr(value, "ndim", 1) == 0):
            raise StoreError(f"row {index}: column '{key}' holds a {type(value).__name__}; store scalars "
                             f"only (encode nested values with json.dumps)")
    if "schema_version" in row and row["schema_version"] != SCHEMA_VERSION:
        raise StoreError(f"row {index}: schema_version {row['schema_version']!r} is not this store's "
                         f"{SCHEMA_VERSION}")
    return {**row, "schema_version": SCHEMA_VERSION}


def _target(root: Path, name: str) -> Path:
    if not name or name.startswith(("/", "\\")) or ".." in Path(name).parts:
        raise StoreError(f"result file name {name!r} must be a relative name inside the store")
    if Path(name).name.startswith("."):
        raise StoreError(f"result file name {name!r} must not start with '.' (reserved for temp files)")
    return root / (name if name.endswith(".parquet") else name + ".parquet")


def write_rows(root: Union[str, os.PathLike], rows: list[dict], name: str) -> Path:
    """Write ``rows`` as ONE Parquet file ``root/name.parquet``, atomically.

    Args:
        root: the store's folder; created if missing.
        rows: flat dicts of scalars, each with a ``kind``; ``schema_version`` is added.
            Columns may differ between rows (missing values become null).
        name: file name relative to ``root`` (``.parquet`` added if missing); may contain
            sub-folders (``"study-a/trial-00003"``). An existing file of that name is replaced
            atomically.

    Returns:
        The path written.

    Raises:
        StoreError: no rows, a row without ``kind``, a non-scalar value, or a bad name.
    """
    if not rows:
        raise StoreError("no rows to write")
    checked = [_check_row(i, row) for i, row in enumerate(rows)]
    columns: dict[str, None] = {}
    for row in checked:
        columns.update(dict.fromkeys(row))
    frame = pd.DataFrame([{c: row.get(c) for c in columns} for row in checked], columns=list(columns))
    try:
        table = pa.Table.from_pandas(frame, preserve_index=False)
    except (pa.ArrowException, TypeError, ValueError) as err:
        raise StoreError(f"rows cannot be stored as Parquet: {err}") from None
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           _META_KEY: str(SCHEMA_VERSION).encode()})

    target = _target(Path(root), name)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
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


def store_files(root: Union[str, os.PathLike]) -> list[Path]:
    """The finished result files below ``root``, sorted (temp and hidden files are skipped)."""
    root = Path(root)
    if not root.exists():
        return []
    return sorted(p for p in root.rglob("*.parquet")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))


def _read_one(path: Path) -> pa.Table:
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        raise StoreError(f"{path}: not a readable Parquet file ({err})") from None
    meta = (table.schema.metadata or {}).get(_META_KEY)
    if "schema_version" not in table.column_names:
        raise StoreError(f"{path}: no schema_version column; not written by attnbench's store "
                         f"(or older than schema version 1)")
    versions = set(table.column("schema_version").to_pylist())
    if meta is not None:
        versions.add(int(meta))
    if versions != {SCHEMA_VERSION}:
        found = ", ".join(str(v) for v in sorted(versions, key=str))
        raise StoreError(f"{path}: written with schema version {found}; this attnbench reads version "
                         f"{SCHEMA_VERSION} (re-run it, or read it with a matching attnbench)")
    return table


def read_rows(root: Union[str, os.PathLike], kind: Optional[str] = None) -> pd.DataFrame:
    """All rows of every result file below ``root`` (recursively), as one DataFrame.

    Args:
        root: the store's folder (a missing folder reads as no rows).
        kind: keep only rows of this kind (``"benchmark"``, ``"trial"``, ...).

    Returns:
        One row per stored row, columns the union over files (missing values are NA), plus
        ``source_file`` (path relative to ``root``). Empty when nothing matches.

    Raises:
        StoreError: a file that is not readable Parquet or has another schema version.
    """
    root = Path(root)
    tables = []
    for path in store_files(root):
        table = _read_one(path)
        tables.append(table.append_column("source_file", pa.array([str(path.relative_to(root))] * len(table),
                                                                   pa.string())))
    if not tables:
        return pd.DataFrame()
    try:
        merged = pa.concat_tables([t.replace_schema_metadata(None) for t in tables], promote_options="permissive")
    except pa.ArrowException as err:
        raise StoreError(f"result files under {root} disagree on a column's type: {err}") from None
    frame = merged.to_pandas()
    frame = frame[[c for c in frame.columns if c != "source_file"] + ["source_file"]]
    if kind is not None:
        frame = frame[frame["kind"] == kind].reset_index(drop=True)
    return frame
