"""The benchmark scripts under ``benchmarks/`` run and write what they print (issue 9).

Tiny sizes and few repeats: these check the protocol and the arithmetic of the ratios, never speed.
"""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "linear_angular_core.py"


@pytest.fixture(scope="module")
def core_benchmark():
    spec = importlib.util.spec_from_file_location("linear_angular_core", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(module, tmp_path, *args):
    out = tmp_path / "rows.json"
    assert module.main(["--tokens", "17,33", "--batch", "1", "--heads", "2", "--head-dim", "8", "--repeats", "2",
                        "--warmup", "1", "--threads", "1", "--device", "cpu", "--no-compile", "--json", str(out),
                        *args]) == 0
    return json.loads(out.read_text())


def test_inference_rows_hold_each_ratio_to_the_matmuls_and_to_sdpa(core_benchmark, tmp_path, capsys):
    result = _run(core_benchmark, tmp_path)
    assert [row["tokens"] for row in result["rows"]] == [17, 33]
    assert result["environment"]["threads"] == 1 and result["config"]["device"] == "cpu"
    for row in result["rows"]:
        for name in ("fast", "fast-kernel", "reference", "reference-kernel"):
            assert row[f"{name}_ms"] > 0
            assert row[f"{name}_vs_matmuls"] == pytest.approx(row[f"{name}_ms"] / row["matmuls_ms"])
            assert row[f"{name}_vs_sdpa"] == pytest.approx(row[f"{name}_ms"] / row["sdpa_ms"])
    printed = capsys.readouterr()
    assert "fast: " in printed.out and "x matmuls" in printed.out and "x sdpa" in printed.out
    # the script checks the fast core against the reference before timing it
    errors = [float(e) for e in re.findall(r"fast: max \|out - reference\| = (\S+)", printed.err)]
    assert len(errors) == 2 and max(errors) < 1e-5


def test_training_rows_hold_castling_against_sdpa_plus_the_linear_core(core_benchmark, tmp_path):
    rows = _run(core_benchmark, tmp_path, "--training")["rows"]
    for row in rows:
        budget = row["sdpa_ms"] + row["linear-angular_ms"]
        assert row["castling_vs_sdpa_plus_la"] == pytest.approx(row["castling_ms"] / budget)
        assert row["castling_ref_vs_sdpa_plus_la"] == pytest.approx(row["castling-ref_ms"] / budget)
