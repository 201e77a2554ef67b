"""PNG plots of a result store: Pareto scatter, scaling curves, mask density over training.

matplotlib is imported lazily and used through its Agg canvas (no pyplot, no GUI backend).
Every plot function returns the path written, or None when its data is absent.
"""
from __future__ import annotations

import functools
import json
import re
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from attnbench.results import conversion, curves as learning, schema
from attnbench.terminal import IMPROVING_MARK, printable
from attnbench.results.summary import KEYS, prepare_trials

__all__ = ["variant_color", "write_plots", "pareto_figure", "pareto_plot", "scaling_plot", "mask_curves",
           "mask_density_plot", "recovery_plot", "learning_curves_plot"]

_SETUP = schema.names("level", "dim", "heads", "depth", "measure_batch", "device", "threads", "kernel_implementation")
_MACS, _LATENCY, _VARIANT, _TOKENS, _CURVE = schema.names("macs", "latency_median_ms", "variant", "tokens",
                                                          "mask_density_curve")
_LATENCY_MIN, _LATENCY_MAX = schema.names("latency_min_ms", "latency_max_ms")


#: The built-in variants' colours (matplotlib's tab10), fixed so that every plot, of any subset
#: of variants, draws a variant alike.
_VARIANT_COLORS = {"softmax": "tab:blue", "linear": "tab:orange", "angular": "tab:green", "castling": "tab:red",
                   "linear-angular": "tab:purple", "castling-faithful": "tab:brown", "castling-no-aux": "tab:pink",
                   "identity": "tab:gray", "castling-no-dwconv": "tab:olive", "castling-no-norm": "tab:cyan"}
# other (plugin) variants: the light half of tab20, picked by a stable hash of the name
_OTHER_COLORS = ("#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d",
                 "#9edae5")


def variant_color(variant: str) -> str:
    """The colour of ``variant`` in every plot (Pareto, scaling, mask density, bench's own)."""
    return _VARIANT_COLORS.get(variant) or _OTHER_COLORS[zlib.crc32(str(variant).encode()) % len(_OTHER_COLORS)]


_DPI = 110


def _plain_text(function):
    """Run a plotting function with matplotlib's mathtext off: labels and titles are the user's
    text, drawn as written (a label ``$x$`` or ``a$b`` must not be parsed as TeX, nor fail; its
    control characters are escaped with :func:`attnbench.terminal.printable`, as on a terminal)."""
    @functools.wraps(function)
    def plotting(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context({"text.parse_math": False}):
            return function(*args, **kwargs)
    return plotting


def _figure(panels: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5 * panels, 4.2), layout="constrained", dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig, np.atleast_1d(fig.subplots(1, panels))


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI)
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_") or "study"


def _overlaps(box, boxes) -> bool:
    return any(box.overlaps(other) for other in boxes)


_RADII = (9, 16, 24, 34, 46, 60, 76, 94, 114, 136, 160, 190, 220)           # points from the marker
_ANGLES = np.deg2rad([0, 180, 90, 270, 30, 150, 210, 330, 60, 120, 240, 300])  # right, left, up, down first


def _place_labels(fig, ax, points: list[tuple[float, float, str]]) -> None:
    """Annotate each (x, y, text) so that no two label boxes overlap, nor a label and a marker.

    Deterministic: labels go in the order given, each to the first free spot on rings of growing
    radius around its point, inside the axes if any spot there is free; a label away from its
    point gets a leader line. Extents come from the Agg renderer at the figure's final layout
    (settled, then frozen, first).
    """
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    fig.draw_without_rendering()
    fig.set_layout_engine("none")
    renderer = fig.canvas.get_renderer()
    scale = fig.dpi / 72.0                # points -> display pixels
    area = ax.get_window_extent(renderer)
    marker = 4 * scale
    taken = [Bbox.from_extents(x - marker, y - marker, x + marker, y + marker)
             for x, y in ax.transData.transform([(px, py) for px, py, _ in points]).reshape(-1, 2)]
    spots = [(r * np.cos(a), r * np.sin(a)) for r in _RADII for a in _ANGLES]
    for x, y, text in points:
        probe = ax.annotate(text, (x, y), xytext=spots[0], textcoords="offset points", fontsize=8, va="center")

        def box_at(dx: float, dy: float):
            probe.xyann = (dx, dy)
            # the box's near edge at the spot, so the label reads from beside its point
            probe.set_ha("left" if dx > 1 else "right" if dx < -1 else "center")
            probe.update_positions(renderer)
            return Text.get_window_extent(probe, renderer).padded(1.5 * scale)

        def free(inside: bool):
            for dx, dy in spots:
                box = box_at(dx, dy)
                if (not inside or (area.x0 <= box.x0 and box.x1 <= area.x1 and area.y0 <= box.y0
                                   and box.y1 <= area.y1)) and not any(box.overlaps(t) for t in taken):
                    return dx, dy, box
            return None

        dx, dy, box = free(inside=True) or free(inside=False) or (*spots[0], box_at(*spots[0]))
        ha = probe.get_ha()
        probe.remove()
        leader = dict(arrowstyle="-", color="0.5", lw=0.6, shrinkA=0, shrinkB=4) if np.hypot(dx, dy) > 12 else None
        label = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=8, va="center",
                            ha=ha, arrowprops=leader, annotation_clip=False)
        label.set_in_layout(False)
        taken.append(box)


@_plain_text
def pareto_figure(summary: pd.DataFrame):
    """The Pareto figure of one study (a matplotlib Figure), or None when there is nothing to plot.

    Top-1 (mean, bars = std over seeds) against MACs and against latency, a point per
    configuration coloured by its variant, the front drawn through; configurations with no
    complete seed (or no cost measured) are named in a note.
    """
    panels = [(c, label, title, front) for c, label, title, front in (
        (_MACS, "MACs per image (inference form)", "top-1 vs MACs", "pareto_macs"),
        (_LATENCY, "latency, ms (median)", "top-1 vs latency", "pareto_latency"))
        if c in summary and summary[c].notna().any()]
    rows = summary[summary["top1"].notna()]
    if rows.empty or not panels:
        return None
    fig, axes = _figure(len(panels))
    notes = []
    unseeded = summary.loc[summary["top1"].isna(), "config"].tolist()
    if unseeded:
        notes.append("no complete seed, not plotted: " + ", ".join(map(printable, unseeded)))
    placements = []
    for ax, (cost, label, title, front) in zip(axes, panels):
        data = rows[rows[cost].notna()]
        unmeasured = rows.loc[rows[cost].isna(), "config"].tolist()
        if unmeasured:
            notes.append(f"no {title.split(' vs ')[1]} measured: " + ", ".join(map(printable, unmeasured)))
        for variant, group in data.groupby(_VARIANT, sort=True, dropna=False):
            name = variant if isinstance(variant, str) else "(unknown variant)"
            ax.errorbar(group[cost], group["top1"], yerr=group["top1_std"].fillna(0), fmt="o", capsize=3,
                        color=variant_color(name), label=printable(name), zorder=3)
        best = data[data[front].astype(bool)].sort_values(cost)
        ax.plot(best[cost], best["top1"], "--", color="black", lw=1, label="Pareto front", zorder=2)
        ax.plot(best[cost], best["top1"], "o", mfc="none", mec="black", ms=10, mew=1, zorder=4)
        ax.set(xlabel=label, ylabel="top-1 % (mean ± std over seeds)", title=title)
        ax.grid(True, alpha=0.3)
        # best configurations first: they get the spots nearest their points
        placements.append((ax, [(r[cost], r["top1"], printable(r["config"]))
                                for _, r in data.sort_values("top1", ascending=False).iterrows()]))
    fig.suptitle(f"study '{printable(summary['study'].iloc[0])}'")
    # one legend for the figure, beside the axes: inside it would cover points and labels
    legend = {name: handle for ax in axes for handle, name in zip(*ax.get_legend_handles_labels())}
    fig.legend(legend.values(), legend.keys(), loc="outside right upper", fontsize=8)
    if notes:
        fig.supxlabel("; ".join(notes), fontsize=8, color="0.3")
    for ax, points in placements:
        _place_labels(fig, ax, points)
    return fig


@_plain_text
def pareto_plot(summary: pd.DataFrame, path: Path) -> Optional[Path]:
    """Write :func:`pareto_figure` to ``path``; None when there is nothing to plot."""
    fig = pareto_figure(summary)
    return None if fig is None else _save(fig, path)


@_plain_text
def _plain_number(value: float, _position=None) -> str:
    """A tick label without TeX: 0.5, 12, 3.4k, 1.2M, 5G."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _plain_log_formatter(minor: bool):
    """Log-axis tick labels as plain numbers; minor ticks labelled (at 2 and 5) only where the axis
    spans under two decades, so that labels never crowd."""
    import math

    from matplotlib.ticker import Formatter

    class PlainLog(Formatter):
        def __call__(self, value, pos=None):
            if value <= 0:
                return ""
            if minor:
                low, high = self.axis.get_view_interval()
                mantissa = value / 10 ** math.floor(math.log10(value))
                if high > 100 * max(low, 1e-300) or round(mantissa) not in (2, 5):
                    return ""
            return _plain_number(value)

    return PlainLog()


def scaling_plot(bench: pd.DataFrame, path: Path) -> Optional[Path]:
    """Latency and MACs against tokens (log-log) from benchmark rows, one line per variant and setup;
    latency bars span the fastest to the slowest timing process where the rows say
    (``latency_min_ms``, ``latency_max_ms``). ``attnbench bench`` draws its run with it too."""
    if bench.empty or not {_VARIANT, _TOKENS} <= set(bench.columns):
        return None
    metrics = [(c, label) for c, label in ((_LATENCY, "latency ms per forward (median)"), (_MACS, "MACs per sample"))
               if c in bench and bench[c].notna().any()]
    if not metrics:
        return None
    setup_cols = [c for c in _SETUP if c in bench]
    shown = bench[setup_cols].astype(object).where(bench[setup_cols].notna(), "-").map(str)   # a gap reads "-"
    data = bench.assign(setup=shown.agg(", ".join, axis=1) if setup_cols else "")
    many = data["setup"].nunique() > 1
    fig, axes = _figure(len(metrics))
    for ax, (metric, label) in zip(axes, metrics):
        for (variant, setup), group in data.groupby([_VARIANT, "setup"], sort=True):
            by_tokens = group.groupby(_TOKENS)
            curve = by_tokens[metric].median().dropna()
            if curve.empty:
                continue
            style = dict(color=variant_color(variant), label=printable(f"{variant} ({setup})" if many else variant))
            if metric == _LATENCY and {_LATENCY_MIN, _LATENCY_MAX} <= set(group.columns) \
                    and group[_LATENCY_MIN].notna().all():
                low, high = by_tokens[_LATENCY_MIN].min()[curve.index], by_tokens[_LATENCY_MAX].max()[curve.index]
                ax.errorbar(curve.index, curve.values, yerr=[curve.values - low.values, high.values - curve.values],
                            marker="o", capsize=3, **style)
            else:
                ax.plot(curve.index, curve.values, "o-", **style)
        ax.set(xscale="log", yscale="log", xlabel="tokens N", ylabel=label, title=f"{label} vs tokens")
        ticks = sorted(data[_TOKENS].dropna().unique())
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter("")
        # plain numbers: the log formatter's default labels are TeX, which plain-text mode shows raw
        ax.yaxis.set_major_formatter(_plain_log_formatter(minor=False))
        ax.yaxis.set_minor_formatter(_plain_log_formatter(minor=True))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    if not many and setup_cols:
        fig.suptitle(printable(", ".join(f"{c} {v}" for c, v in zip(setup_cols, shown.iloc[0]) if v != "-")),
                     fontsize=9)
    return _save(fig, path)


def mask_curves(trials: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """Mask density and branch ratio over training, mean over layers and complete seeds.

    Returns:
        Columns ``study, config, variant, progress, mask_density, branch_ratio``; empty when no
        row has a ``mask_density_curve``.
    """
    columns = ["study", "config", "variant", "progress", "mask_density", "branch_ratio"]
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
        records += [{"study": row.study, "config": names[key], "variant": row.variant, **p} for p in points
                    if isinstance(p, dict)]
    frame = pd.DataFrame(records)
    if frame.empty or "progress" not in frame:
        return pd.DataFrame(columns=columns)
    for column in ("mask_density", "branch_ratio"):
        frame[column] = pd.to_numeric(frame.get(column), errors="coerce")
    return frame.groupby(["study", "config", "variant", "progress"], as_index=False, dropna=False)[
        ["mask_density", "branch_ratio"]].mean()


@_plain_text
def mask_density_plot(curves: pd.DataFrame, path: Path) -> Optional[Path]:
    """Mask density (and branch ratio, where recorded) against training progress, one line per config."""
    metrics = [c for c in ("mask_density", "branch_ratio") if c in curves and curves[c].notna().any()]
    if curves.empty or not metrics:
        return None
    fig, axes = _figure(len(metrics))
    styles = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (8, 3)))
    for ax, metric in zip(axes, metrics):
        seen: dict[str, int] = {}   # variant -> configurations drawn: their line styles tell them apart
        for (config, variant), group in curves.groupby(["config", "variant"], sort=False, dropna=False):
            line = group.dropna(subset=[metric]).sort_values("progress")
            name = variant if isinstance(variant, str) else ""
            style = styles[seen.get(name, 0) % len(styles)]
            seen[name] = seen.get(name, 0) + 1
            ax.plot(line["progress"], line[metric], linestyle=style, color=variant_color(name), label=printable(config))
        ax.set(xlabel="training progress", ylabel=f"{metric.replace('_', ' ')} (mean over layers, seeds)",
               title=f"{metric.replace('_', ' ')} over training")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"study '{printable(curves['study'].iloc[0])}'")
    return _save(fig, path)


_STYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (8, 3)))


@_plain_text
def recovery_plot(trials: pd.DataFrame, summary: pd.DataFrame, path: Path) -> Optional[Path]:
    """A conversion study's recovery: validation top-1 against updates (attention transfer, then
    fine-tuning), one line per configuration (mean over seeds, band: ± one std), coloured by variant
    (line styles tell apart configurations of one variant), the teacher's validation top-1 as a
    line; None when the study has no recovery curve."""
    if trials.empty:
        return None
    curves = conversion.recovery_curves(prepare_trials(trials), summary, KEYS)
    if not curves:
        return None
    fig, (ax,) = _figure(1)
    fig.set_size_inches(7.5, 4.8)
    seen: dict[str, int] = {}
    for curve in sorted(curves, key=lambda c: -c["mean"][-1]):   # the legend lists the best first
        name = curve["variant"] if isinstance(curve["variant"], str) else ""
        style = _STYLES[seen.get(name, 0) % len(_STYLES)]
        seen[name] = seen.get(name, 0) + 1
        color = variant_color(name)
        ax.plot(curve["steps"], curve["mean"], linestyle=style, color=color, marker="o", ms=2.5,
                label=f"{printable(str(curve['config']))} (n={curve['n']})")
        if curve["n"] > 1:
            ax.fill_between(curve["steps"], curve["mean"] - curve["std"], curve["mean"] + curve["std"], color=color,
                            alpha=0.15, lw=0)
    teacher = float(np.nanmean([c["teacher_val"] for c in curves]))
    ax.axhline(teacher, color="black", lw=1.2, label=f"teacher ({teacher:.2f}%)")
    ax.axhline(teacher - conversion.WITHIN, color="black", lw=0.6, ls=":",
               label=f"teacher - {conversion.WITHIN:g} pt")
    transfer = next((c["transfer_steps"] for c in curves if c["transfer_steps"]), None)
    if transfer:
        ax.axvline(transfer, color="0.4", lw=0.8, ls="--")
        ax.text(transfer, 0.02, " fine-tuning ->", transform=ax.get_xaxis_transform(), fontsize=8, color="0.3")
        ax.text(transfer, 0.02, "<- transfer ", transform=ax.get_xaxis_transform(), fontsize=8, color="0.3",
                ha="right")
    ax.set(xlabel="updates (attention transfer, then fine-tuning)",
           ylabel="validation top-1 % (inference form; mean ± std over seeds)",
           title=f"recovery after conversion: study '{printable(str(summary['study'].iloc[0]))}'")
    ax.grid(True, alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=8)
    return _save(fig, path)


@_plain_text
def learning_curves_plot(trials: pd.DataFrame, summary: pd.DataFrame, path: Path) -> Optional[Path]:
    """A study's (or one point's) learning curves: validation top-1 and training loss against the
    epoch, one line per configuration (mean over seeds, band: ± one std), coloured by variant (line
    styles tell apart configurations of one variant); a configuration with a seed still improving at
    its last epoch is marked in the legend. None when no row has curves."""
    if trials.empty or summary.empty:
        return None
    found = learning.learning_curves(prepare_trials(trials), summary, KEYS)
    if not found:
        return None
    fig, axes = _figure(len(learning.CURVES))
    fig.set_size_inches(11, 4.6)
    seen: dict[str, int] = {}
    for curve in sorted(found, key=lambda c: -c[next(iter(learning.CURVES))][0][-1]):   # best first
        name = curve["variant"] if isinstance(curve["variant"], str) else ""
        style = _STYLES[seen.get(name, 0) % len(_STYLES)]
        seen[name] = seen.get(name, 0) + 1
        color = variant_color(name)
        epochs = np.arange(1, curve["epochs"] + 1)
        mark = f" {IMPROVING_MARK} {curve['improving']}/{curve['n']}" if curve["improving"] else ""
        for ax, column in zip(axes, learning.CURVES):
            mean, std = (values[:curve["epochs"]] for values in curve[column])
            ax.plot(epochs, mean, linestyle=style, color=color, marker="o", ms=2.5,
                    label=f"{printable(str(curve['config']))} (n={curve['n']}){mark}" if ax is axes[0] else None)
            if curve["n"] > 1:
                ax.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.15, lw=0)
    from matplotlib.ticker import MaxNLocator

    for ax, (column, label) in zip(axes, learning.CURVES.items()):
        ax.set(xlabel="epoch", ylabel=f"{label}; mean ± std over seeds")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))   # epochs are whole
        ax.grid(True, alpha=0.3)
    point = next((p for p in summary.get("point", []) if isinstance(p, str)), None)
    fig.suptitle(f"learning curves: study '{printable(str(summary['study'].iloc[0]))}'"
                 + (f" at point '{printable(point)}'" if point else ""), fontsize=10)
    fig.legend(loc="outside right upper", fontsize=8, title_fontsize=8,
               title=f"{IMPROVING_MARK} k/n: still improving at\nthe last epoch on k of n seeds"
               if any(c["improving"] for c in found) else None)
    return _save(fig, path)


def _parts(summary: pd.DataFrame, trials: pd.DataFrame, study: str):
    """A study's summary and trial rows, point by point where it ran ``across`` points: (suffix,
    summary rows, trial rows); the suffix names the point in the plot's file name."""
    rows = summary[summary["study"] == study]
    mine = trials[trials["study"] == study] if "study" in trials else trials
    points = [p for p in dict.fromkeys(rows.get("point", pd.Series(dtype=object))) if isinstance(p, str)]
    if not points:
        yield "", rows, mine
        return
    for point in points:
        yield f"-{_slug(point)}", rows[rows["point"] == point], mine[mine["point"] == point]


@_plain_text
def write_plots(summary: pd.DataFrame, trials: pd.DataFrame, bench: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Every plot the data allows, under ``out_dir``: per study ``pareto-<study>.png``,
    ``curves-<study>.png`` (learning curves) and ``mask-density-<study>.png`` (per point of a study
    run ``across`` points: ``pareto-<study>-<point>.png``, ...), ``recovery-<study>.png``
    (conversion studies), and ``scaling.png`` from benchmark rows. Returns the paths written."""
    out_dir = Path(out_dir)
    paths = [scaling_plot(bench, out_dir / "scaling.png")]
    if summary.empty:
        return [p for p in paths if p is not None]
    for study in dict.fromkeys(summary["study"]):
        for suffix, rows, mine in _parts(summary, trials, study):
            name = f"{_slug(study)}{suffix}.png"
            paths.append(pareto_plot(rows, out_dir / f"pareto-{name}"))
            paths.append(learning_curves_plot(mine, rows, out_dir / f"curves-{name}"))
            paths.append(mask_density_plot(mask_curves(mine, rows), out_dir / f"mask-density-{name}"))
        paths.append(recovery_plot(trials[trials["study"] == study] if "study" in trials else trials,
                                   summary[summary["study"] == study], out_dir / f"recovery-{_slug(study)}.png"))
    return [p for p in paths if p is not None]
