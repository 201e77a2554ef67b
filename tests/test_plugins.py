"""Third-party plugins end to end, in fresh processes, as a user meets them after `pip install`.

The example plugin (examples/attnbench-hydra) is installed with pip into a temporary folder
that only the subprocesses see (PYTHONPATH); broken plugins are written as installed
distributions beside it (``fake_distribution`` from test_registry, which covers the registry
API and failed imports in-process). Nothing is installed into the test environment.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from attnbench.results import store
from attnbench.testing import CHECKS
from test_registry import BUILTINS, PLUGIN_MODULE, fake_distribution

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "attnbench-hydra"
PASSED = f"{len(CHECKS)}/{len(CHECKS)} passed"   # `variants --check` runs CHECKS

BAD_SHAPE = PLUGIN_MODULE + '''
class BadShape(TinyAttention):
    """Violates the contract: attend() drops the token axis."""

    def attend(self, q, k, v, attn_mask):
        return v.mean(dim=2)
'''

BAD_OPTIONS = PLUGIN_MODULE + '''
import dataclasses

@dataclasses.dataclass(frozen=True)
class ListOptions:
    window: list = dataclasses.field(default_factory=lambda: [3, 3])

class BadOptions(TinyAttention):
    """Violates the contract: an option of a type attnbench cannot validate or sweep."""
    Options = ListOptions
'''

BAD_MACS = PLUGIN_MODULE + '''
class BadMacs(TinyAttention):
    """Violates the contract: core_macs() ignores the N x N score matrix it computes."""

    def attend(self, q, k, v, attn_mask):
        return (q @ k.transpose(-2, -1)).softmax(-1) @ v
'''

# distribution -> (variant name, module, source); each breaks the contract in its own way.
BROKEN = {
    "badshape-plugin": ("bad-shape", "badshape_mod:BadShape", BAD_SHAPE),
    "badoptions-plugin": ("bad-options", "badoptions_mod:BadOptions", BAD_OPTIONS),
    "badmacs-plugin": ("bad-macs", "badmacs_mod:BadMacs", BAD_MACS),
    "notavariant-plugin": ("not-a-variant", "notavariant_mod:NOT_A_VARIANT", PLUGIN_MODULE),
    "noimport-plugin": ("no-import", "noimport_mod:TinyAttention", "import a_library_nobody_installed\n"),
}
LOAD_FAILURES = ("badoptions-plugin", "notavariant-plugin", "noimport-plugin")   # caught before running

TINY_SWEEP = """
name: {name}
data: {{dataset: digits}}
train: {{epochs: 1, max_steps: 2, batch_size: 32, num_threads: 1, eval_batch_size: 1024}}
seeds: [0]
variants: [{variant}]
{search}
sampler: grid
pruning: false
measure: {{latency: false, memory: false}}
"""


@pytest.fixture(scope="module")
def hydra_site(tmp_path_factory) -> Path:
    """The example plugin, pip-installed (offline, no build isolation) into a temporary folder."""
    if importlib.util.find_spec("setuptools") is None:   # venvs of Python >= 3.12 come without it
        pytest.skip("installing the example plugin offline (--no-build-isolation) needs setuptools")
    root = tmp_path_factory.mktemp("hydra")
    source = root / "src"   # build from a copy: the build leaves build/ and *.egg-info beside the source
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__",
                                                                   ".pytest_cache"))
    site = root / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                           "--no-index", "--disable-pip-version-check", "--quiet", "--target", str(site),
                           str(source)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (site / "attnbench_hydra").is_dir()
    return site


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("broken")
    for dist, (name, target, source) in BROKEN.items():
        fake_distribution(site, dist, {name: target}, module=target.split(":")[0], source=source)
    return site


def attnbench(*args: str, sites: tuple[Path, ...], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the ``attnbench`` command in a fresh process that sees the plugins in ``sites``."""
    script = Path(sys.executable).with_name("attnbench")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "attnbench.cli"]
    return subprocess.run(command + list(args), cwd=cwd, env=_env(sites), capture_output=True, text=True,
                          timeout=timeout)


def _env(sites) -> dict:
    paths = [str(s) for s in sites] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    # wide, uncoloured tables: one row per line, names never folded
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "COLUMNS": "250", "NO_COLOR": "1",
            "TERM": "dumb", "PYTHONDONTWRITEBYTECODE": "1"}


def row(output: str, name: str) -> str:
    """The first line of the table row of variant ``name``."""
    lines = [line for line in output.splitlines() if re.match(rf"[│|]\s*{re.escape(name)}\s*[│|]", line)]
    assert len(lines) == 1, f"variant {name!r} is not listed once:\n{output}"
    return lines[0]


def row_block(output: str, name: str) -> str:
    """Every line of the table row of variant ``name`` (its cells may span several lines)."""
    lines = output.splitlines()
    start = lines.index(row(output, name))
    end = start + 1
    while end < len(lines) and re.match(r"[│|]\s+[│|]", lines[end]):
        end += 1
    return " ".join(re.sub(r"[│|]", " ", "\n".join(lines[start:end])).split())   # folded cells unfolded


def warnings_naming(stderr: str, text: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning:") and text in line]


def sweep_file(folder: Path, name: str, variant: str, search: str = "") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(TINY_SWEEP.format(name=name, variant=variant, search=search))
    return path


# ------------------------------------------------------------------------- the example plugin

def test_example_plugin_is_listed_with_its_distribution(hydra_site, tmp_path):
    done = attnbench("variants", sites=(hydra_site,), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    line = row(done.stdout, "hydra")
    assert "attnbench-hydra" in line and "normalize, eps" in row_block(done.stdout, "hydra")
    for name in BUILTINS:
        assert "attnbench" in row(done.stdout, name)
    assert "warning" not in done.stderr, done.stderr


def test_example_plugin_options_are_described_and_checked_with_given_values(hydra_site, tmp_path):
    done = attnbench("variants", "hydra", sites=(hydra_site,), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "from distribution attnbench-hydra (attnbench_hydra:HydraAttention)" in done.stdout
    assert re.search(r"│ eps\s+│ float\s+│ 1e-06\s+│ > 0\s+│ floor of the L2 norm", done.stdout), done.stdout
    done = attnbench("variants", "--check", "hydra", "--option", "normalize=head", sites=(hydra_site,), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "with normalize='head'" in done.stdout and PASSED in done.stdout
    done = attnbench("variants", "--check", "hydra", "--option", "normalise=head", sites=(hydra_site,), cwd=tmp_path)
    assert done.returncode == 2 and "did you mean 'normalize'?" in done.stderr and "Traceback" not in done.stderr


def test_plugin_tests_fail_loudly_when_a_source_tree_shadows_the_installed_copy(hydra_site):
    # The source folder ahead of the installed copy on sys.path, as a flat layout or a
    # `pythonpath = src` setting puts it: the conformance suite must not pass silently.
    env = _env((EXAMPLE / "src", hydra_site))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_conformance.py"],
                          cwd=EXAMPLE, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0, done.stdout[-3000:]
    assert "test_installed_copy" in done.stdout and "not from the installed distribution 'attnbench-hydra'" in \
        done.stdout, done.stdout[-3000:]
    assert re.search(r"\b2 failed\b", done.stdout), done.stdout[-3000:]    # one per test class, nothing else


def test_example_plugin_passes_its_own_conformance_tests(hydra_site):
    # The plugin's tests, run against the installed copy (its source tree is not on the path).
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                          cwd=EXAMPLE, env=_env((hydra_site,)), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert re.search(r"\b\d+ passed\b", done.stdout) and "failed" not in done.stdout


def test_example_plugin_is_swept_over_its_option_and_reported(hydra_site, tmp_path):
    path = sweep_file(tmp_path, "hydra-plugin", "hydra", "search: {normalize: [all, head]}")
    done = attnbench("sweep", str(path), "--results", "results", "--device", "cpu", sites=(hydra_site,),
                     cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = store.read_rows(tmp_path / "results" / "hydra-plugin", kind="trial")
    assert len(rows) == 2 and set(rows["status"]) == {"complete"}, rows[["status", "error"]]
    assert set(rows["variant"]) == {"hydra"}
    # the row names the plugin distribution and version that provided the variant
    assert set(rows["variant_distribution"]) == {"attnbench-hydra"}
    assert set(rows["variant_distribution_version"]) == {"0.1.0"}
    assert set(rows["kernel_implementation"]) == {"n/a"}   # hydra offers one implementation
    assert sorted(json.loads(o)["normalize"] if isinstance(o, str) else o["normalize"]
                  for o in rows["options"]) == ["all", "head"]

    done = attnbench("report", "--results", "results", "--format", "csv", "--no-plots", sites=(hydra_site,),
                     cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    header = lines[0].split(",")
    labels = {line.split(",")[header.index("config")] for line in lines[1:]}
    assert labels == {"hydra (normalize=all)", "hydra (normalize=head)"}, done.stdout


# ------------------------------------------------------------------------- broken plugins

def test_check_fails_contract_violations_and_passes_everything_else(hydra_site, broken_site, tmp_path):
    done = attnbench("variants", "--check", sites=(hydra_site, broken_site), cwd=tmp_path)
    assert done.returncode != 0
    assert "Traceback" not in done.stdout + done.stderr
    for name in BUILTINS | {"hydra"}:
        assert PASSED in row(done.stdout, name), row(done.stdout, name)
    # Plugins that load but misbehave get a row naming the distribution and the failed check.
    for dist, check in (("badshape-plugin", "check_shape_and_dtype: attend() returned (2, 3, 16), expected"),
                        ("badmacs-plugin", "check_macs: core_macs(17) = ")):
        line, block = row(done.stdout, BROKEN[dist][0]), row_block(done.stdout, BROKEN[dist][0])
        assert dist in line and "passed" not in block and check in block, block
    # Plugins that cannot even be loaded get one warning naming the distribution.
    for dist in LOAD_FAILURES:
        assert len(warnings_naming(done.stderr, f"'{dist}'")) == 1, done.stderr
    assert "5 variant(s) failed" in done.stderr, done.stderr


def test_listing_survives_broken_plugins_with_one_warning_each(broken_site, tmp_path):
    done = attnbench("variants", sites=(broken_site,), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    for name in BUILTINS:
        row(done.stdout, name)
    for dist in LOAD_FAILURES:
        warned = warnings_naming(done.stderr, f"'{dist}'")
        assert len(warned) == 1, done.stderr
    assert "not supported" in warnings_naming(done.stderr, "'badoptions-plugin'")[0]
    assert "not a subclass" in warnings_naming(done.stderr, "'notavariant-plugin'")[0]
    assert "failed to load" in warnings_naming(done.stderr, "'noimport-plugin'")[0]
    # Misbehaving at run time is only found by running it: `variants --check` (above).
    for dist in ("badshape-plugin", "badmacs-plugin"):
        assert dist in row(done.stdout, BROKEN[dist][0])
    assert len([line for line in done.stderr.splitlines() if line.startswith("warning:")]) == len(LOAD_FAILURES)


def test_sweeps_of_builtins_work_with_broken_plugins_installed(broken_site, tmp_path):
    path = sweep_file(tmp_path, "builtin-beside-broken", "softmax")
    done = attnbench("sweep", str(path), "--results", "results", "--device", "cpu", sites=(broken_site,),
                     cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = store.read_rows(tmp_path / "results" / "builtin-beside-broken", kind="trial")
    assert list(rows["status"]) == ["complete"] and list(rows["variant"]) == ["softmax"]
    # Asking for the broken one by name is a one-line error naming its distribution.
    path = sweep_file(tmp_path, "asks-for-broken", "bad-options")
    done = attnbench("sweep", str(path), "--results", "results", "--device", "cpu", sites=(broken_site,),
                     cwd=tmp_path)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "badoptions-plugin" in done.stderr, done.stderr
