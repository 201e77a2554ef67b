"""attnbench report: summary numbers, noise flags, Pareto marks, selection, exports, plots, CLI."""
import io
import json
import math

import pandas as pd
import pytest
from scipy import stats as scipy_stats
from click.testing import CliRunner
from rich.console import Console

from attnbench.results import plots, report, store
from attnbench.cli import main

# label -> (variant, top-1 per seed, top-1 before castling per seed, MACs, latency ms); seeds 0, 1, 2
# are paired with softmax's, so the differences per seed vary (a constant one would have no spread)
CONFIGS = {
    "softmax": ("softmax", [70.0, 71.0, 72.0], [70.0, 71.0, 72.0], 1.0e9, 10.0),
    "linear": ("linear", [61.0, 60.0, 62.0], [61.0, 60.0, 62.0], 5.0e8, 4.0),
    "castling": ("castling", [71.5, 70.5, 72.5], [72.5, 71.5, 73.5], 6.0e8, 12.0),
    "angular": ("angular", [50.0], [50.0], 2.0e9, 20.0),
}
CURVE = json.dumps([{"progress": p, "layer": f"blocks.{i}.attn", "mask_density": 0.5 * (1 - p) + 0.1 * i,
                     "branch_ratio": 1 - p} for p in (0.0, 0.5, 1.0) for i in (0, 1)])


def _trial(study, label, seed, top1, train_form, macs, latency, **extra):
    variant = CONFIGS.get(label, (label,))[0]
    return {"kind": "trial", "study": study, "trial": 0, "seed": seed, "label": label,
            "variant": variant, "options": "{}", "status": "complete", "error": None, "top1": top1,
            "top1_train_form": train_form, "switch_cost": None if top1 is None else train_form - top1,
            "checkpoint": "best_val",
            "macs": int(macs), "params": 5_000_000, "latency_median_ms": latency, "forward_memory_mb": 100.0,
            "arch": "vit_pico", "dataset": "digits", **extra}


def _rows():
    rows = []
    for label, (variant, top1, train_form, macs, latency) in CONFIGS.items():
        curve = {"mask_density_curve": CURVE} if label == "castling" else {}
        rows += [_trial("ablation", label, seed, a, b, macs, latency, **curve)
                 for seed, (a, b) in enumerate(zip(top1, train_form))]
    # a failed and a pruned seed of castling: counted, never averaged in
    rows.append(_trial("ablation", "castling", 3, 0.0, 0.0, 6e8, 12.0, status="failed", error="diverged"))
    rows.append(_trial("ablation", "castling", 4, None, None, 6e8, 12.0, status="pruned"))
    rows += [_trial("other", "a", s, v, v, 1e8, 1.0) for s, v in enumerate([80.0, 82.0])]
    rows += [_trial("other", "b", s, v, v, 2e8, 2.0) for s, v in enumerate([90.0, 90.0])]
    return rows


def _bench_rows():
    return [{"kind": "benchmark", "variant": v, "tokens": n, "level": "layer", "dim": 192, "heads": 3,
             "latency_median_ms": ms * n / 197, "macs": int(1e6 * n), "params": 1000}
            for v, ms in (("softmax", 1.1), ("linear", 0.5)) for n in (197, 785, 3137)]


@pytest.fixture
def results(tmp_path):
    root = tmp_path / "results"
    for i, row in enumerate(_rows()):
        store.write_rows(root, [row], f"{row['study']}/trials/row-{i:03d}")
    store.write_rows(root, _bench_rows(), "benchmarks/bench-1")
    return root


@pytest.fixture
def summary(results):
    trials, _ = report.load_results(results)
    return report.summarize(trials)


def _row(summary, label, study="ablation"):
    return summary[(summary["study"] == study) & (summary["label"] == label)].iloc[0]


def test_means_std_n_and_failed_not_averaged(summary):
    castling = _row(summary, "castling")
    assert (castling["n"], castling["failed"], castling["pruned"]) == (3, 1, 1)
    assert castling["top1"] == pytest.approx(71.5)
    assert castling["top1_std"] == pytest.approx(1.0)            # sample std (ddof=1)
    assert castling["top1_train_form"] == pytest.approx(72.5)
    assert castling["switch_cost"] == pytest.approx(1.0)
    angular = _row(summary, "angular")
    assert angular["n"] == 1 and math.isnan(angular["top1_std"])


def test_baseline_difference_noise_and_macs_reduction(summary):
    assert set(summary.loc[summary["study"] == "ablation", "baseline"]) == {"softmax"}
    linear, castling, softmax = (_row(summary, name) for name in ("linear", "castling", "softmax"))
    # paired on seeds 0-2. linear: differences -9, -11, -10, t = -10 / (1 / sqrt(3)) = -17.3 with 2 df;
    # castling: 1.5, -0.5, 0.5, t = 0.5 / (1 / sqrt(3)) = 0.866. Holm over these two (angular has one
    # seed): the smaller p doubled, the larger kept (it exceeds the doubled one).
    assert linear["test"] == castling["test"] == "paired" and linear["n_pairs"] == 3
    assert linear["p_raw"] == pytest.approx(2 * scipy_stats.t.sf(10 * math.sqrt(3), 2))
    assert castling["p_raw"] == pytest.approx(2 * scipy_stats.t.sf(0.5 * math.sqrt(3), 2))
    assert linear["p_holm"] == pytest.approx(2 * linear["p_raw"]) and castling["p_holm"] == castling["p_raw"]
    assert linear["delta_top1"] == pytest.approx(-10.0) and linear["beyond_noise"] == "yes"
    assert linear["p_holm"] < 0.01
    # Welch's over all seeds stays available: t = -10 / sqrt(1/3 + 1/3) with 4 df
    assert linear["p_welch"] == pytest.approx(2 * scipy_stats.t.sf(10 / math.sqrt(2 / 3), 4))
    assert castling["delta_top1"] == pytest.approx(0.5) and castling["beyond_noise"] == "no"
    assert castling["prob_improvement"] == pytest.approx(2 / 3)     # seeds 0 and 2 beat softmax, seed 1 not
    assert _row(summary, "angular")["beyond_noise"] == "n<2"
    assert softmax["beyond_noise"] == "baseline" and softmax["delta_top1"] == 0
    assert linear["macs_reduction_pct"] == pytest.approx(50.0)
    assert castling["macs_reduction_pct"] == pytest.approx(40.0)
    assert _row(summary, "angular")["macs_reduction_pct"] == pytest.approx(-100.0)
    other = summary[summary["study"] == "other"]                  # no softmax there: no comparison
    assert other["baseline"].isna().all() and other["delta_top1"].isna().all()


def test_explicit_baseline(results):
    trials, _ = report.load_results(results)
    summary = report.summarize(trials, baseline="a")
    b = _row(summary, "b", "other")
    assert b["delta_top1"] == pytest.approx(9.0) and b["macs_reduction_pct"] == pytest.approx(-100.0)
    # paired differences 10 and 8: t = 9 / (sqrt(2) / sqrt(2)) = 9 with 1 df, the only comparison
    assert b["test"] == "paired" and b["p_holm"] == pytest.approx(2 * scipy_stats.t.sf(9, 1))
    assert b["beyond_noise"] == "no"
    with pytest.raises(report.ReportError, match="did you mean 'linear'"):
        report.summarize(trials, baseline="linearr")


def test_seeds_that_differ_get_welch(tmp_path):
    rows = [_trial("s", label, seed, top1, top1, 1e8, 1.0)
            for label, seeds, values in (("softmax", (0, 1, 2), (70.0, 71.0, 72.0)),
                                         ("linear", (5, 6, 7), (60.0, 61.0, 63.0)))
            for seed, top1 in zip(seeds, values)]
    store.write_rows(tmp_path, rows, "t")
    summary = report.summarize(report.load_results(tmp_path)[0])
    linear = _row(summary, "linear", "s")
    assert linear["test"] == "welch" and linear["n_pairs"] == 0 and linear["p_raw"] == linear["p_welch"]
    markdown = report.export(summary, "markdown")
    assert "| yes | [" in markdown and f"| {linear['p_holm']:.2g} |" in markdown and "| Welch |" in markdown
    assert "Welch's t-test where the seeds differ" in markdown and "paired t-test" not in markdown


def test_pareto_front():
    front = report.pareto_front([1, 2, 2, 3, math.nan], [1, 2, 3, 3, 0])
    assert front.tolist() == [True, True, False, True, False]


def test_pareto_marks(summary):
    ablation = summary[summary["study"] == "ablation"].set_index("label")
    assert set(ablation.index[ablation["pareto_macs"]]) == {"castling", "linear"}
    assert set(ablation.index[ablation["pareto_latency"]]) == {"castling", "linear", "softmax"}
    assert ablation.loc["castling", "pareto"] == "MACs, lat"
    assert ablation.loc["angular", "pareto"] == ""


def test_swept_options_are_separate_configurations(tmp_path):
    # opt_* summary columns come from the stored options JSON
    rows = [_trial("s", "castling", seed, top1, top1, 1e8, 1.0) | {"options": json.dumps({"end": end})}
            for end, top1 in ((0.5, 70.0), (0.9, 75.0)) for seed in (0, 1)]
    store.write_rows(tmp_path, rows, "t")
    summary = report.summarize(report.load_results(tmp_path)[0])
    assert summary["config"].tolist() == ["castling (end=0.9)", "castling (end=0.5)"]
    assert summary["n"].tolist() == [2, 2] and summary["opt_end"].tolist() == [0.9, 0.5]


def test_select_sort_filter_columns(summary):
    assert report.select(summary, studies=["other"])["label"].tolist() == ["b", "a"]
    assert report.select(summary, variants=["linear"])["label"].tolist() == ["linear"]
    cheap = report.select(summary, filters=["macs<7e8", "study == 'ablation'"])
    assert sorted(cheap["label"]) == ["castling", "linear"]
    assert report.select(summary, filters=["label = 'castling'"])["label"].tolist() == ["castling"]
    by_macs = report.select(summary, studies=["ablation"], sort="macs", descending=True)
    assert by_macs["label"].tolist() == ["angular", "softmax", "castling", "linear"]
    with pytest.raises(report.ReportError, match="unknown column 'macz'.*did you mean 'macs'"):
        report.select(summary, filters=["macz<1e8"])
    with pytest.raises(report.ReportError, match="--sort.*did you mean 'top1'"):
        report.select(summary, sort="top11")
    with pytest.raises(report.ReportError, match="did you mean 'ablation'"):
        report.select(summary, studies=["ablaton"])
    with pytest.raises(report.ReportError, match="quote the text 'castling'"):
        report.select(summary, filters=["label == castling"])
    with pytest.raises(report.ReportError, match="not an expression"):
        report.apply_filter(summary, "macs <")


def test_rich_table(summary):
    console = Console(width=250, record=True, file=io.StringIO())
    console.print(*report.rich_tables(summary))
    text = console.export_text()
    assert "study 'ablation' (vit_pico on digits)" in text and "study 'other'" in text
    # linear - softmax per seed: -9, -11, -10: mean -10, sd 1, t(0.975, 2 df) = 4.303 x 1 / sqrt(3) = 2.48
    assert "71.50 ± 1.00" in text and "[-12.48, -7.52]" in text and "0.0066" in text and "3.26" in text
    assert "600 M" in text


def test_exports_parse(summary):
    frame = pd.read_csv(io.StringIO(report.export(summary, "csv")))
    assert len(frame) == 6 and frame.loc[frame["label"] == "linear", "top1"].item() == pytest.approx(61.0)
    records = json.loads(report.export(summary, "json", ["config", "top1", "n"]))
    assert records[0].keys() == {"config", "top1", "n"} and len(records) == 6
    markdown = report.export(summary, "markdown")
    lines = markdown.splitlines()
    header = lines.index("| configuration | n | top-1 % | Δ vs base | beyond noise | 95% CI of Δ | p (Holm) | P(better) "
                         "| test | MDE | pre-castle % | switch cost | MACs | MACs saved % | params | latency ms "
                         "| mem MiB | Pareto | failed | pruned |")
    assert lines[header + 1].startswith("|---|---:|")
    assert any(line.startswith("| castling | 3 | 71.50 ± 1.00 | +0.50 | no | [") and "| 0.48 | 0.67 | paired | "
               in line for line in lines)
    legend = next(line for line in lines if line.startswith("top-1: test %"))
    assert "beyond noise: p (Holm) < 0.05" in legend and "paired t-test on the seeds both ran" in legend
    assert "after Holm's correction" in legend
    assert "Welch" not in legend and "95% CI of Δ: t-interval of the difference, from the same test as p." in legend
    assert "MDE (under 5 seeds)" in legend
    linear = frame[frame["label"] == "linear"].iloc[0]            # the exports keep every p
    assert linear["p_welch"] < linear["p_raw"] < linear["p_holm"] < 0.01 and linear["test"] == "paired"


def test_plots_written(results, summary, tmp_path):
    trials, bench = report.load_results(results)
    assert not plots.mask_curves(trials, summary).empty
    written = plots.write_plots(summary, trials, bench, tmp_path / "plots")
    names = {p.name for p in written}
    assert names == {"scaling.png", "pareto-ablation.png", "pareto-other.png", "mask-density-ablation.png"}
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def _invoke(*args):
    return CliRunner().invoke(main, ["report", *args])


def test_cli_table_and_plots(results):
    result = _invoke("--results", str(results), "--columns", "config,top1,pareto")
    assert result.exit_code == 0, result.output
    assert "castling" in result.output and "71.50 ± 1.00" in result.output and "MACs, lat" in result.output
    assert (results / "plots" / "pareto-ablation.png").stat().st_size > 0
    assert "plots in" in result.output


def test_cli_exports_and_html(results, tmp_path):
    csv = _invoke("--results", str(results), "--format", "csv", "--no-plots", "--study", "ablation")
    assert csv.exit_code == 0 and len(pd.read_csv(io.StringIO(csv.stdout))) == 4
    out = tmp_path / "t.json"
    assert _invoke("--results", str(results), "--format", "json", "--out", str(out), "--no-plots",
                   "--columns", "label,top1").exit_code == 0
    assert json.loads(out.read_text())[0].keys() == {"label", "top1"}
    page = tmp_path / "r.html"
    assert _invoke("--results", str(results), "--no-plots", "--html", str(page)).exit_code == 0
    assert "data:image/png;base64," in page.read_text() and not (results / "plots").exists()


@pytest.mark.parametrize("args, message", [
    (["--filter", "macz<1e8"], "did you mean 'macs'"),
    (["--columns", "label,top2"], "did you mean 'top1'"),
    (["--study", "nope"], "no study 'nope'"),
])
def test_cli_bad_request_is_one_line(results, args, message):
    result = _invoke("--results", str(results), "--no-plots", *args)
    assert result.exit_code != 0 and message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_cli_missing_empty_and_old_schema(tmp_path):
    for folder, message in ((tmp_path / "missing", "does not exist"), (tmp_path, "no result rows")):
        result = _invoke("--results", str(folder))
        assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1
    old = pd.DataFrame([{"kind": "trial", "schema_version": 0, "top1": 1.0}])
    old.to_parquet(tmp_path / "old.parquet")
    result = _invoke("--results", str(tmp_path))
    assert result.exit_code != 0 and "schema version" in result.output and "Traceback" not in result.output


def test_cli_benchmark_rows_only(tmp_path):
    store.write_rows(tmp_path, _bench_rows(), "benchmarks/b")
    result = _invoke("--results", str(tmp_path))
    assert result.exit_code == 0 and "no trial rows" in result.output
    assert (tmp_path / "plots" / "scaling.png").stat().st_size > 0


def test_a_baseline_without_a_complete_seed_is_warned_about(tmp_path):
    root = tmp_path / "results"
    rows = [_trial("pruned-base", "softmax", 0, None, None, 1e9, 10.0, status="pruned"),
            _trial("pruned-base", "softmax", 1, 0.0, 0.0, 1e9, 10.0, status="failed", error="diverged"),
            _trial("pruned-base", "linear", 0, 60.0, 60.0, 5e8, 4.0),
            _trial("pruned-base", "linear", 1, 61.0, 61.0, 5e8, 4.0)]
    for i, row in enumerate(rows):
        store.write_rows(root, [row], f"pruned-base/trials/trial-{i:05d}")
    summary = report.summarize(store.read_rows(root, kind="trial"))
    assert report.baseline_warnings(summary) == [
        "study 'pruned-base': the baseline 'softmax' has no complete seed (1 failed, 1 pruned), so no "
        "configuration is compared with it"]
    result = CliRunner().invoke(main, ["report", "--results", str(root), "--no-plots"])
    assert result.exit_code == 0, result.output
    assert "warning: study 'pruned-base': the baseline 'softmax' has no complete seed" in " ".join(result.output.split())
    # a baseline with complete seeds draws no warning
    assert report.baseline_warnings(report.summarize(pd.DataFrame(_rows()))) == []
