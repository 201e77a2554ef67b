"""Hostile and careless input (issue 21): nothing a file says may escape the results folder, reach
the terminal as control sequences, hang the parser, or fail after training where a refusal up front
was possible."""
from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from attnbench.cli import main
from attnbench.experiment import parse_experiment
from attnbench.sweep.storage import sqlite_path, storage_url
from test_refusals import BASE, _with, assert_refused

def _bomb(field: str) -> str:
    """A few hundred bytes of YAML that expand to 9**9 strings."""
    levels = ["a: &a [" + ", ".join(["lol"] * 9) + "]"]
    for i, name in enumerate("bcdefghi"):
        previous = "abcdefghi"[i]
        levels.append(f"{name}: &{name} [" + ", ".join([f"*{previous}"] * 9) + "]")
    return f"{field}: {{" + ", ".join(levels) + "}\n"


# (id, file text, extra CLI arguments, field, part of the message), as in test_refusals.
CASES = [
    ("name-300-characters", _with(BASE, "name: refused", "name: " + "n" * 300), [], "name",
     "expected at most 100 characters"),
    ("name-with-nul", _with(BASE, "name: refused", 'name: "a\\0b"'), [], "name", "without control characters"),
    ("name-with-newline", _with(BASE, "name: refused", 'name: "a\\nb"'), [], "name", "without control characters"),
    ("name-with-escape", _with(BASE, "name: refused", 'name: "a\\e[2Jb"'), [], "name", "without control characters"),
    ("name-dot-dot", _with(BASE, "name: refused", "name: '..'"), [], "name", "not starting with '.'"),
    # --- YAML that would take the parser (or the error message) minutes, or lose a value
    ("alias-bomb-in-seeds", BASE.replace("seeds: [0, 1]\n", "") + _bomb("seeds"), [], None,
     "an alias (*a) is not accepted"),
    ("alias-bomb-in-description", BASE + _bomb("description"), [], None, "an alias (*a) is not accepted"),
    ("anchor-and-alias", BASE.replace("seeds: [0, 1]", "seeds: &s [0, 1]") + "x: *s\n", [], None,
     "an alias (*s) is not accepted"),
    ("nested-20000-deep", BASE.replace("seeds: [0, 1]", "seeds: " + "[" * 20_000 + "]" * 20_000), [], None,
     "at line 5, column 39: nested more than 32 deep"),
    ("nested-mappings-deep", BASE + "description: " + "{a: " * 5_000 + "1" + "}" * 5_000 + "\n", [], None,
     "nested more than 32 deep"),
    ("duplicate-key", BASE + "seeds: [3]\n", [], None, "line 10, column 1: the key 'seeds' is given twice"),
    ("duplicate-nested-key", _with(BASE, "max_steps: 1}", "max_steps: 1, epochs: 2}"), [], None,
     "the key 'epochs' is given twice"),
    ("oversized-file", BASE + "# " + "x" * (5 * 2**20) + "\n", [], None, "larger than 4 MiB"),
    # --- nonsense the up-front check once let through to fail after training (or to run quietly)
    ("train-lr-inf", _with(BASE, "max_steps: 1}", "max_steps: 1, lr: .inf}"), [], "train.lr",
     "expected a finite number, got inf"),
    ("train-weight-decay-nan", _with(BASE, "max_steps: 1}", "max_steps: 1, weight_decay: .nan}"), [],
     "train.weight_decay", "expected a finite number, got nan"),
    ("train-min-lr-negative", _with(BASE, "max_steps: 1}", "max_steps: 1, min_lr: -1}"), [], "train.min_lr",
     "min_lr must be a finite number >= 0"),
    ("train-eval-batch-zero", _with(BASE, "max_steps: 1}", "max_steps: 1, eval_batch_size: 0}"), [],
     "train.eval_batch_size", "eval_batch_size must be >= 1"),
    ("train-threads-text", _with(BASE, "max_steps: 1}", "max_steps: 1, num_threads: abc}"), [], "train.num_threads",
     "expected an integer, got str 'abc'"),
    ("train-threads-zero", _with(BASE, "max_steps: 1}", "max_steps: 1, num_threads: 0}"), [], "train.num_threads",
     "num_threads must be >= 1, or none"),
    ("train-time-budget-text", _with(BASE, "max_steps: 1}", "max_steps: 1, time_budget_s: abc}"), [],
     "train.time_budget_s", "expected a number, got str 'abc'"),
    ("train-opt-unknown", _with(BASE, "max_steps: 1}", "max_steps: 1, opt: adamww}"), [], "train.opt",
     "opt 'adamww' is not a timm optimiser; did you mean 'adamw'?"),
    ("train-epochs-fraction", _with(BASE, "epochs: 1,", "epochs: 1.5,"), [], "train.epochs",
     "expected an integer, got float 1.5"),
    ("measure-batch-huge", _with(BASE, "memory: false}", "memory: false, batch_size: 1000000000}"), [],
     "measure.batch_size", "expected an integer <= 4,096, got 1000000000"),
    ("sampler-seed-overflows", BASE + "sampler: {type: grid, seed: 4294968}\n", [], "sampler.seed",
     "expected an integer <= 4,294,966, got 4294968"),
    ("seeds-beyond-64-bits", _with(BASE, "seeds: [0, 1]", f"seeds: [{2**63}]"), [], "seeds[0]",
     f"expected an integer <= 4,294,967,295, got {2**63}"),
    ("max-macs-inf", BASE + "constraints: {max_macs: .inf}\n", [], "constraints.max_macs",
     "expected a finite number, got inf"),
    ("search-range-inf", BASE.replace("variants:", "sampler: tpe\nbudget: {trials: 2}\nvariants:")
     + "search: {data.val_fraction: {low: 0.1, high: .inf}}\n", [], "search.data.val_fraction.high",
     "expected a finite number, got inf"),
    ("description-not-text", BASE + "description: {" + ", ".join(f"k{i}: {i}" for i in range(10_000)) + "}\n",
     [], "description", "expected text, got dict {'k0': 0, 'k1': 1, 'k10': 10, 'k100': 100, ...}"),
]


@pytest.mark.parametrize("name,text,args,field,message", CASES, ids=[c[0] for c in CASES])
def test_refused_in_one_line_before_anything_is_written(tmp_path, monkeypatch, name, text, args, field, message):
    monkeypatch.chdir(tmp_path)
    assert_refused(tmp_path, name, text, args, field, message)


@pytest.mark.parametrize("name", ["%2E%2E", "x%2F..%2F..%2Fescape", "q?mode=ro", "a#b", "100%", "a b", "ü" * 100])
def test_the_database_url_always_names_results_name_study_db(tmp_path, name):
    experiment = parse_experiment({"name": name, "variants": ["softmax"]}, "x.yaml")
    url = storage_url(experiment, tmp_path / "results")
    assert sqlite_path(url) == str((tmp_path / "results" / name / "study.db").resolve())
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == [name]


SMALL = """
name: NAME
data: {dataset: digits}
train: {epochs: 1, max_steps: 1}
seeds: [0]
variants: [softmax]
measure: {latency: false, memory: false}
"""


@pytest.mark.slow
def test_a_study_named_like_a_url_query_stays_in_its_folder(tmp_path, monkeypatch):
    """'q?mode=ro' once made the file results/q the database, its lock elsewhere; '%2E%2E' wrote
    study.db into the current folder."""
    monkeypatch.chdir(tmp_path)
    for name in ("q?mode=ro", "%2E%2E"):
        (tmp_path / "e.yaml").write_text(SMALL.replace("NAME", f"'{name}'"))
        result = CliRunner().invoke(main, ["sweep", "e.yaml", "--results", "results", "--device", "cpu"])
        assert result.exit_code == 0, result.output
        folder = tmp_path / "results" / name
        assert (folder / "study.db").is_file() and (folder / "study.db.lock").is_file()
        assert len(list((folder / "trials").glob("*.parquet"))) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.yaml", "results"]
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["%2E%2E", "q?mode=ro"]


def test_dev_zero_is_refused_not_read_for_ever(tmp_path):
    result = CliRunner().invoke(main, ["sweep", "/dev/zero", "--results", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == "error: /dev/zero: larger than 4 MiB; an experiment file is a few lines of YAML"
    assert not (tmp_path / "r").exists()


# --- user strings on a terminal, in Markdown and in plots -----------------------------------------

TITLE_AND_CLEAR = "\x1b]0;pwned\x07\x1b[2J"
HOSTILE_LABELS = [f"a{TITLE_AND_CLEAR}b", "<script>alert(1)</script>|c", r"$\undefinedmacro$", "cost $5 vs $6",
                  "\u202etxt.exe"]


@pytest.fixture
def hostile_results(tmp_path):
    from attnbench.results import store
    from test_report import _trial

    root = tmp_path / "results"
    labels = ["softmax", *HOSTILE_LABELS]
    for i, label in enumerate(labels):
        for seed in (0, 1):
            row = _trial(f"s{TITLE_AND_CLEAR}", label, seed, 70.0 + i + seed, 71.0 + i, 1e9 / (i + 1), 1.0 + i)
            store.write_rows(root, [row], f"s/trials/row-{i}-{seed}")
    return root


def _no_control(text: str) -> None:
    assert not any(ch in text for ch in "\x1b\x07\u202e"), repr(text[:2000])


def test_report_escapes_control_characters_in_labels_and_study_names(hostile_results):
    for width in ("80", "120"):
        result = CliRunner().invoke(main, ["report", "--results", str(hostile_results), "--no-plots"],
                                    env={"COLUMNS": width})
        assert result.exit_code == 0, result.output
        _no_control(result.output)
        assert "\\x1b]0;pwned\\x07" in result.output and "\\u202etxt" in result.output


def test_markdown_escapes_html_and_pipes(hostile_results):
    result = CliRunner().invoke(main, ["report", "--results", str(hostile_results), "--no-plots", "--format",
                                       "markdown"])
    assert result.exit_code == 0, result.output
    _no_control(result.output)
    assert "<script>" not in result.output and "&lt;script&gt;alert(1)&lt;/script&gt;\\|c" in result.output
    rows = [line for line in result.output.splitlines() if line.startswith("| ")]
    cells = {len(re.findall(r"(?<!\\)\|", line)) for line in rows}
    assert len(rows) == 1 + 6 and len(cells) == 1, rows   # the header and six configurations, all as wide


def test_plots_and_html_take_dollar_signs_as_text(hostile_results, tmp_path):
    result = CliRunner().invoke(main, ["report", "--results", str(hostile_results), "--plots", str(tmp_path / "p"),
                                       "--html", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    assert list((tmp_path / "p").glob("pareto-*.png"))
    page = (tmp_path / "r.html").read_text()
    assert "<script>alert" not in page and r"$\undefinedmacro$" in page


def test_plot_labels_are_plain_text(hostile_results):
    from attnbench.results import plots, report

    trials, _ = report.load_results(hostile_results)
    fig = plots.pareto_figure(report.summarize(trials))
    from matplotlib.text import Text

    texts = fig.findobj(lambda a: isinstance(a, Text) and "$" in a.get_text())
    assert len(texts) >= 2 and not any(t.get_parse_math() for t in texts)
    assert any(t.get_text() == "a\\x1b]0;pwned\\x07\\x1b[2Jb" for t in fig.findobj(Text))
    fig.canvas.draw()   # mathtext would raise on \undefinedmacro


@pytest.mark.slow
def test_the_sweep_progress_and_summary_escape_a_hostile_label(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = SMALL.replace("NAME", "hostile").replace("variants: [softmax]",
                                                   'variants: [{label: "x\\e]0;pwned\\a\\e[2J", variant: softmax}]')
    (tmp_path / "e.yaml").write_text(text)
    result = CliRunner().invoke(main, ["sweep", "e.yaml", "--device", "cpu"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    _no_control(result.output)
    assert "x\\x1b]0;pwned\\x07\\x1b[2J" in result.output


def test_trials_being_a_file_is_refused_before_training(tmp_path):
    (tmp_path / "r" / "refused").mkdir(parents=True)
    (tmp_path / "r" / "refused" / "trials").write_text("a file where the rows go\n")
    assert_refused(tmp_path, "trials-a-file", BASE, ["--results", "TMP/r"], "option '--results'",
                   "trials' is a file; expected a folder")


def test_an_image_folder_of_one_class_is_refused(tmp_path):
    from test_data import make_image_folder

    make_image_folder(tmp_path / "imgs", classes=("cat",))
    text = _with(BASE, "{dataset: digits}", "{dataset: imagefolder, root: TMP/imgs, options: {img_size: 8}}")
    assert_refused(tmp_path, "one-class", text, [], "data.root", "holds 1 class folder ('cat'); a classification "
                                                                 "needs at least 2")


def _one_line_exit_2(result, expected: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], result.output


def test_train_refuses_a_negative_seed_and_an_unwritable_json_before_training(tmp_path):
    (tmp_path / "afile").write_text("x")
    _one_line_exit_2(CliRunner().invoke(main, ["train", "--seed", "-1", "--max-steps", "1"]),
                     "error: TrainConfig: seed must be an integer in [0, 2**32)")
    result = CliRunner().invoke(main, ["train", "--max-steps", "1", "--json", str(tmp_path / "afile" / "x.json")])
    _one_line_exit_2(result, f"error: --json: '{tmp_path / 'afile'}' is a file; expected a folder")
    for option in ("--lr=inf", "--weight-decay=nan", "--min-lr=-1", "--eval-batch-size=0", "--num-threads=0",
                   "--opt=nonsense", "--epochs=1.5"):
        result = CliRunner().invoke(main, ["train", "--max-steps", "1", option])
        assert result.exit_code == 2 and "Traceback" not in result.output, (option, result.output)


def test_train_refuses_an_image_size_that_is_not_whole_patches(tmp_path):
    result = CliRunner().invoke(main, ["train", "--max-steps", "1", "--data-option", "img_size=9", "--no-progress"])
    _one_line_exit_2(result, "error: --data-option img_size: image size 9 is not a multiple of the patch size 2")


def test_report_checks_its_outputs_before_reading(tmp_path, hostile_results):
    (tmp_path / "afile").write_text("x")
    for option, path in (("--out", "afile/x.csv"), ("--html", "afile/x.html"), ("--plots", "afile/p")):
        result = CliRunner().invoke(main, ["report", "--results", str(hostile_results), option,
                                           str(tmp_path / path)])
        _one_line_exit_2(result, f"error: {option}: '{tmp_path / 'afile'}' is a file; expected a folder")


@pytest.mark.parametrize("variant", __import__("attnbench.registry", fromlist=["x"]).list_variants())
def test_build_attention_refuses_bad_sizes_with_a_value_error_naming_the_variant(variant):
    from attnbench.registry import build_attention

    for dim, heads in ((48, 0), (48, -3), (0, 3), (48.0, 3), (48, 2.0), (True, 1)):
        with pytest.raises(ValueError, match=f"variant '{re.escape(variant)}.*(dim|num_heads)"):
            build_attention(variant, dim, heads)


def test_the_duplicate_label_check_is_linear():
    """Counted, not timed: label comparisons grow with the number of configurations, not its square
    (16,000 configurations once spent 5.9 s comparing labels)."""
    compared = [0]

    class Label(str):
        __hash__ = str.__hash__

        def __eq__(self, other):
            compared[0] += 1
            return str.__eq__(self, other)

    n = 2_000
    raw = {"name": "many", "sampler": "random", "budget": {"trials": 1},
           "variants": [{"label": Label(f"c{i}"), "variant": "softmax"} for i in range(n)]}
    parse_experiment(raw, "many.yaml")
    assert compared[0] < 20 * n, compared[0]   # the quadratic check made n * n / 2 = 2,000,000
