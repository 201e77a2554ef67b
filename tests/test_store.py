"""attnbench.results.store: one Parquet file per unit of work, atomic, schema-checked."""
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from attnbench.results import store


def test_round_trip_union_of_columns_and_kind_filter(tmp_path):
    path = store.write_rows(tmp_path, [{"kind": "trial", "trial": 3, "seed": 0, "top1": 71.5},
                                       {"kind": "trial", "trial": 3, "seed": 1, "top1": np.float32(70.0),
                                        "error": "diverged"}], "study/trial-00003")
    store.write_rows(tmp_path, [{"kind": "benchmark", "variant": "softmax", "tokens": 197,
                                 "latency_median_ms": 1.1}], "benchmarks/bench-1.parquet")
    assert path == tmp_path / "study" / "trial-00003.parquet"

    rows = store.read_rows(tmp_path)
    assert len(rows) == 3 and set(rows["schema_version"]) == {store.SCHEMA_VERSION}
    trials = store.read_rows(tmp_path, kind="trial")
    assert list(trials["seed"]) == [0, 1] and list(trials["top1"]) == [71.5, 70.0]
    assert pd.isna(trials["error"][0]) and trials["error"][1] == "diverged"
    assert pd.isna(trials["tokens"]).all()  # a column only benchmarks have, stored as a typed null
    assert set(trials["source_file"]) == {"study/trial-00003.parquet"}
    bench = store.read_rows(tmp_path, kind="benchmark")
    assert bench["variant"].tolist() == ["softmax"] and pd.isna(bench["seed"][0])

    # plain pandas / pyarrow read the same files, no attnbench needed
    assert pd.read_parquet(path)["top1"].tolist() == [71.5, 70.0]
    assert pq.read_table(tmp_path / "benchmarks").num_rows == 1


def test_missing_root_reads_empty(tmp_path):
    assert store.read_rows(tmp_path / "nothing").empty


def test_temp_and_hidden_files_are_ignored(tmp_path):
    store.write_rows(tmp_path, [{"kind": "trial", "seed": 1}], "t")
    (tmp_path / ".t2.parquet.abc.tmp").write_bytes(b"PAR1 half written")
    (tmp_path / ".hidden.parquet").write_bytes(b"PAR1 half written")
    assert len(store.read_rows(tmp_path)) == 1
    assert [p.name for p in store.store_files(tmp_path)] == ["t.parquet"]


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    store.write_rows(tmp_path, [{"kind": "trial", "seed": 1}], "t")

    def crash(table, where, **kwargs):
        where.write(b"PAR1 partial")
        raise OSError("disk full")

    monkeypatch.setattr(store.pq, "write_table", crash)
    with pytest.raises(OSError, match="disk full"):
        store.write_rows(tmp_path, [{"kind": "trial", "seed": 2}], "t")
    with pytest.raises(OSError):
        store.write_rows(tmp_path, [{"kind": "trial", "seed": 3}], "u")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.parquet"]  # old file intact, no temp left
    assert store.read_rows(tmp_path)["seed"].tolist() == [1]


def test_rewrite_replaces_the_file(tmp_path):
    store.write_rows(tmp_path, [{"kind": "trial", "seed": 1}], "t")
    store.write_rows(tmp_path, [{"kind": "trial", "seed": 2}, {"kind": "trial", "seed": 3}], "t")
    assert store.read_rows(tmp_path)["seed"].tolist() == [2, 3]


@pytest.mark.parametrize("version", [0, store.SCHEMA_VERSION + 1])
def test_other_schema_versions_are_refused(tmp_path, version):
    pd.DataFrame([{"kind": "trial", "schema_version": version, "top1": 1.0}]).to_parquet(tmp_path / "old.parquet")
    readable = ", ".join(map(str, store.READABLE_VERSIONS))
    with pytest.raises(store.StoreError, match=f"old.parquet: written with schema version {version}; this "
                                               f"attnbench reads versions {readable}"):
        store.read_rows(tmp_path, strict=True)


def test_foreign_and_corrupt_files_are_refused_when_strict(tmp_path):
    pd.DataFrame([{"kind": "trial"}]).to_parquet(tmp_path / "foreign.parquet")
    with pytest.raises(store.StoreError, match="not an attnbench result file"):
        store.read_rows(tmp_path, strict=True)
    (tmp_path / "foreign.parquet").unlink()
    (tmp_path / "corrupt.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(store.StoreError, match="corrupt.parquet: not a readable Parquet file"):
        store.read_rows(tmp_path, strict=True)
    with pytest.warns(store.StoreWarning, match="skipped .*corrupt.parquet: not a readable Parquet file"):
        assert store.read_rows(tmp_path).empty


@pytest.mark.parametrize("rows, name, message", [
    ([], "t", "no rows"),
    ([{"x": 1}], "t", "no 'kind'"),
    ([{"kind": "trial", "options": {"a": 1}}], "t", "json.dumps"),
    ([{"kind": "trial", "schema_version": 99}], "t", "schema_version 99"),
    ([{"kind": "trial", "schema_version": 1}], "t", "schema_version 1"),   # old versions are read, never written
    ([{"kind": "sweep"}], "t", "row kind 'sweep' is not one of trial, benchmark"),
    ([{"kind": "trial"}], "../escape", "inside the store"),
    ([{"kind": "trial"}], ".hidden", "must not start with '.'"),
])
def test_bad_rows_and_names(tmp_path, rows, name, message):
    with pytest.raises(store.StoreError, match=message):
        store.write_rows(tmp_path, rows, name)
