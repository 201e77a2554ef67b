"""What a person reads: the report, the sweep plan and bench's table fit 80 columns and up
without breaking a value; plots whose labels never overprint and whose colours mean one
variant everywhere."""
import io
import itertools
import json
import types

import pandas as pd
import pytest
from click.testing import CliRunner
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.text import Text
from rich.console import Console

from attnbench import bench
from attnbench.cli import main
from attnbench.cli import bench as cli_bench
from attnbench.cli import sweep as cli_sweep
from attnbench.results import plots, report, store

# label -> (variant, top-1 per seed, MACs, latency ms). castling, +dwconv and +aux-fixed lie within
# 0.2 points and 1% MACs of each other: the crowd whose labels used to be one smudge.
NINE = {
    "softmax": ("softmax", [70.0, 71.0, 72.0], 1.00e9, 10.0),
    "linear": ("linear", [61.0, 60.0, 62.5], 5.0e8, 4.0),
    "linear-angular": ("linear-angular", [64.2, 63.1, 65.0], 5.2e8, 4.5),
    "angular": ("angular", [55.0, 57.5, 56.1], 2.0e9, 20.0),
    "castling": ("castling", [71.5, 70.5, 72.5], 6.00e8, 12.0),
    "castling[fixed]": ("castling", [70.9, 69.8, 71.6], 6.02e8, 12.2),
    "+aux-fixed": ("castling", [71.6, 70.4, 72.6], 6.03e8, 12.3),
    "+dwconv": ("castling", [71.4, 70.7, 72.3], 6.05e8, 12.5),
    "+aux-fixed+dwconv": ("castling", [72.4, 71.9, 73.3], 6.10e8, 12.9),
}
CURVE = json.dumps([{"progress": p, "layer": "blocks.0.attn", "mask_density": 1 - p, "branch_ratio": 1 - p}
                    for p in (0.0, 0.5, 1.0)])


def _rows(configs=NINE, study="ablation"):
    return [{"kind": "trial", "study": study, "trial": 0, "seed": seed, "label": label, "variant": variant,
             "options": "{}", "status": "complete", "top1": top1, "top1_train_form": top1 + 0.3, "switch_cost": 0.3,
             "checkpoint": "best_val", "macs": int(macs), "params": 5_000_000, "latency_median_ms": ms,
             "forward_memory_mb": 100.0, "arch": "vit_pico", "dataset": "digits",
             **({"mask_density_curve": CURVE} if variant == "castling" else {})}
            for label, (variant, values, macs, ms) in configs.items() for seed, top1 in enumerate(values)]


@pytest.fixture
def results(tmp_path):
    root = tmp_path / "results"
    store.write_rows(root, _rows(), "ablation/trials/rows")
    # a configuration whose every seed failed: no top-1, yet named in the plots
    store.write_rows(root, [{**_rows()[0], "label": "+gate", "variant": "castling", "status": "failed",
                             "top1": None, "error": "diverged"}], "ablation/trials/failed")
    return root


@pytest.fixture
def summary(results):
    return report.summarize(report.load_results(results)[0])


def _render(renderables, width: int) -> str:
    console = Console(width=width, record=True, file=io.StringIO())
    for item in renderables:
        console.print(item)
    return console.export_text()


def _top1_cells(summary):
    done = summary[summary["n"] > 1]
    return [f"{mean:.2f} ± {sd:.2f}" for mean, sd in zip(done["top1"], done["top1_std"])]


@pytest.mark.parametrize("width", [80, 100, 120])
def test_report_fits_the_width_without_breaking_a_value(summary, width):
    text = _render(report.rich_tables(summary), width)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= width
    for label in NINE:
        assert any(f" {label} " in f" {line} " for line in lines), label
    for cell in _top1_cells(summary):
        assert any(cell in line for line in lines), cell
    # Δ vs base and the verdict come right after top-1, at every width
    header = " ".join(lines[2:4])
    for name in ("configuration", "n", "top-1 %", "Δ vs", "beyond"):
        assert name in header
    # the footer names exactly the default columns the table left out
    footer = " ".join(line.strip() for line in text[text.index("Left out to fit"):].splitlines())
    omitted = footer.split(" columns: ", 1)[1].split(". ", 1)[0].split(", ")
    assert set(omitted) < set(report.DEFAULT_COLUMNS) and len(omitted) == len(set(omitted))
    assert not {"config", "n", "top1", "delta_top1", "beyond_noise"} & set(omitted)
    assert len(omitted) + sum(1 for c in report.DEFAULT_COLUMNS if c not in omitted) == len(report.DEFAULT_COLUMNS)
    header = " ".join(lines[2:4])
    assert ("P(better)" in header) == ("prob_improvement" not in omitted)
    assert ("MDE" in header) == ("min_detectable" not in omitted)
    assert "--wide" in footer and "--columns" in footer and "csv" in footer
    assert f"fit {width} columns" in footer


def test_wider_terminals_show_more_and_the_legend_explains_only_the_shown_columns(summary):
    narrow, wide = _render(report.rich_tables(summary), 80), _render(report.rich_tables(summary), 120)
    assert "P(better):" not in narrow and "P(better):" in wide          # P(better) fits 120, not 80
    assert "MACs: per image" not in narrow and "MACs: per image" in wide
    assert "prob_improvement" in narrow[narrow.index("Left out"):]
    assert "prob_improvement" not in wide[wide.index("Left out"):]


def test_many_configurations_get_a_rule_every_five_rows(summary):
    lines = _render(report.rich_tables(summary), 100).splitlines()
    body = lines[lines.index(next(line for line in lines if line.lstrip().startswith("─"))) + 1:]
    assert body[5].strip() == "" and body[11].strip() == ""             # 5 rows, a break, 5 rows, a break


def test_cli_wide_and_columns(results):
    run = lambda *args: CliRunner().invoke(main, ["report", "--results", str(results), "--no-plots", *args],  # noqa: E731
                                           env={"COLUMNS": "80"})
    wide = run("--wide")
    assert wide.exit_code == 0, wide.output
    assert "Left out" not in wide.output and "pruned" in wide.output and "MDE" in wide.output
    chosen = run("--columns", "config,top1,params,delta_ci")
    assert chosen.exit_code == 0, chosen.output
    # linear - softmax per seed: -9, -11, -9.5: mean -9.83, sd 1.04, t(0.975, 2 df) x sd / sqrt(3) = 2.59
    assert "params" in chosen.output and "[-12.42, -7.25]" in chosen.output and "Left out" not in chosen.output
    assert "beyond" not in chosen.output
    narrow = run()
    assert "Left out to fit 80 columns" in narrow.output
    assert max(len(line) for line in narrow.output.splitlines()) <= 80
    exported = CliRunner().invoke(main, ["report", "--results", str(results), "--no-plots", "--format", "csv",
                                         "--columns", "config,delta_ci"])
    assert pd.read_csv(io.StringIO(exported.output)).columns.tolist() == ["config", "delta_ci_low", "delta_ci_high"]


def test_markdown_csv_json_html_keep_every_column(summary):
    markdown = report.export(summary, "markdown")
    header = next(line for line in markdown.splitlines() if line.startswith("| configuration"))
    assert header.count("|") == len(report.DEFAULT_COLUMNS) + 1
    for name in ("P(better)", "MDE", "mem MiB", "pruned", "95% CI of Δ", "p (Holm)"):
        assert f"| {name} |" in header
    assert "P(better):" in markdown and "\n" not in header
    csv = pd.read_csv(io.StringIO(report.export(summary, "csv")))
    assert list(csv.columns) == list(summary.columns)
    assert json.loads(report.export(summary, "json"))[0].keys() == set(summary.columns)
    page = report.html_page(summary, report.DEFAULT_COLUMNS)
    assert page.count("<th>") == len(report.DEFAULT_COLUMNS) and "<th>P(better)</th>" in page


def test_labels_are_shown_as_written(tmp_path):
    rows = _rows({"sm[/x]": ("softmax", [70.0, 71.0], 1e9, 10.0), "[bold]x": ("linear", [60.0, 61.0], 5e8, 4.0)})
    text = _render(report.rich_tables(report.summarize(pd.DataFrame(rows))), 80)
    assert "sm[/x]" in text and "[bold]x" in text


def _plan_rows():
    config = lambda label, variant, **options: types.SimpleNamespace(label=label, variant=variant,  # noqa: E731
                                                                    options=options)
    costs = {"num_tokens": 197, "macs": 1_258_291_200, "attention_macs": 301_989_888, "params": 5_717_416}
    return [(config("castling[fixed]", "castling", mask_schedule="fixed", schedule_end=0.7, threshold=0.02,
                    feature_map="elu"), costs),
            (config("linear-angular", "linear-angular", residual="dwconv"), costs),
            (config("softmax", "softmax"), costs)]


def test_sweep_plan_fits_80_columns(monkeypatch):
    from attnbench import sweep

    monkeypatch.setattr(sweep, "plan", lambda checked, point=None: ("vit_tiny", _plan_rows()))
    experiment = types.SimpleNamespace(name="ablation", source="experiments/ablation.yaml", n_trials=lambda: 3,
                                       plan=lambda: [1], seeds=[0, 1], sampler="grid", pruning=False, baseline=None,
                                       objectives=[types.SimpleNamespace(direction="maximize", metric="top1")],
                                       dataset="digits", points=(), tune=None)
    console = Console(width=80, record=True, file=io.StringIO())
    monkeypatch.setattr(cli_sweep, "console", console)   # the console _print_plan prints to
    cli_sweep._print_plan(types.SimpleNamespace(experiment=experiment, device="cpu"))
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 80
    for value in ("castling[fixed]", "linear-angular", "mask_schedule=fixed", "schedule_end=0.7",
                  "threshold=0.02", "feature_map=elu", "residual=dwconv", "1,258,291,200"):
        assert any(value in line for line in lines), value


def _bench_result(variants=("softmax", "linear-angular", "castling"), tokens=(197, 785, 3137, 12545)):
    rows = [{"variant": v, "tokens": n, "macs": int(1.3e6 * n), "attention_macs": int(1e6 * n), "params": 148224,
             "latency_median_ms": ms * n / 197, "latency_iqr_ms": 0.01 * ms * n / 197, "latency_min_ms": 0.9 * ms * n
             / 197, "latency_max_ms": 1.1 * ms * n / 197, "latency_spread_pct": 4.0, "speedup_vs_softmax": 1.1 / ms,
             "forward_memory_mb": 12.5, "kernel_implementation": "n/a", "floor_ms": 0.8 * ms * n / 197,
             "floor_ratio": 1.25}
            for n in tokens for v, ms in zip(variants, (1.1, 0.5, 0.7))]
    config = bench.BenchConfig(variants=variants, tokens=tokens, threads=2)
    return bench.BenchResult(config, rows, {v: (400.0, "") for v in variants[1:]})


def test_bench_table_fits_80_columns():
    result = _bench_result()
    text = _render(cli_bench.render(result), 80)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    for row in result.rows:                       # each row on one line, its values whole
        speed = f"{row['speedup_vs_softmax']:.2f}x"
        assert sum(line.split()[:2] == [row["variant"], str(row["tokens"])] and speed in line
                   for line in lines) == 1, row
    prose = " ".join(text.split())
    left_out = prose.split("Left out to fit 80 columns: ", 1)[1].split(" (")[0]
    assert left_out and "vs softmax: softmax's ms" in prose
    assert "x floor" not in left_out
    rows = [line for line in lines if line.split()[:1] in (["softmax"], ["linear-angular"], ["castling"])]
    assert len(rows) == len(result.rows) and all("1.25x" in line for line in rows), rows


# ------------------------------------------------------------------------------------ plots

def _label_boxes(fig):
    fig.canvas.draw()                    # as saved: annotations at their final positions
    renderer = fig.canvas.get_renderer()
    # the text of each annotation only (Text's extent, not the leader line's)
    return [(t.get_text(), Text.get_window_extent(t, renderer)) for ax in fig.axes for t in ax.texts]


def test_pareto_labels_never_overlap(summary):
    study = summary[summary["study"] == "ablation"]
    fig = plots.pareto_figure(study)
    boxes = _label_boxes(fig)
    assert sorted(text for text, _ in boxes) == sorted(list(NINE) * 2)        # every label, on both panels
    for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2):
        assert not box_a.overlaps(box_b), (a, b)


def test_pareto_titles_and_the_configuration_with_no_complete_seed(summary):
    fig = plots.pareto_figure(summary)
    assert [ax.get_title() for ax in fig.axes] == ["top-1 vs MACs", "top-1 vs latency"]
    notes = " ".join(t.get_text() for t in fig.texts) + fig.get_supxlabel()
    assert "no complete seed" in notes and "+gate" in notes


def _colours(fig) -> dict[str, str]:
    """Legend label -> colour of its line (an errorbar's data line)."""
    out = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            line = handle[0] if isinstance(handle, tuple) else handle
            out[label] = to_hex(line.get_color())
    return out


def test_one_colour_per_variant_in_every_plot(summary, results, tmp_path, monkeypatch):
    figures = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), save(fig, *a, **k))[1])
    trials, _ = report.load_results(results)
    result = _bench_result(variants=("linear-angular", "softmax", "castling"))
    bench_rows = pd.DataFrame(result.rows).assign(kind="benchmark")
    assert plots.pareto_plot(summary, tmp_path / "p.png") and plots.scaling_plot(bench_rows, tmp_path / "s.png")
    assert plots.mask_density_plot(plots.mask_curves(trials, summary), tmp_path / "m.png")
    pareto, scaling, mask = map(_colours, figures)
    for variant in ("softmax", "linear-angular", "castling"):
        expected = to_hex(plots.variant_color(variant))
        assert scaling[variant] == expected, variant
        assert pareto[variant] == expected, variant
    for label, (variant, *_) in NINE.items():
        if variant == "castling":
            assert mask[label] == to_hex(plots.variant_color("castling")), label
    assert len({plots.variant_color(v) for v in ("softmax", "linear", "angular", "linear-angular", "castling")}) == 5
    assert plots.variant_color("my-plugin") == plots.variant_color("my-plugin")


def test_log_axes_are_labelled_in_plain_numbers(tmp_path, monkeypatch):
    """Plots draw user text with TeX off; a log axis's default labels are TeX and would show raw."""
    figures = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), save(fig, *a, **k))[1])
    rows = pd.DataFrame(_bench_result().rows).assign(kind="benchmark")
    assert plots.scaling_plot(rows, tmp_path / "s.png")
    labels = [t.get_text() for ax in figures[0].axes for t in ax.get_yticklabels(minor=False)
              + ax.get_yticklabels(minor=True)]
    assert any(labels) and not any("mathdefault" in text or "$" in text for text in labels), labels
