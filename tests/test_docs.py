"""The README and docs/ stand alone: every relative link and every repository path they name exists."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Top-level folders of this repository: a path in backticks that starts with one of them is a
# claim that the file or folder exists.
REPO_DIRS = ("attnbench", "variants", "experiments", "docs", "examples", "benchmarks", "scripts", "tests", ".ci")
LINK = re.compile(r"\]\(([^)\s]+)\)")
CODE_PATH = re.compile(r"`((?:%s)/[A-Za-z0-9_./-]*[A-Za-z0-9_/-])`" % "|".join(re.escape(d) for d in REPO_DIRS))
# Documents beside the repository that its users never have (the sibling folder and its files).
OUTSIDE = re.compile(r"\.\./shared|castling-spec\.md|DESIGN\.md")
# Generated at run time, not shipped: rows and plots.
GENERATED = ("results/",)


def _links(path: Path) -> list[str]:
    return [m for m in LINK.findall(path.read_text()) if "://" not in m and not m.startswith(("#", "mailto:"))]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_relative_links_resolve(document):
    missing = [link for link in _links(document)
               if not (document.parent / link.split("#", 1)[0]).exists()]
    assert not missing, f"{document.name} links to missing files: {missing}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_repository_paths_exist(document):
    named = set(CODE_PATH.findall(document.read_text()))
    missing = sorted(p for p in named if not p.startswith(GENERATED) and not (ROOT / p).exists()
                     and not any(ch in p for ch in "*<>"))
    assert not missing, f"{document.name} names paths that do not exist: {missing}"


def test_the_path_pattern_finds_paths():
    # The checks above are only as good as the pattern: it must see a path in backticks.
    assert CODE_PATH.findall("run `experiments/ablation.yaml` and `docs/method.md`, not `foo/bar`") == [
        "experiments/ablation.yaml", "docs/method.md"]


def test_nothing_points_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    outside = []
    for name in tracked.stdout.split():
        path = ROOT / name
        if path.suffix in {".py", ".md", ".yaml", ".toml", ".sh", ".txt"} and path.is_file() and path != Path(__file__):
            text = path.read_text(errors="replace")
            if OUTSIDE.search(text):
                outside.append(name)
    assert not outside, f"these files cite documents users do not have: {outside}"


def test_every_package_is_listed_for_the_wheel():
    # pyproject lists packages by hand (variants/ installs as attnbench_variants): a package missing
    # there is missing from every non-editable install.
    tomllib = pytest.importorskip("tomllib")   # Python 3.11+

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(("attnbench_variants",) + p.parent.relative_to(ROOT / "variants").parts)
             for p in (ROOT / "variants").rglob("__init__.py")}
    found |= {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "attnbench").rglob("__init__.py")}
    assert listed == found


def _layout_block() -> str:
    readme = (ROOT / "README.md").read_text()
    return re.search(r"## Layout\n\n```\n(.*?)```", readme, re.S).group(1)


def test_the_readme_layout_names_every_module_of_the_package_and_nothing_else():
    block = _layout_block()
    lines = block.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("attnbench/"))
    package_lines = [lines[start][len("attnbench/"):]]
    for line in lines[start + 1:]:
        if not line.startswith(" "):
            break
        package_lines.append(line)
    named = {word for line in package_lines for word in line.split()}
    package = ROOT / "attnbench"
    actual = {p.name for p in package.glob("*.py") if p.name != "__init__.py"}
    actual |= {f"{p.name}/" for p in package.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert named == actual, f"README Layout: missing {sorted(actual - named)}, stale {sorted(named - actual)}"
    for top in ("variants/", "experiments/", "examples/", "benchmarks/", "scripts/", "docs/", "tests/"):
        assert top in block and (ROOT / top).is_dir(), top
