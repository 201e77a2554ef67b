"""scripts/device-check.sh on a machine without CUDA: the CPU part, a clear message, exit 0."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from attnbench.results import store

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this is the CPU path; on a GPU run the script itself")
def test_device_check_runs_its_cpu_part_and_says_no_cuda(tmp_path):
    env = {**os.environ, "ATTNBENCH_DEVICE_CHECK_SETUP": "0"}   # the environment running these tests
    done = subprocess.run(["bash", str(ROOT / "scripts" / "device-check.sh"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no CUDA device" in done.stdout.splitlines()[-1]
    steps = (tmp_path / "steps.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in steps] == ["cuda-tests", "bench-float32-cpu", "bench-bfloat16-cpu",
                                                     "sweep-cpu", "report"]
    assert all(": exit 0 " in line for line in steps), steps
    cuda_log = (tmp_path / "logs" / "cuda-tests.log").read_text()
    assert "skipped" in cuda_log and "passed" not in cuda_log and "needs a CUDA device" in cuda_log
    bench = store.read_rows(tmp_path / "results", kind="benchmark")
    assert sorted(set(bench["precision"])) == ["bfloat16", "float32"] and (bench["device"] == "cpu").all()
    trials = store.read_rows(tmp_path / "results" / "device-check", kind="trial")
    assert len(trials) == 2 and set(trials["status"]) == {"complete"}
    assert {json.loads(c)["precision"] for c in trials["train_config"]} == {"bfloat16"}
    assert {p.name for p in (tmp_path / "plots").iterdir()} >= {"scaling.png", "pareto-device-check.png"}
