"""What a plugin author meets: declared option limits and help, trying a variant in-process
(the snippets of docs/plugins.md, run as written), conformance tests that must exercise the
installed copy, and errors that say a plugin may be missing.
"""
from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Literal

import pandas as pd
import pytest

from attnbench import AttentionVariant, registry
from attnbench.registry import VariantError
from attnbench.results.variants import missing_variant_hint, recorded_distributions
from attnbench.testing import VariantConformance, check_installed_copy, check_option_docs
from attnbench.variant import option_specs, parse_options
from test_registry import PLUGIN_MODULE

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "plugins.md"


def guide_snippets() -> list[str]:
    """The Python blocks of the guide that follow a ``<!-- tested: ... -->`` marker, in order."""
    return re.findall(r"<!-- tested:[^>]*-->\s*```python\n(.*?)```", GUIDE.read_text(), re.S)


@pytest.fixture
def clean_registry():
    before = set(registry.list_variants(registry.LOCAL_DISTRIBUTION))
    yield
    for name in set(registry.list_variants(registry.LOCAL_DISTRIBUTION)) - before:
        registry.unregister_variant(name)


# ------------------------------------------------------------------------- options: limits and help

def _variant_with(options_cls):
    return type("Probe", (AttentionVariant,), {"Options": options_cls, "__doc__": "probe",
                                                 "attend": lambda self, q, k, v, m: v,
                                                 "core_macs": lambda self, n: 0})


def test_declared_limits_are_enforced_and_described():
    @dataclasses.dataclass(frozen=True)
    class Opts:
        rate: float = dataclasses.field(default=0.5, metadata={"help": "a rate", "gt": 0, "le": 1})
        steps: int = dataclasses.field(default=2, metadata={"help": "steps", "ge": 1})

    cls = _variant_with(Opts)
    specs = {s.name: s for s in option_specs(cls)}
    assert specs["rate"].allowed() == "in (0, 1]" and specs["steps"].allowed() == ">= 1"
    assert specs["rate"].describe() == "rate=0.5 (float, in (0, 1])"
    assert parse_options(cls, {"rate": 1, "steps": 5}).rate == 1.0
    for bad, message in (({"rate": 0}, "option 'rate' got 0, expected a number in (0, 1]"),
                         ({"rate": 1.5}, "option 'rate' got 1.5, expected a number in (0, 1]"),
                         ({"steps": 0}, "option 'steps' got 0, expected an integer >= 1")):
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_options(cls, bad)


@pytest.mark.parametrize("metadata,message", [
    ({"ge": 0, "gt": 0}, "one lower limit"),
    ({"lt": "1"}, "limit lt='1' is not a number"),
])
def test_malformed_limits_are_refused_at_registration(metadata, message, clean_registry):
    @dataclasses.dataclass(frozen=True)
    class Opts:
        x: float = dataclasses.field(default=0.5, metadata={"help": "x", **metadata})

    with pytest.raises(VariantError, match=message):
        registry.register_variant(_variant_with(Opts), name="malformed-limits")


def test_limits_on_a_non_numeric_option_are_refused(clean_registry):
    @dataclasses.dataclass(frozen=True)
    class Opts:
        mode: Literal["a", "b"] = dataclasses.field(default="a", metadata={"help": "m", "gt": 0})

    with pytest.raises(VariantError, match="limits .* need an int or float option, not choice"):
        registry.register_variant(_variant_with(Opts), name="choice-limits")


def test_an_option_without_help_fails_the_conformance_check(clean_registry):
    @dataclasses.dataclass(frozen=True)
    class Opts:
        documented: int = dataclasses.field(default=1, metadata={"help": "yes"})
        bare: int = 2

    registry.register_variant(_variant_with(Opts), name="no-help-attn")
    with pytest.raises(AssertionError, match=r"option\(s\) without metadata\['help'\]: bare$"):
        check_option_docs("no-help-attn", {})
    check_option_docs("castling", {})


# ------------------------------------------------------------------------- trying it in-process

def test_the_guides_register_variant_snippet_runs_in_process(capsys, clean_registry):
    exec(compile(guide_snippets()[0], str(GUIDE), "exec"), {"__name__": "__main__"})
    assert capsys.readouterr().out.splitlines() == ["torch.Size([2, 17, 48])", "conformance: passed"]
    assert registry.variant_info("mean-attn").distribution == registry.LOCAL_DISTRIBUTION


@pytest.mark.slow
def test_the_guides_study_snippet_runs_as_a_script(tmp_path):
    script = tmp_path / "try_mean.py"
    script.write_text("\n".join(guide_snippets()[:2]))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 trials; rows in results/try-mean" in done.stdout
    from attnbench.results import store

    rows = store.read_rows(tmp_path / "results" / "try-mean", kind="trial")
    assert sorted(rows["variant"]) == ["mean-attn", "softmax"] and set(rows["status"]) == {"complete"}
    assert rows["forward_memory_mb"].notna().all()     # the spawned memory child knew 'mean-attn' too


def test_the_guides_relative_links_exist():
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", GUIDE.read_text()):
        assert (GUIDE.parent / target).exists(), target


# ------------------------------------------------------------------------- the installed copy

def _installed(site: Path, dist: str, module: str, name: str, editable_root: Path | None = None) -> None:
    """An installed distribution in ``site``: dist-info with RECORD and entry point, and its module."""
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[attnbench.variants]\n{name} = {module}:TinyAttention\n")
    files = [f"{info.name}/METADATA", f"{info.name}/entry_points.txt", f"{info.name}/RECORD"]
    if editable_root is None:
        (site / f"{module}.py").write_text(textwrap.dedent(PLUGIN_MODULE))
        files.append(f"{module}.py")
    else:
        url = {"url": editable_root.resolve().as_uri(), "dir_info": {"editable": True}}
        (info / "direct_url.json").write_text(json.dumps(url))
        files.append(f"{info.name}/direct_url.json")
    (info / "RECORD").write_text("".join(f"{f},,\n" for f in files))


@pytest.fixture
def sites(tmp_path, monkeypatch):
    """Folders put on sys.path by the test (last added first), with the registry and modules reset."""
    added = []

    def add(name: str) -> Path:
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)
        monkeypatch.syspath_prepend(str(folder))
        added.append(folder)
        return folder

    registry.refresh()
    yield add
    for module in [m for m in sys.modules if m.startswith("copyplug")]:
        del sys.modules[module]
    registry.refresh()


def test_the_installed_copy_passes(sites):
    _installed(sites("site"), "copyplug", "copyplug_a", "copy-a")
    check_installed_copy("copy-a", {})


def test_a_source_tree_shadowing_the_installed_copy_fails_loudly(sites):
    site = sites("site")
    _installed(site, "copyplug", "copyplug_b", "copy-b")
    source = sites("source-tree")        # prepended last: first on sys.path, like the plugin's folder
    (source / "copyplug_b.py").write_text(textwrap.dedent(PLUGIN_MODULE))
    with pytest.raises(AssertionError) as err:
        check_installed_copy("copy-b", {})
    message = str(err.value)
    assert str((source / "copyplug_b.py").resolve()) in message and str(site.resolve()) in message
    assert "--import-mode=importlib" in message
    # and the plugin's own test class runs the check
    assert VariantConformance.test_installed_copy.__doc__ == check_installed_copy.__doc__


def test_an_editable_install_is_its_source_tree(sites):
    source = sites("checkout")
    (source / "copyplug_c.py").write_text(textwrap.dedent(PLUGIN_MODULE))
    _installed(sites("site"), "copyplug", "copyplug_c", "copy-c", editable_root=source)
    check_installed_copy("copy-c", {})


def test_an_editable_install_shadowed_by_another_copy_fails(sites):
    checkout = sites("checkout")
    (checkout / "copyplug_d.py").write_text(textwrap.dedent(PLUGIN_MODULE))
    _installed(sites("site"), "copyplug", "copyplug_d", "copy-d", editable_root=checkout)
    other = sites("other-copy")
    (other / "copyplug_d.py").write_text(textwrap.dedent(PLUGIN_MODULE))
    with pytest.raises(AssertionError, match="outside the editable install of 'copyplug'"):
        check_installed_copy("copy-d", {})


def test_builtins_and_in_process_variants_are_not_installed_copies(clean_registry):
    check_installed_copy("softmax", {})
    registry.register_variant(_variant_with(dataclasses.make_dataclass("O", [], frozen=True)), name="local-copy")
    check_installed_copy("local-copy", {})


# ------------------------------------------------------------------------- a plugin gone missing

def test_unknown_variant_says_a_plugin_may_be_missing_and_lists_installed_distributions(sites):
    _installed(sites("site"), "copyplug", "copyplug_e", "copy-e")
    assert {"attnbench", "copyplug"} <= set(registry.variant_distributions())
    with pytest.raises(VariantError) as err:
        registry.get_variant("hydra")
    assert "a plugin providing it may not be installed" in str(err.value)
    assert "installed variant distributions: " in str(err.value) and "copyplug" in str(err.value)


def test_the_distributions_a_studys_rows_came_from():
    rows = pd.DataFrame({"variant": ["softmax", "hydra", "hydra", "attnbench-hydra:hydra", "old"],
                         "variant_distribution": ["attnbench", "attnbench-hydra", "attnbench-hydra",
                                                  "attnbench-hydra", None]})
    assert recorded_distributions(rows) == ["attnbench", "attnbench-hydra"]
    assert recorded_distributions(rows, "hydra") == ["attnbench-hydra"]
    assert recorded_distributions(rows, "old") == []
    assert missing_variant_hint("hydra", rows) == \
        "; the study's rows ran 'hydra' from distribution 'attnbench-hydra' (is it installed?)"
    older = rows.drop(columns="variant_distribution")      # rows written before the column existed
    assert recorded_distributions(older) == [] and missing_variant_hint("hydra", older) == ""


def test_sweep_names_the_distribution_a_missing_variant_ran_from(tmp_path):
    """A study whose rows ran a plugin that is no longer installed says which distribution it was."""
    from click.testing import CliRunner

    from attnbench.cli import main
    from attnbench.results import store

    store.write_rows(tmp_path / "results" / "gone", [
        {"kind": "trial", "study": "gone", "trial": 0, "seed": 0, "label": "ghost", "variant": "ghost-attn",
         "variant_distribution": "attnbench-ghost", "variant_distribution_version": "0.3.0"}], "trials/trial-00000")
    experiment = tmp_path / "gone.yaml"
    experiment.write_text("name: gone\ndata: {dataset: digits}\ntrain: {epochs: 1}\nseeds: [0]\n"
                          "variants: [ghost-attn]\n")
    result = CliRunner().invoke(main, ["sweep", str(experiment), "--results", str(tmp_path / "results")])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "unknown variant 'ghost-attn'" in lines[0], result.output
    assert "may not be installed" in lines[0] and "'attnbench-ghost'" in lines[0], lines[0]
