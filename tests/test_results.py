"""The result schema end to end: typed files any reader takes as one table, provenance in every row,
objectives that exist, old files upgraded, bad files skipped, user text shown as written."""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from attnbench import kernels, provenance, registry
from attnbench.cli import main
from attnbench.experiment import METRICS, ExperimentError, parse_experiment
from attnbench.results import schema, store
from attnbench.train import TrainConfig
from attnbench.variant import option_specs

DOCS = Path(__file__).resolve().parents[1] / "docs" / "results.md"


def _trial(seed: int, **extra) -> dict:
    return {"kind": "trial", "study": "s", "trial": seed, "seed": seed, "label": "castling", "variant": "castling",
            "status": "complete", "top1": 70.0 + seed, "macs": 1000, **extra}


def _mixed_store(root: Path) -> Path:
    """Trial files whose null patterns differ, and a benchmark file elsewhere below ``root``."""
    trials = root / "s" / "trials"
    store.write_rows(root, [_trial(0, mask_density_curve=json.dumps([{"progress": 0.5, "mask_density": 0.1}]))],
                     "s/trials/trial-00000")
    store.write_rows(root, [_trial(1, status="failed", error="diverged", top1=None)], "s/trials/trial-00001")
    store.write_rows(root, [_trial(2, stopped=True, forward_memory_mb=12.5)], "s/trials/trial-00002")
    store.write_rows(root, [{"kind": "benchmark", "variant": "softmax", "tokens": 197, "latency_median_ms": 1.5}],
                     "benchmarks/bench-1")
    return trials


# ---------------------------------------------------------------------------------- one table

def test_files_with_different_null_patterns_read_as_one_table(tmp_path):
    trials = _mixed_store(tmp_path)
    frame = pd.read_parquet(trials)
    assert len(frame) == 3 and list(frame.columns) == [c.name for c in schema.COLUMNS]
    assert frame["error"].dropna().tolist() == ["diverged"]
    assert frame["top1"].dtype == "float64" and frame["macs"].dtype == "int64"
    assert pd.api.types.is_datetime64_any_dtype(frame["created_at"])

    table = ds.dataset(trials).to_table()
    assert table.num_rows == 3 and table.schema.equals(schema.ARROW_SCHEMA, check_metadata=False)

    everything = store.read_rows(tmp_path)
    assert len(everything) == 4 and sorted(everything["kind"]) == ["benchmark", "trial", "trial", "trial"]


def test_duckdb_reads_every_file_below_the_root(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    _mixed_store(tmp_path)
    con = duckdb.connect()
    count, = con.execute(f"SELECT count(*) FROM read_parquet('{tmp_path}/**/*.parquet')").fetchone()
    assert count == 4
    described = con.execute(f"DESCRIBE SELECT * FROM read_parquet('{tmp_path}/**/*.parquet')").fetchall()
    types = {name: kind for name, kind, *_ in described}
    assert types["error"] == "VARCHAR" and types["top1"] == "DOUBLE" and types["macs"] == "BIGINT"
    failed = con.execute(f"SELECT error FROM read_parquet('{tmp_path}/**/*.parquet') WHERE status = 'failed'")
    assert failed.fetchall() == [("diverged",)]


def test_writer_refuses_unknown_columns_and_wrong_types(tmp_path):
    with pytest.raises(store.StoreError, match="column 'latency_ms' is not in the result schema"):
        store.write_rows(tmp_path, [{"kind": "trial", "latency_ms": 1.0}], "t")
    with pytest.raises(store.StoreError, match="column 'tokens' is not a column of trial rows"):
        store.write_rows(tmp_path, [{"kind": "trial", "tokens": 197}], "t")
    with pytest.raises(store.StoreError, match="column 'seed' expects an integer, got 'zero'"):
        store.write_rows(tmp_path, [{"kind": "trial", "seed": "zero"}], "t")
    with pytest.raises(store.StoreError, match="column 'macs' expects an integer, got 1.5"):
        store.write_rows(tmp_path, [{"kind": "trial", "macs": 1.5}], "t")
    assert not list(tmp_path.rglob("*.parquet"))


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_files_are_written_with_the_process_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        path = store.write_rows(tmp_path, [{"kind": "trial", "seed": 0}], "t")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == mode


# ----------------------------------------------------------------------------- old versions

def _v1_file(path: Path, rows: list[dict]) -> None:
    """A file as attnbench's version-1 store wrote it: types inferred by pandas, old column names."""
    table = pa.Table.from_pandas(pd.DataFrame([{**r, "schema_version": 1} for r in rows]), preserve_index=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, b"attnbench.schema_version": b"1"}), path)


def test_version_1_files_are_upgraded_on_read(tmp_path):
    _v1_file(tmp_path / "old" / "trial-00000.parquet", [
        {"kind": "trial", "study": "old", "seed": 0, "label": "castling", "variant": "castling",
         "options": '{"threshold": 0.05}', "opt_threshold": 0.05, "peak_memory_mb": 3.0, "latency_batch": 8,
         "latency_threads": 2, "threads": 2, "data_img_size": 8, "data_seed": 0, "error": None,
         "finished_at": "2025-01-02T03:04:05+0000", "top1": 90.0}])
    _v1_file(tmp_path / "benchmarks" / "bench-old.parquet", [
        {"kind": "benchmark", "variant": "linear-angular", "tokens": 197, "batch": 4, "ops": "compile+fast",
         "attn_macs_analytic": 10, "peak_mem_bytes": 2**21, "forward_mem_bytes": 2**20, "mem_method": "m",
         "created_at": "2025-01-02T03:04:05+00:00"}])
    store.write_rows(tmp_path, [_trial(0)], "new/trial-00000")
    rows = store.read_rows(tmp_path)
    old = rows[rows["study"] == "old"].iloc[0]
    assert old["schema_version"] == 1 and old["forward_memory_mb"] == 3.0 and old["measure_batch"] == 8
    assert json.loads(old["data_options"]) == {"img_size": 8} and old["created_at"].year == 2025
    assert not any(c.startswith("opt_") or c == "latency_threads" for c in rows.columns)
    bench = rows[rows["kind"] == "benchmark"].iloc[0]
    assert bench["kernel_requested"] == "compile" and pd.isna(bench["kernel_implementation"])
    assert bench["process_peak_memory_mb"] == 2.0 and bench["forward_memory_mb"] == 1.0
    assert bench["attention_macs"] == 10 and bench["measure_batch"] == 4
    assert (rows[rows["study"] == "new"]["schema_version"] == schema.SCHEMA_VERSION).all()


def test_version_1_column_without_a_place_is_refused_naming_file_and_column(tmp_path):
    _v1_file(tmp_path / "odd.parquet", [{"kind": "trial", "mystery": 1.0}])
    with pytest.raises(store.StoreError, match=r"odd.parquet: schema version 1 column 'mystery'"):
        store.read_rows(tmp_path, strict=True)


def test_unknown_versions_are_refused_in_one_line_naming_file_and_version(tmp_path):
    future = str(schema.SCHEMA_VERSION + 1)
    table = schema.ARROW_SCHEMA.empty_table().replace_schema_metadata({b"attnbench.schema_version": future.encode()})
    pq.write_table(table, tmp_path / "future.parquet")
    with pytest.raises(store.StoreError) as err:
        store.read_rows(tmp_path, strict=True)
    readable = ", ".join(map(str, store.READABLE_VERSIONS))
    assert re.fullmatch(rf".*future\.parquet: written with schema version {future}; this attnbench reads versions "
                        rf"{readable} .*", str(err.value)) and "\n" not in str(err.value)
    with pytest.warns(store.StoreWarning, match="future.parquet"):
        assert store.read_rows(tmp_path).empty


# ----------------------------------------------------------------------------- bad files

def _bad_files(root: Path) -> None:
    _mixed_store(root)
    (root / "s" / "trials" / "zero.parquet").write_bytes(b"")
    pd.DataFrame({"x": [1, 2]}).to_parquet(root / "s" / "foreign.parquet")


def test_store_skips_zero_byte_and_foreign_files_and_names_them(tmp_path):
    _bad_files(tmp_path)
    contents = store.read_store(tmp_path)
    assert len(contents.rows) == 4
    reasons = {p.path.name: p.reason for p in contents.skipped}
    assert reasons == {"zero.parquet": "empty file (0 bytes)",
                       "foreign.parquet": "not an attnbench result file (no schema version)"}
    with pytest.raises(store.StoreError, match="foreign.parquet"):
        store.read_store(tmp_path, strict=True)


def test_report_goes_past_bad_files_and_strict_fails(tmp_path):
    _bad_files(tmp_path)
    done = CliRunner().invoke(main, ["report", "--results", str(tmp_path), "--no-plots", "--format", "csv"])
    assert done.exit_code == 0, done.output
    warned = [line for line in done.output.splitlines() if line.startswith("warning:")]
    assert len(warned) == 3, done.output
    assert any("zero.parquet: empty file" in line for line in warned)
    assert any("foreign.parquet: not an attnbench result file" in line for line in warned)
    assert "2 result file(s)" in warned[-1]
    done = CliRunner().invoke(main, ["report", "--results", str(tmp_path), "--no-plots", "--strict"])
    assert done.exit_code == 2 and "Traceback" not in done.output
    assert len(done.output.strip().splitlines()) == 1 and ".parquet" in done.output


# ----------------------------------------------------------------------------- objectives

def test_the_objectives_are_the_numeric_trial_columns_a_paper_optimises_and_latency_ms_is_gone():
    # Written out by hand: a column gaining or losing objective status, or a flipped direction,
    # must be a deliberate change here too.
    assert METRICS == {"top1": "maximize", "top1_train_form": "maximize", "switch_cost": "minimize",
                       "macs": "minimize", "attention_macs": "minimize", "params": "minimize",
                       "latency_median_ms": "minimize", "samples_per_s": "maximize",
                       "forward_memory_mb": "minimize"}
    for name in METRICS:
        column = schema.BY_NAME[name]
        assert schema.TRIAL in column.kinds and (pa.types.is_integer(column.type) or pa.types.is_floating(column.type))
    with pytest.raises(ExperimentError, match="unknown metric 'latency_ms'; did you mean 'latency_median_ms'"):
        parse_experiment({"variants": ["softmax"], "objectives": [{"metric": "latency_ms"}]})


def test_an_objective_whose_measurement_is_off_cannot_be_written():
    with pytest.raises(ExperimentError, match=r"objectives\[0\].metric.*measure.latency: true"):
        parse_experiment({"variants": ["softmax"], "objectives": ["latency_median_ms"], "measure": {"latency": False}})
    with pytest.raises(ExperimentError, match=r"measure.memory: true"):
        parse_experiment({"variants": ["softmax"], "objectives": ["forward_memory_mb"], "measure": {"memory": False}})


# ----------------------------------------------------------------------------- provenance

def test_variant_columns_resolve_every_option_and_name_the_distribution():
    columns = provenance.variant_columns("castling", {"mask_schedule": "gate_cosine"})
    options = json.loads(columns["options"])
    specs = {s.name: s.default for s in option_specs(registry.get_variant("castling"))}
    assert options == {**specs, "mask_schedule": "gate_cosine"}
    assert options["threshold"] == 0.02 and options["schedule_end"] == 0.8
    assert columns["variant_distribution"] == "attnbench" and columns["variant_distribution_version"]
    # a preset's bound option is stored as it ran
    assert json.loads(provenance.variant_columns("castling-no-aux", {})["options"])["mask_schedule"] == "none"


def test_in_process_variants_say_so():
    @registry.register_variant(name="test-results-local")
    class Local(registry.get_variant("softmax")):
        """Local."""

    columns = provenance.variant_columns("test-results-local", {})
    assert columns["variant_distribution"] == "in-process" and columns["variant_distribution_version"] is None
    assert columns["kernel_implementation"] == kernels.SINGLE


def test_kernel_switch_is_a_context_with_the_environment_as_default(monkeypatch):
    castling = registry.get_variant("castling")
    monkeypatch.setenv(kernels.ENV_VAR, "reference")
    assert kernels.requested() == "reference" and kernels.implementation_of(castling) == "reference"
    with kernels.use("compile"):
        assert kernels.requested() == "compile"
    assert kernels.requested() == "reference"
    monkeypatch.setenv(kernels.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="ATTNBENCH_OPS"):
        kernels.requested()
    done = CliRunner().invoke(main, ["variants"])
    assert done.exit_code == 2 and "ATTNBENCH_OPS" in done.output and "Traceback" not in done.output


def test_no_framework_module_imports_the_builtin_variants_by_name():
    root = Path(__file__).resolve().parents[1] / "attnbench"
    offenders = [str(p) for p in root.rglob("*.py") if "attnbench_variants" in p.read_text()]
    assert offenders == []


SWEEP = """
name: provenance
data: {dataset: digits}
train: {epochs: 1, max_steps: 2, batch_size: 32, num_threads: 1, eval_batch_size: 1024}
seeds: [0]
variants:
  - {label: "castling[fixed]", variant: castling, options: {mask_schedule: gate_cosine}}
  - {label: "sm[/x]", variant: softmax}
sampler: grid
pruning: false
objectives: [{metric: latency_median_ms}]
measure: {latency: true, memory: true, repeats: 2, batch_size: 2, threads: 1}
"""


@pytest.mark.slow
def test_sweep_rows_carry_provenance_and_every_objective_and_labels_show_as_written(tmp_path, monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, "reference")
    path = tmp_path / "provenance.yaml"
    path.write_text(SWEEP)
    results = tmp_path / "results"
    done = CliRunner().invoke(main, ["sweep", str(path), "--results", str(results), "--device", "cpu"])
    assert done.exit_code == 0, done.output
    assert "Traceback" not in done.output and "MarkupError" not in done.output

    rows = store.read_rows(results, kind="trial").set_index("label")
    assert set(rows.index) == {"castling[fixed]", "sm[/x]"} and set(rows["status"]) == {"complete"}
    for metric in METRICS:   # a latency objective completes, and every objective is measured
        assert rows[metric].notna().all(), metric
    castling, softmax = rows.loc["castling[fixed]"], rows.loc["sm[/x]"]
    options = json.loads(castling["options"])
    assert options == {**{s.name: s.default for s in option_specs(registry.get_variant("castling"))},
                       "mask_schedule": "gate_cosine"}
    assert (castling["kernel_requested"], castling["kernel_implementation"]) == ("reference", "reference")
    assert (softmax["kernel_requested"], softmax["kernel_implementation"]) == ("reference", kernels.SINGLE)
    train = json.loads(castling["train_config"])
    assert set(train) == {f.name for f in dataclasses.fields(TrainConfig)} and train["max_steps"] == 2
    assert castling["precision"] == getattr(TrainConfig(), "precision", "float32")
    assert castling["attnbench_version"] == provenance.attnbench_version()
    assert castling["variant_distribution"] == "attnbench" and castling["torch_version"]
    assert json.loads(castling["data_options"])["img_size"] == castling["img_size"]

    done = CliRunner().invoke(main, ["report", "--results", str(results), "--no-plots"],
                              env={"COLUMNS": "200"})
    assert done.exit_code == 0, done.output
    assert "castling[fixed]" in done.output and "sm[/x]" in done.output and "Traceback" not in done.output


def test_rich_table_and_errors_show_user_text_as_written():
    from rich.console import Console

    from attnbench.results import report

    frame = pd.DataFrame([_trial(0, label="sm[/x]"), _trial(1, label="castling[fixed]")])
    summary = report.summarize(frame)
    console = Console(record=True, width=200)
    for table in report.rich_tables(summary):
        console.print(table)
    text = console.export_text()
    assert "sm[/x]" in text and "castling[fixed]" in text
    done = CliRunner().invoke(main, ["report", "--results", "/nonexistent[/x]"])
    assert done.exit_code == 2 and "/nonexistent[/x]" in done.output and "Traceback" not in done.output


# ----------------------------------------------------------------------------- docs

def test_docs_hold_the_generated_columns_table():
    text = DOCS.read_text()
    begin, end = "<!-- columns: generated by attnbench.results.schema.markdown_table() -->", "<!-- end of columns -->"
    assert begin in text and end in text
    assert text.split(begin, 1)[1].split(end, 1)[0].strip() == schema.markdown_table().strip()
