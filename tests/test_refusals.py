"""Experiments that cannot run are refused before anything is written: one line naming the file and
the field, exit status 2, no traceback, nothing under --results (no study.db, no lock file)."""
from __future__ import annotations

import random
import re
import string
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from attnbench.cli import main
from attnbench.experiment import TOP_LEVEL_FIELDS, CONFIG_FIELDS

BASE = """
name: refused
data: {dataset: digits}
train: {epochs: 1, max_steps: 1}
seeds: [0, 1]
variants:
  - softmax
  - {label: la, variant: linear-angular, options: {residual: none}}
measure: {latency: false, memory: false}
"""
CASTLING = """
name: refused
data: {dataset: digits}
train: {epochs: 1, max_steps: 1}
variants: [castling]
sampler: tpe
budget: {trials: 3}
measure: {latency: false, memory: false}
"""


def _with(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new)


def _plus(entry: str) -> str:
    """BASE with one more entry under 'variants'."""
    return _with(BASE, "options: {residual: none}}\n", "options: {residual: none}}\n  - " + entry + "\n")


def _garbage(size: int = 1_000_000, alphabet: str = string.printable) -> str:
    rng = random.Random(0)
    return "".join(rng.choice(alphabet) for _ in range(size))


def _cifar_with_corrupt_batch(tmp: Path) -> str:
    folder = tmp / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"):
        (folder / name).write_bytes(b"not a pickle")
    return str(tmp / "cifar")


# (id, file text (TMP is replaced by the test's folder), extra CLI arguments, field, part of the message).
# field None: the problem is the file itself (no field to name).
CASES = [
    # --- the cases
    ("device-cuda-without-cuda", BASE, ["--device", "cuda"], "option '--device'", "CUDA is not available"),
    ("objective-measurement-off", BASE + "objectives: [latency_median_ms]\n", [], "objectives[0].metric",
     "'latency_median_ms' is measured only with 'measure.latency: true'"),
    ("objective-memory-off", BASE + "objectives: [{metric: forward_memory_mb}]\n", [], "objectives[0].metric",
     "'measure.memory: true'"),
    ("search-beyond-option-limits", CASTLING + "search: {schedule_end: {low: 0.5, high: 1.5}}\n", [],
     "search.schedule_end", "schedule_end"),
    ("img-size-zero", _with(BASE, "{dataset: digits}", "{dataset: digits, options: {img_size: 0}}"), [],
     "data.options.img_size", "positive number of pixels, got 0"),
    ("kwargs-typo", BASE + "model: {kwargs: {depthh: 3}}\n", [], "model.kwargs.depthh", "did you mean 'depth'?"),
    ("img-size-not-whole-patches", _with(BASE, "{dataset: digits}", "{dataset: digits, options: {img_size: 9}}"),
     [], "data.options.img_size", "image size 9 is not a multiple of the patch size 2"),
    ("results-is-a-file", BASE, ["--results", "TMP/a-file"], "option '--results'", "is a file; expected a folder"),
    ("results-under-a-file", BASE, ["--results", "TMP/a-file/sub"], "option '--results'", "is a file"),
    ("img-size-not-a-number", _with(BASE, "{dataset: digits}", "{dataset: digits, options: {img_size: big}}"),
     [], "data.options.img_size", "expected an integer, got str 'big'"),
    ("printable-garbage", _garbage(), [], None, "not valid YAML"),
    ("garbage-without-yaml-syntax", _garbage(alphabet=string.ascii_letters + "[]/ "), [], None,
     "expected a mapping, got str"),
    ("missing-image-folder", _with(BASE, "{dataset: digits}", "{dataset: imagefolder, root: TMP/no-such-folder}"),
     [], "data.root", "does not exist"),
    ("corrupt-cifar-batch", _with(BASE, "{dataset: digits}", "{dataset: cifar10, root: CIFAR}"), [], "data.root",
     "could not be unpickled"),
    # --- data
    ("data-option-typo", _with(BASE, "{dataset: digits}", "{dataset: digits, options: {imgsize: 8}}"), [],
     "data.options.imgsize", "did you mean 'img_size'?"),
    ("data-option-range", _with(BASE, "{dataset: digits}", "{dataset: digits, options: {val_fraction: 1.5}}"), [],
     "data.options.val_fraction", "val_fraction must lie in [0, 1)"),
    ("data-root-for-embedded", _with(BASE, "{dataset: digits}", "{dataset: digits, root: TMP}"), [], "data.root",
     "takes no root"),
    ("data-generator-size", _with(BASE, "{dataset: digits}", "{dataset: marks, options: {num_samples: -5}}"), [],
     "data.options.num_samples", "ValueError"),
    ("data-seed-negative", _with(BASE, "{dataset: digits}", "{dataset: digits, seed: -1}"), [], "data.seed",
     "expected an integer >= 0"),
    ("swept-img-size-not-whole-patches", BASE + "search: {data.img_size: [8, 9]}\n", [], "search.data.img_size",
     "image size 9 is not a multiple of the patch size 2"),
    ("swept-img-size-not-a-number", BASE + "search: {data.img_size: [8, big]}\n", [], "search.data.img_size",
     "expected an integer, got str 'big'"),
    ("arch-patch-larger-than-image", BASE + "model: {arch: vit_tiny_patch16_224}\n", [], "model.arch",
     "image size 8 is not a multiple of the patch size 16"),
    # --- model
    ("kwargs-set-by-attnbench", BASE + "model: {kwargs: {img_size: 16}}\n", [], "model.kwargs.img_size",
     "is set by attnbench"),
    ("kwargs-heads-do-not-divide-width", BASE + "model: {kwargs: {num_heads: 3}}\n", [], "model.kwargs",
     "not divisible by num_heads 3"),
    ("kwargs-wrong-type", BASE + "model: {kwargs: {depth: three}}\n", [], "model.kwargs", "TypeError"),
    ("arch-typo", BASE + "model: {arch: vit_pico_patch2_9}\n", [], "model.arch", "unknown architecture"),
    # --- train, seeds
    ("train-device", _with(BASE, "max_steps: 1}", "max_steps: 1, device: cuda}"), [], "train.device",
     "is set by attnbench"),
    ("train-seed", _with(BASE, "max_steps: 1}", "max_steps: 1, seed: 3}"), [], "train.seed", "is set by attnbench"),
    ("train-negative-lr", _with(BASE, "max_steps: 1}", "max_steps: 1, lr: -1}"), [], "train.lr",
     "lr must be a finite number > 0"),
    ("seeds-negative", _with(BASE, "seeds: [0, 1]", "seeds: [0, -1]"), [], "seeds[1]", "expected an integer >= 0"),
    # --- configurations and their search
    ("variant-entry-field-typo", _plus("{label: x, variant: linear, serach: {}}"), [], "variants[2].serach",
     "did you mean 'search'?"),
    ("label-twice", _plus("{label: la, variant: linear}"), [], "variants", "label 'la' is used twice"),
    ("own-search-beyond-limits",
     _with(CASTLING, "variants: [castling]", "variants: [{variant: castling, search: {schedule_end: {low: 0.5, high: 1.5}}}]"),
     [], "variants[0].search.schedule_end", "schedule_end"),
    ("own-search-unknown-option", _plus("{label: s2, variant: softmax, search: {kernel_size: [3, 5]}}"), [],
     "variants[2].search.kernel_size", "variant 'softmax' has no option 'kernel_size'"),
    ("own-search-bad-choice", _plus("{label: la2, variant: linear-angular, search: {residual: [none, bogus]}}"),
     [], "variants[2].search.residual", "got 'bogus'"),
    ("own-search-float-range-in-grid",
     _plus("{label: c, variant: castling, search: {schedule_end: {low: 0.3, high: 0.9}}}"), [],
     "variants[2].search.schedule_end", "the grid sampler needs a list of values"),
    ("own-search-img-size", _plus("{label: s2, variant: softmax, search: {data.img_size: [8, 9]}}"), [],
     "variants[2].search.data.img_size", "image size 9 is not a multiple of the patch size 2"),
    ("study-search-of-an-option-only-one-has", BASE + "search: {kernel_size: [3, 5]}\n", [], "search.kernel_size",
     "give it under their own 'search'"),
    ("searched-and-fixed", _with(BASE, "variants:\n  - softmax\n", "variants:\n") + "search: {residual: [none, dwconv]}\n",
     [], "search.residual", "also fixed in variants[0].options"),
    ("search-empty", BASE + "search: {}\n", [], "search", "expected a mapping"),
    ("search-choice-twice", BASE + "search: {data.img_size: [8, 8]}\n", [], "search.data.img_size.choices",
     "listed twice"),
    ("search-log-and-step", CASTLING + "search: {schedule_end: {low: 0.3, high: 0.9, log: true, step: 0.1}}\n", [],
     "search.schedule_end", "not both"),
    # --- study-wide fields
    ("baseline-unknown", BASE + "baseline: sofmax\n", [], "baseline", "did you mean 'softmax'?"),
    ("pruning-two-objectives", BASE + "pruning: true\nobjectives: [top1, macs]\nsampler: nsga2\nbudget: {trials: 2}\n",
     [], "pruning", "multi-objective studies cannot prune"),
    ("trials-beyond-grid", BASE + "budget: {trials: 5}\n", [], "budget.trials", "the grid has 2 point(s)"),
    ("measure-threads-zero", _with(BASE, "memory: false}", "memory: false, threads: 0}"), [], "measure.threads",
     "expected an integer >= 1"),
    ("max-macs-negative", BASE + "constraints: {max_macs: -1}\n", [], "constraints.max_macs", "expected a number > 0"),
    ("storage-empty", BASE + "storage: ''\n", [], "storage", "expected a non-empty string"),
    ("name-with-slash", _with(BASE, "name: refused", "name: a/b"), [], "name", "plain name"),
    # --- the same check behind --dry-run and --workers
    ("dry-run-kwargs-typo", BASE + "model: {kwargs: {depthh: 3}}\n", ["--dry-run"], "model.kwargs.depthh",
     "did you mean 'depth'?"),
    ("workers-img-size-zero", _with(BASE, "{dataset: digits}", "{dataset: digits, options: {img_size: 0}}"),
     ["--workers", "2"], "data.options.img_size", "positive number of pixels"),
]


def _contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"<dir>") for p in folder.rglob("*")}


@pytest.mark.parametrize("name,text,args,field,message", CASES, ids=[c[0] for c in CASES])
def test_refused_in_one_line_before_anything_is_written(tmp_path, name, text, args, field, message):
    if "--device" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert_refused(tmp_path, name, text, args, field, message)


def assert_refused(tmp_path: Path, name: str, text: str, args: list, field, message: str) -> None:
    """``attnbench sweep`` of ``text`` is refused as :func:`assert_sweep_refused` says (TMP in ``text``
    and ``args`` is ``tmp_path``, which holds a file ``a-file``)."""
    (tmp_path / "a-file").write_text("not a folder\n")
    text = text.replace("CIFAR", _cifar_with_corrupt_batch(tmp_path) if "CIFAR" in text else "")
    path = tmp_path / f"{name}.yaml"
    path.write_text(text.replace("TMP", str(tmp_path)))
    assert_sweep_refused(tmp_path, path, [a.replace("TMP", str(tmp_path)) for a in args], field, message)


def assert_sweep_refused(tmp_path: Path, path: Path, args: list, field, message: str) -> None:
    """``attnbench sweep PATH --results TMP/results ARGS`` exits 2 with one line,
    ``error: FILE: field 'FIELD': ...MESSAGE...`` (no field: the file itself), no traceback, and
    writes nothing under ``tmp_path``."""
    results = tmp_path / "results"
    before = _contents(tmp_path)
    result = CliRunner().invoke(main, ["sweep", str(path), "--results", str(results), *args],
                                env={"COLUMNS": "80"})
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output[:3000]
    assert lines[0].startswith(f"error: {path}: "), lines[0][:300]
    where = lines[0][len(f"error: {path}: "):]
    if field is not None:
        expected = field if field.startswith("option ") else f"field '{field}'"
        assert where.startswith(f"{expected}: "), where[:300]
    else:
        assert not re.match(r"(field|option) '", where), where[:300]
    assert message in where, where[:300]
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), result.exception
    assert len(lines[0]) < 1000, "a value echoed in an error is cut short"
    after = _contents(tmp_path)
    assert after == before, f"written: {sorted(set(after) - set(before))}"
    assert not results.exists()


def test_the_parametrised_refusals_are_many_and_distinct():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


def test_a_missing_experiment_file_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["sweep", str(tmp_path / "nope.yaml"), "--results", str(tmp_path / "r")])
    assert result.exit_code == 2 and result.output.strip() == f"error: {tmp_path / 'nope.yaml'}: no such file"
    assert not (tmp_path / "r").exists()


def test_every_problem_is_reported_together(tmp_path):
    path = tmp_path / "two.yaml"
    path.write_text(BASE + "model: {kwargs: {depthh: 3}}\n")
    (tmp_path / "a-file").write_text("x")
    result = CliRunner().invoke(main, ["sweep", str(path), "--results", str(tmp_path / "a-file"),
                                       "--device", "cpu"], env={"COLUMNS": "80"})
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 2, result.output
    assert "option '--results'" in lines[0] and "field 'model.kwargs.depthh'" in lines[1], result.output


def test_docs_table_names_every_field_the_parser_accepts():
    docs = (Path(__file__).resolve().parents[1] / "docs" / "experiments.md").read_text()
    rows = re.findall(r"^\| `([^`]+)` \|", docs, flags=re.MULTILINE)
    for field in TOP_LEVEL_FIELDS:
        assert field in rows, f"docs/experiments.md has no row for '{field}'"
    for field in CONFIG_FIELDS:
        assert f"variants[].{field}" in rows, f"docs/experiments.md has no row for 'variants[].{field}'"
    pruning = next(line for line in docs.splitlines() if line.startswith("| `pruning` |"))
    assert "| `false` |" in pruning, "the table says pruning is off by default"
    for status in ("0", "1", "2", "3", "130", "143"):
        assert re.search(rf"^\| {status} \| ", docs, flags=re.MULTILINE), f"exit status {status} is not described"
