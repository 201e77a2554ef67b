"""The command line and the result readers start without torch: importing them, ``attnbench --help``
and ``attnbench report`` load neither torch nor the variant contract (in a fresh interpreter, since
this one imported both long ago)."""
import json
import subprocess
import sys
from pathlib import Path

import attnbench.cli
import attnbench.results

HEAVY = ("torch", "attnbench.variant", "timm")


def _modules_of(package) -> list[str]:
    folder = Path(package.__file__).parent
    return sorted(f"{package.__name__}.{p.stem}" for p in folder.glob("*.py") if p.stem != "__main__")


def _heavy_loaded_by(steps: dict[str, str]) -> dict[str, list[str]]:
    """Run each step's code in turn in one fresh interpreter; step -> the heavy modules it loaded
    (a step is charged only with what was not loaded before it)."""
    probe = ["import json, sys", "seen, out = set(), {}"]
    for name, code in steps.items():
        probe += [code, f"now = {{m for m in {HEAVY!r} if m in sys.modules}}",
                  f"out[{name!r}] = sorted(now - seen)", "seen = now"]
    probe.append("print(json.dumps(out))")
    run = subprocess.run([sys.executable, "-c", "\n".join(probe)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_cli_and_results_modules_import_without_torch():
    modules = list(dict.fromkeys(["attnbench.cli", "attnbench.results.report", "attnbench.registry", "attnbench.native",
                                  *_modules_of(attnbench.results), *_modules_of(attnbench.cli)]))
    loaded = _heavy_loaded_by({m: f"import {m}" for m in modules})
    assert {m: heavy for m, heavy in loaded.items() if heavy} == {}
    assert list(loaded) == modules   # every step ran


def test_help_and_report_run_without_torch(tmp_path):
    from attnbench.results import store

    root = tmp_path / "results"
    store.write_rows(root, [{"kind": "trial", "study": "s", "trial": 0, "seed": 0, "label": "softmax",
                             "variant": "softmax", "status": "complete", "top1": 50.0, "macs": 10}], "s/trials/r")
    commands = [["--help"], ["report", "--help"], ["report", "--results", str(root)],
                ["report", "--results", str(root), "--format", "csv"]]
    steps = {" ".join(argv): "from attnbench.cli import main\n"
                             f"try:\n    main({argv!r}, standalone_mode=False)\nexcept SystemExit:\n    pass"
             for argv in commands}
    loaded = _heavy_loaded_by(steps)
    assert {step: heavy for step, heavy in loaded.items() if heavy} == {}
    assert (root / "plots").is_dir()   # the report really ran (its plots included)


def test_the_probe_sees_torch_when_it_is_loaded():
    assert _heavy_loaded_by({"variant": "import attnbench.variant"}) == {"variant": ["attnbench.variant", "torch"]}
