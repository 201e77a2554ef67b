"""Learning curves in every row: per-epoch training loss, training and validation top-1 and learning
rate as typed list columns, the best checkpoint's epoch and whether training was still improving."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from attnbench.cli import main
from attnbench.experiment import load_experiment
from attnbench.results import schema, store
from attnbench.sweep import run_sweep
from attnbench.train import CURVES, TrainResult

CURVE_COLUMNS = [f"curve_{name}" for name in CURVES]

STUDY = """
name: curves
data: {dataset: digits}
train: {epochs: 3, batch_size: 256, num_threads: 1, eval_batch_size: 1024, lr: 0.003}
seeds: [0, 1]
variants: [softmax]
sampler: grid
pruning: false
measure: {latency: false, memory: false}
"""


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("curves")
    (tmp / "curves.yaml").write_text(STUDY)
    run_sweep(load_experiment(tmp / "curves.yaml"), results_dir=tmp / "results")
    return tmp / "results" / "curves"


def test_sweep_rows_carry_one_curve_value_per_epoch(swept):
    rows = store.read_rows(swept, kind="trial")
    assert len(rows) == 2 and set(rows["status"]) == {"complete"}
    for _, row in rows.iterrows():
        assert row["epochs_run"] == 3
        for column in CURVE_COLUMNS:
            values = list(row[column])
            assert len(values) == 3 and all(isinstance(v, float) for v in values), column
        # The checkpoint's validation top-1 is the curve's value at its epoch.
        assert list(row["curve_val_top1"])[row["best_epoch"]] == row["best_val_top1"]
        assert row["still_improving"] == (row["best_epoch"] == row["epochs_run"] - 1)
        lr = list(row["curve_lr"])
        assert lr[-1] < max(lr), "the cosine schedule decays by the last epoch"
        assert 0 < min(row["curve_train_loss"]) and max(row["curve_train_top1"]) <= 100


def test_curves_are_typed_list_columns_for_pyarrow_pandas_and_duckdb(swept):
    import pandas as pd

    files = store.store_files(swept)
    file_schema = pq.read_schema(files[0])
    for column in CURVE_COLUMNS:
        assert file_schema.field(column).type == pa.list_(pa.float64()), column
    assert file_schema.field("still_improving").type == pa.bool_()
    frame = pd.read_parquet(swept / "trials")
    assert len(frame["curve_val_top1"].iloc[0]) == 3
    duckdb = pytest.importorskip("duckdb")
    con = duckdb.connect()
    got = con.execute(f"SELECT len(curve_val_top1), curve_val_top1[best_epoch + 1] = best_val_top1, "
                      f"typeof(curve_lr) FROM read_parquet('{swept}/**/*.parquet')").fetchall()
    assert got == [(3, True, "DOUBLE[]")] * 2


def _history(*val_top1, val_loss=None):
    losses = val_loss or [1.0] * len(val_top1)
    return [{"epoch": i, "train_loss": 2.0 - i, "train_top1": 10.0 * i, "val_top1": v, "val_loss": loss,
             "lr": 0.001} for i, (v, loss) in enumerate(zip(val_top1, losses))]


@pytest.mark.parametrize("val_top1, val_loss, improving", [
    ((50, 60, 70), None, True),
    ((50, 70, 60), None, False),
    ((50, 70, 70), (1.0, 0.9, 0.8), True),    # a tie in top-1: the lower validation loss decides
    ((50, 70, 70), (1.0, 0.8, 0.9), False),
    ((50, 70, 70), None, True),               # a full tie: the later epoch, as the best_val checkpoint
])
def test_still_improving_follows_the_checkpoint_rule(val_top1, val_loss, improving):
    result = TrainResult(status="ok", history=_history(*val_top1, val_loss=val_loss))
    assert result.still_improving is improving
    assert result.curves()["val_top1"] == [float(v) for v in val_top1]
    assert TrainResult(status="ok").still_improving is None


def test_list_columns_take_numbers_only(tmp_path):
    row = {"kind": "trial", "curve_lr": [1e-3, 5e-4], "curve_val_top1": (50, 60.5)}
    store.write_rows(tmp_path, [row], "ok")
    read = store.read_rows(tmp_path)
    assert list(read["curve_lr"].iloc[0]) == [1e-3, 5e-4] and list(read["curve_val_top1"].iloc[0]) == [50.0, 60.5]
    for bad in ("0.1,0.2", [0.1, "x"], [True], 0.5):
        with pytest.raises(store.StoreError, match="column 'curve_lr' expects a list of numbers"):
            store.write_rows(tmp_path, [{"kind": "trial", "curve_lr": bad}], "bad")


def test_files_of_the_previous_version_read_with_null_curves(tmp_path):
    old = schema.columns_since(2)
    assert "curve_lr" not in {c.name for c in old} and "top1" in {c.name for c in old}
    table = pa.Table.from_pylist([{"kind": "trial", "schema_version": 2, "top1": 80.0, "seed": 0}],
                                 schema=pa.schema([pa.field(c.name, c.type) for c in old]))
    pq.write_table(table.replace_schema_metadata({b"attnbench.schema_version": b"2"}), tmp_path / "v2.parquet")
    store.write_rows(tmp_path, [{"kind": "trial", "top1": 81.0, "seed": 1, "curve_lr": [0.1]}], "v3")
    rows = store.read_rows(tmp_path, strict=True).sort_values("seed")
    assert rows["schema_version"].tolist() == [2, schema.SCHEMA_VERSION]
    assert rows["curve_lr"].iloc[0] is None and list(rows["curve_lr"].iloc[1]) == [0.1]
    # A version-2 file whose columns are not version 2's is refused, never misread.
    pq.write_table(table.drop(["top1"]).replace_schema_metadata({b"attnbench.schema_version": b"2"}),
                   tmp_path / "odd.parquet")
    with pytest.raises(store.StoreError, match="odd.parquet: says schema version 2 but its columns differ"):
        store.read_rows(tmp_path, strict=True)


def test_train_json_carries_the_curves(tmp_path):
    out = tmp_path / "runs.json"
    result = CliRunner().invoke(main, ["train", "softmax", "--epochs", "2", "--batch-size", "256", "--num-threads",
                                       "1", "--no-progress", "--json", str(out)])
    assert result.exit_code == 0, result.output
    run, = json.loads(out.read_text())
    assert set(run["curves"]) == set(CURVES) and all(len(v) == 2 for v in run["curves"].values())
    assert run["curves"]["val_top1"][run["best_epoch"]] == run["val_top1"]
    assert run["still_improving"] == (run["best_epoch"] == 1)


# --- the report: curves drawn, a configuration still improving flagged -------------------------

def test_report_draws_the_mean_curve_over_seeds(swept, tmp_path):
    import numpy as np

    from attnbench.results import curves, plots, report

    trials, bench = report.load_results(swept.parent)
    summary = report.summarize(trials)
    found, = curves.learning_curves(report.prepare_trials(trials), summary, report.KEYS)
    val = np.stack([np.asarray(list(v)) for v in trials["curve_val_top1"]])
    mean, std = found["curve_val_top1"]
    assert found["n"] == 2 and found["epochs"] == 3
    assert np.allclose(mean, val.mean(axis=0)) and np.allclose(std, val.std(axis=0, ddof=1))
    assert found["improving"] == int(trials["still_improving"].sum())
    written = {p.name: p for p in plots.write_plots(summary, trials, bench, tmp_path)}
    assert written["curves-curves.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _rows(improving: dict[str, list[bool]], point=None):
    import pandas as pd

    rows = []
    for label, flags in improving.items():
        for seed, flag in enumerate(flags):
            rows.append({"kind": "trial", "study": "s", "trial": 0, "seed": seed, "label": label, "variant": label,
                         "options": "{}", "status": "complete", "top1": 80.0 + seed + (label != "softmax"),
                         "still_improving": flag, "curve_val_top1": [70.0, 75.0 + seed, 76.0 + flag],
                         "curve_train_loss": [1.0, 0.8, 0.7 - 0.1 * seed], "point": point,
                         "point_index": 0 if point is None else ["a", "b"].index(point)})
    return pd.DataFrame(rows)


def test_a_configuration_still_improving_is_flagged_in_the_table_and_its_footer():
    import io

    from rich.console import Console

    from attnbench.results import report

    summary = report.summarize(_rows({"softmax": [True, False, True], "linear": [False, False, False]}))
    row = summary.set_index("label").loc["softmax"]
    assert (row["improving_seeds"], row["curve_seeds"]) == (2, 3)
    console = Console(width=120, record=True, file=io.StringIO())
    for table in report.rich_tables(summary):
        console.print(table)
    text = " ".join(console.export_text().split())
    assert "81.00 ± 1.00 ↑" in text and "82.00 ± 1.00 ↑" not in text, text
    assert "↑: still improving: the best checkpoint (highest validation top-1) was the last epoch on some seeds " \
           "(softmax 2 of 3)" in text
    markdown = report.export(summary, "markdown")
    assert "81.00 ± 1.00 ↑" in markdown and "(softmax 2 of 3)" in markdown


def test_a_study_across_points_gets_its_curves_and_pareto_per_point(tmp_path):
    import pandas as pd

    from attnbench.results import plots, report

    trials = pd.concat([_rows({"softmax": [True, False], "linear": [False, True]}, point=p) for p in ("a", "b")],
                       ignore_index=True)
    trials["macs"] = [1000 if label == "softmax" else 800 for label in trials["label"]]
    summary = report.summarize(trials)
    names = {p.name for p in plots.write_plots(summary, trials, pd.DataFrame(), tmp_path)}
    assert {"curves-s-a.png", "curves-s-b.png", "pareto-s-a.png", "pareto-s-b.png"} <= names, names
    assert "curves-s.png" not in names
