"""PNG plots of a result store: Pareto scatter, scaling curves, mask density over training.

matplotlib is imported lazily and used through its Agg canvas (no pyplot, no GUI backend).
Every plot function returns the path written, or None when its data is absent.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from attnbench.results import schema
from attnbench.results.report import KEYS, prepare_trials

__all__ = ["write_plots", "pareto_plot", "scaling_plot", "mask_curves", "mask_density_plot"]

_SETUP = schema.names("level", "dim", "heads", "depth", "measure_batch", "device", "threads", "kernel_implementation")
_MACS, _LATENCY, _VARIANT, _TOKENS, _CURVE = schema.names("macs", "latency_median_ms", "variant", "tokens",
                                                          "mask_density_curve")


def _figure(panels: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5 * panels, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, np.atleast_1d(fig.subplots(1, panels))


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_") or "study"


def pareto_plot(summary: pd.DataFrame, path: Path) -> Optional[Path]:
    """Top-1 (mean, bars = std over seeds) against MACs and against latency; the front highlighted."""
    costs = [(c, label, front) for c, label, front in ((_MACS, "MACs per image (inference form)", "pareto_macs"),
                                                       (_LATENCY, "latency, ms (median)", "pareto_latency"))
             if c in summary and summary[c].notna().any()]
    rows = summary[summary["top1"].notna()]
    if rows.empty or not costs:
        return None
    fig, axes = _figure(len(costs))
    for ax, (cost, label, front) in zip(axes, costs):
        data = rows[rows[cost].notna()]
        ax.errorbar(data[cost], data["top1"], yerr=data["top1_std"].fillna(0), fmt="o", color="0.55", capsize=3,
                    label="configuration")
        best = data[data[front]].sort_values(cost)
        ax.plot(best[cost], best["top1"], "o-", color="tab:red", label="Pareto front")
        for _, row in data.iterrows():
            ax.annotate(row["config"], (row[cost], row["top1"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
        ax.set(xlabel=label, ylabel="top-1 % (mean ± std over seeds)", title=f"top-1 vs {label.split(' ')[0]}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"study '{summary['study'].iloc[0]}'")
    return _save(fig, path)


def scaling_plot(bench: pd.DataFrame, path: Path) -> Optional[Path]:
    """Latency and MACs against tokens (log-log) from benchmark rows, one line per variant and setup."""
    if bench.empty or not {_VARIANT, _TOKENS} <= set(bench.columns):
        return None
    metrics = [(c, label) for c, label in ((_LATENCY, "latency ms (median)"), (_MACS, "MACs per sample"))
               if c in bench and bench[c].notna().any()]
    if not metrics:
        return None
    setup_cols = [c for c in _SETUP if c in bench]
    data = bench.assign(setup=bench[setup_cols].astype(str).agg(", ".join, axis=1) if setup_cols else "")
    many = data["setup"].nunique() > 1
    fig, axes = _figure(len(metrics))
    for ax, (metric, label) in zip(axes, metrics):
        for (variant, setup), group in data.groupby([_VARIANT, "setup"], sort=True):
            curve = group.groupby(_TOKENS)[metric].median().dropna()
            if not curve.empty:
                ax.plot(curve.index, curve.values, "o-", label=f"{variant} ({setup})" if many else variant)
        ax.set(xscale="log", yscale="log", xlabel="tokens N", ylabel=label, title=f"{label} vs tokens")
        ticks = sorted(data[_TOKENS].dropna().unique())
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter("")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def mask_curves(trials: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """Mask density and branch ratio over training, mean over layers and complete seeds.

    Returns:
        Columns ``study, config, progress, mask_density, branch_ratio``; empty when no row has
        a ``mask_density_curve``.
    """
    columns = ["study", "config", "progress", "mask_density", "branch_ratio"]
    if trials.empty or _CURVE not in trials:
        return pd.DataFrame(columns=columns)
    names = {tuple(key): config for *key, config in summary[[*KEYS, "config"]].itertuples(index=False)}
    records = []
    for row in prepare_trials(trials).itertuples(index=False):
        key = (row.study, row.label, row.options)
        if key not in names or row.status != "complete" or not isinstance(row.mask_density_curve, str):
            continue
        try:
            points = json.loads(row.mask_density_curve)
        except json.JSONDecodeError:
            continue
        records += [{"study": row.study, "config": names[key], **p} for p in points if isinstance(p, dict)]
    frame = pd.DataFrame(records)
    if frame.empty or "progress" not in frame:
        return pd.DataFrame(columns=columns)
    for column in ("mask_density", "branch_ratio"):
        frame[column] = pd.to_numeric(frame.get(column), errors="coerce")
    return frame.groupby(["study", "config", "progress"], as_index=False)[["mask_density", "branch_ratio"]].mean()


def mask_density_plot(curves: pd.DataFrame, path: Path) -> Optional[Path]:
    """Mask density (and branch ratio, where recorded) against training progress, one line per config."""
    metrics = [c for c in ("mask_density", "branch_ratio") if c in curves and curves[c].notna().any()]
    if curves.empty or not metrics:
        return None
    fig, axes = _figure(len(metrics))
    for ax, metric in zip(axes, metrics):
        for config, group in curves.groupby("config", sort=False):
            line = group.dropna(subset=[metric]).sort_values("progress")
            ax.plot(line["progress"], line[metric], "-", label=config)
        ax.set(xlabel="training progress", ylabel=f"{metric.replace('_', ' ')} (mean over layers, seeds)",
               title=f"{metric.replace('_', ' ')} over training")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"study '{curves['study'].iloc[0]}'")
    return _save(fig, path)


def write_plots(summary: pd.DataFrame, trials: pd.DataFrame, bench: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Every plot the data allows, under ``out_dir``: per study ``pareto-<study>.png`` and
    ``mask-density-<study>.png``, and ``scaling.png`` from benchmark rows. Returns the paths written."""
    out_dir = Path(out_dir)
    paths = [scaling_plot(bench, out_dir / "scaling.png")]
    if summary.empty:
        return [p for p in paths if p is not None]
    curves = mask_curves(trials, summary)
    for study in dict.fromkeys(summary["study"]):
        paths.append(pareto_plot(summary[summary["study"] == study], out_dir / f"pareto-{_slug(study)}.png"))
        paths.append(mask_density_plot(curves[curves["study"] == study], out_dir / f"mask-density-{_slug(study)}.png"))
    return [p for p in paths if p is not None]
