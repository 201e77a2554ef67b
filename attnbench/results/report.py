"""Tables of a result store: one row per configuration, compared with a baseline.

The data side lives in :mod:`attnbench.results.summary` (:func:`load_results`, :func:`summarize`,
:func:`select`, re-exported here, the report's front door); this module turns a summary into
text: :func:`rich_tables` for the terminal, :func:`export` (csv, markdown, json) and
:func:`html_page`. Plots live in :mod:`attnbench.results.plots`.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import pandas as pd

from attnbench.results import across, conversion, schema, stats
from attnbench.results.summary import (BASELINE, DERIVED, KEYS, ReportError, Results, apply_filter,
                                       baseline_warnings, check_columns, consistency_warnings, load_results,
                                       load_store, pareto_front, prepare_trials, select, summarize)
from attnbench.terminal import IMPROVING_MARK, printable

__all__ = ["ReportError", "BASELINE", "KEYS", "DEFAULT_COLUMNS", "TABLE_PRIORITY", "FORMATS", "Results",
           "load_results", "load_store", "prepare_trials", "summarize", "baseline_warnings", "consistency_warnings",
           "pareto_front", "select", "apply_filter", "check_columns", "check_view_columns", "rich_tables", "export",
           "html_page"]

FORMATS = ("table", "csv", "markdown", "json")
#: Columns of the table, markdown and HTML views unless ``--columns`` says otherwise, in display
#: order. ``delta_ci`` is a view of ``delta_ci_low`` and ``delta_ci_high`` (see _COMPOSITES).
DEFAULT_COLUMNS = ("config", "n", *schema.names("top1"), "delta_top1", "beyond_noise", "delta_ci", "p_holm",
                   "prob_improvement", "test", "min_detectable", *schema.names("top1_train_form", "switch_cost",
                                                                                 "macs"),
                   "macs_reduction_pct", *schema.names("params", "latency_median_ms", "forward_memory_mb"),
                   "pareto", "failed", "pruned")
#: Which columns the terminal table keeps first when the width does not hold them all: the
#: configuration, its top-1 and the verdict against the baseline, then costs, then details.
TABLE_PRIORITY = ("config", "n", "top1", "delta_top1", "beyond_noise", "delta_ci", "p_holm", "prob_improvement",
                  "macs", "macs_reduction_pct", "latency_median_ms", "pareto", "top1_train_form", "switch_cost",
                  "failed", "pruned", "test", "min_detectable", "params", "forward_memory_mb")


# ------------------------------------------------------------------------------- rendering

def _fmt_count(value) -> str:
    if value is None or pd.isna(value):
        return "-"
    for scale, unit in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:g}"


def _fmt(value, spec: str = ".2f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return "-"
    return format(value, spec) if isinstance(value, (int, float, np.number)) and not isinstance(value, bool) \
        else str(value)


def _top1(row) -> str:
    return "-" if pd.isna(row["top1"]) else _fmt(row["top1"]) + (
        f" ± {row['top1_std']:.2f}" if row["n"] > 1 else "") + (f" {IMPROVING_MARK}" if _improving(row) else "")


def _improving(row) -> bool:
    """Whether some seed of the configuration was still improving when its training ended."""
    return bool(row.get("improving_seeds", 0) or 0)


def _improving_note(frame: pd.DataFrame) -> str:
    """The footer's word on configurations that had not peaked: which, and on how many seeds."""
    rows = [r for _, r in frame.iterrows() if _improving(r)]
    if not rows:
        return ""
    which = ", ".join(f"{r['config']} {int(r['improving_seeds'])} of {int(r['curve_seeds'])}" for r in rows)
    return (f"{IMPROVING_MARK}: still improving: the best checkpoint (highest validation top-1) was the last epoch "
            f"on some seeds ({which}); a longer training may change this figure and the comparisons with it.")


def _ci(row) -> str:
    if pd.isna(row["delta_ci_low"]):
        return "-"
    return f"[{row['delta_ci_low']:+.2f}, {row['delta_ci_high']:+.2f}]"


#: column -> (header, cell formatter); other columns print as they are. A header's line breaks
#: are kept in the terminal table (narrow columns) and become spaces in Markdown and HTML.
_VIEWS: dict[str, tuple[str, Callable]] = {
    "config": ("configuration", lambda r: str(r["config"])),
    "n": ("n", lambda r: str(r["n"])),
    "top1": ("top-1 %", _top1),
    "top1_train_form": ("pre-castle\n%", lambda r: _fmt(r["top1_train_form"])),
    "switch_cost": ("switch\ncost", lambda r: _fmt(r["switch_cost"], "+.2f")),
    "delta_top1": ("Δ vs\nbase", lambda r: _fmt(r["delta_top1"], "+.2f")),
    "beyond_noise": ("beyond\nnoise", lambda r: str(r["beyond_noise"])),
    "delta_ci": (f"{stats.CONFIDENCE:.0%} CI\nof Δ", _ci),
    "p_holm": ("p\n(Holm)", lambda r: _fmt(r["p_holm"], ".2g")),
    "prob_improvement": ("P(better)", lambda r: _fmt(r["prob_improvement"], ".2f")),
    "test": ("test", lambda r: {"welch": "Welch"}.get(r["test"], _fmt(r["test"]))),
    "min_detectable": ("MDE", lambda r: _fmt(r["min_detectable"], ".2f")),
    "macs": ("MACs", lambda r: _fmt_count(r["macs"])),
    "attention_macs": ("attention\nMACs", lambda r: _fmt_count(r["attention_macs"])),
    "macs_reduction_pct": ("MACs\nsaved %", lambda r: _fmt(r["macs_reduction_pct"], ".1f")),
    "params": ("params", lambda r: _fmt_count(r["params"])),
    "latency_median_ms": ("latency\nms", lambda r: _fmt(r["latency_median_ms"], ".3g")),
    "forward_memory_mb": ("mem\nMiB", lambda r: _fmt(r["forward_memory_mb"], ".1f")),
    "pareto": ("Pareto", lambda r: r["pareto"] or ""),
}
#: Views of several summary columns: the name --columns takes -> the columns csv/json export.
_COMPOSITES = {"delta_ci": ("delta_ci_low", "delta_ci_high")}
schema.names(*(set(_VIEWS) - set(DERIVED) - set(_COMPOSITES)))
_VIEWS.update(conversion.VIEWS)


def _columns_of(rows: pd.DataFrame, columns: Sequence[str]) -> Sequence[str]:
    """The columns a study's table shows: a conversion study's own unless ``--columns`` chose."""
    return conversion.COLUMNS if tuple(columns) == DEFAULT_COLUMNS and conversion.is_conversion(rows) else columns


def _cells(frame: pd.DataFrame, columns: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    views = [_VIEWS.get(c, (c, lambda r, c=c: _fmt(r[c], "g"))) for c in columns]
    return [h for h, _ in views], [[fmt(row) for _, fmt in views] for _, row in frame.iterrows()]


def _one_line(header: str) -> str:
    return header.replace("\n", " ")


def _title(frame: pd.DataFrame, study: str) -> str:
    first = frame.iloc[0]
    setup = " on ".join(str(first[c]) for c in ("arch", "dataset") if first.get(c) is not None)
    point = f" at point '{first['point']}'" if isinstance(first.get("point"), str) else ""
    return f"study '{study}'{point}" + (f" ({setup})" if setup else "")


def _legend(frame: pd.DataFrame, columns: Sequence[str]) -> str:
    """What the shown columns mean, in one paragraph; statistics only where the rows have them."""
    if conversion.is_conversion(frame):   # its own words for top-1 and Δ; the statistics as below
        own = conversion.legend(frame, columns)
        return f"{own} {_legend_notes(frame, [c for c in columns if c not in ('top1', 'delta_top1')])}".strip()
    return f"{_legend_notes(frame, columns)} {_tuning_note(frame)}".strip()


def _tuning_note(frame: pd.DataFrame) -> str:
    """The footer's word on a study whose configurations were tuned: what each chose, on how many trainings."""
    if "tuned_lr" not in frame or not frame["tuned_lr"].notna().any():
        return ""
    tuned = frame[frame["tuned_lr"].notna()]
    counts = {len(json.loads(t)) for t in tuned["tuning_trials"] if isinstance(t, str)}
    chosen = "; ".join(f"{r['config']} lr {r['tuned_lr']:.3g}" + (
        f", wd {r['tuned_weight_decay']:.3g}" if pd.notna(r.get("tuned_weight_decay")) else "")
        for _, r in tuned.iterrows())
    seed = next(iter(tuned["tuning_seed"].dropna()), None)
    return (f"Tuned: each configuration's recipe was chosen by {'/'.join(map(str, sorted(counts)))} trainings on the "
            f"validation split (seed {seed}; the test split unseen), then its seeds ran at the chosen value: {chosen}.")


def _legend_notes(frame: pd.DataFrame, columns: Sequence[str]) -> str:
    baseline = next(iter(frame["baseline"].dropna()), "")
    checkpoint = next(iter(frame["checkpoint"].dropna()), None)
    has = lambda column: frame[column].notna().any()  # noqa: E731
    notes = {
        "top1": ("top-1: test %, inference form (after castling)" + (f", {checkpoint} checkpoint" if checkpoint else "")
                 + "; mean ± sample std over n complete seeds (failed and pruned seeds not averaged in). "
                 + _improving_note(frame)).strip(),
        "top1_train_form": "pre-castle: the training form's top-1.",
        "switch_cost": "switch cost: pre-castle minus top-1, points.",
        "delta_top1": f"Δ vs base: top-1 minus baseline '{baseline}'." if baseline else "No baseline in this study.",
        "macs": "MACs: per image, inference form.",
        "macs_reduction_pct": "MACs saved: against the baseline.",
        "forward_memory_mb": "mem: peak memory rise of one inference forward (measure batch).",
        "pareto": "Pareto (MACs / lat = latency): no other configuration has >= top-1 and <= cost, one strict.",
    }
    if baseline:
        notes |= {
            "beyond_noise": f"beyond noise: p (Holm) < {stats.ALPHA:g}.",
            "p_holm": "p (Holm): the test's two-sided p after Holm's correction over the study's comparisons "
                      "with the baseline.",
            "delta_ci": f"{stats.CONFIDENCE:.0%} CI of Δ: t-interval of the difference, from the same test as p."
                        if has("delta_ci_low") else "",
            "prob_improvement": "P(better): share of seed pairs where the configuration beats the baseline "
                                "(ties half)." if has("prob_improvement") else "",
            "min_detectable": f"MDE (under {stats.FEW_SEEDS} seeds): the smallest difference the test detects at "
                              f"alpha {stats.ALPHA:g} with power {stats.POWER:g}, from the observed spread "
                              f"(noncentral t)." if has("min_detectable") else "",
        }
        tests = set(frame["test"].dropna())
        used = [text for test, text in (("paired", "paired t-test on the seeds both ran (same seed, same split "
                                                  "and order)"), ("welch", "Welch's t-test where the seeds differ"))
                if test in tests]
        # which tests ran is said once, after the first shown column that depends on it
        first = next((c for c in columns if c in ("beyond_noise", "p_holm", "test")), None)
        if first and used:
            notes[first] = (notes.get(first, "") + " Tests: " + "; ".join(used) + ".").strip()
    return " ".join(notes[c] for c in columns if notes.get(c))


def _studies(frame: pd.DataFrame):
    if frame.empty:
        return
    for study in dict.fromkeys(frame["study"]):
        rows = frame[frame["study"] == study]
        if "point_index" not in rows:
            yield study, rows
            continue
        for index in sorted(set(rows["point_index"])):   # a study 'across' points: a table per point
            yield study, rows[rows["point_index"] == index]


def _omitted_note(omitted: list[str], width: int) -> str:
    return (f"Left out to fit {width} columns: {', '.join(omitted)}. Show them with --columns (e.g. --columns "
            f"config,top1,{omitted[0]}), all with --wide, or every stored value with --format csv or json.")


def rich_tables(frame: pd.DataFrame, columns: Sequence[str] = DEFAULT_COLUMNS, wide: bool = False,
                priority: Optional[Sequence[str]] = None) -> list:
    """One Rich renderable per study: a table of the ``columns`` that fit the console, its legend
    and a line naming the columns left out.

    Args:
        columns: in display order.
        wide: show every column, whatever the width (Rich then wraps cells).
        priority: which columns to keep first (default: :data:`TABLE_PRIORITY` for the default
            columns, else ``columns`` as given).
    """
    from attnbench.fitted_table import FittedColumn, FittedTable

    if priority is None:
        priority = TABLE_PRIORITY if tuple(columns) == DEFAULT_COLUMNS else columns
    tables, asked = [], columns
    for study, rows in _studies(frame):
        columns = _columns_of(rows, asked)
        order = conversion.PRIORITY if columns is conversion.COLUMNS else priority
        headers, body = _cells(rows, columns)
        # Labels, options and studies are the user's text: FittedTable shows them as plain Text.
        fitted = [FittedColumn(name, header, [cells[i] for cells in body], "left" if name == "config" else "right")
                  for i, (name, header) in enumerate(zip(columns, headers))]
        tables.append(FittedTable(fitted, title=_title(rows, study), priority=order, wide=wide,
                                  legend=lambda shown, rows=rows: _legend(rows, shown), omitted_note=_omitted_note))
    if across.has_points(frame):   # then, per study run across points, where each comparison holds
        tables += across.rich_tables(frame)
    return tables


def _markdown(frame: pd.DataFrame, columns: Sequence[str]) -> str:
    parts, asked = [], columns
    for study, rows in _studies(frame):
        columns = _columns_of(rows, asked)
        headers, body = _cells(rows, columns)
        line = lambda cells: "| " + " | ".join(map(_markdown_cell, cells)) + " |"  # noqa: E731
        parts += [f"**{_markdown_cell(_title(rows, study))}**", "", line(map(_one_line, headers)),
                  "|" + "|".join("---" if c == "config" else "---:" for c in columns) + "|",
                  *(line(cells) for cells in body), "", _markdown_prose(_legend(rows, columns)), ""]
    if across.has_points(frame):
        parts.append(across.markdown(frame, _markdown_cell, _markdown_prose))
    return "\n".join(parts)


def _markdown_cell(text: str) -> str:
    """User text in a Markdown table cell: HTML escaped (a label ``<script>`` stays text), ``|``
    escaped (it would end the cell), line breaks and other control characters as escapes."""
    return printable(html.escape(text, quote=False)).replace("|", "\\|").replace("*", "\\*")


def _markdown_prose(text: str) -> str:
    """The legend below a Markdown table: our prose ("p < 0.05" stays as it reads), with a label
    quoted in it unable to open an HTML tag."""
    return re.sub(r"<(?=[A-Za-z/!?])", "&lt;", printable(text))


def _stored(columns: Sequence[str]) -> list[str]:
    """``columns`` with each view of several columns replaced by those columns."""
    return [name for column in columns for name in _COMPOSITES.get(column, (column,))]


def export(frame: pd.DataFrame, fmt: str, columns: Optional[Sequence[str]] = None) -> str:
    """``frame`` as ``csv`` or ``json`` (raw values; all columns by default) or ``markdown`` (formatted)."""
    if fmt == "markdown":
        return _markdown(frame, columns or DEFAULT_COLUMNS)
    data = frame[_stored(columns)] if columns else frame
    if fmt == "csv":
        return data.to_csv(index=False)
    if fmt == "json":
        return data.to_json(orient="records", indent=2) + "\n"
    raise ReportError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")


def html_page(frame: pd.DataFrame, columns: Sequence[str], images: Sequence[Path] = ()) -> str:
    """One self-contained HTML page: a table per study and the PNG ``images`` embedded (base64)."""
    out = io.StringIO()
    out.write("<!doctype html><meta charset='utf-8'><title>attnbench report</title><style>"
              "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
              "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
              "td:first-child{text-align:left}img{max-width:100%}</style><h1>attnbench report</h1>")
    asked = columns
    for study, rows in _studies(frame):
        columns = _columns_of(rows, asked)
        headers, body = _cells(rows, columns)
        out.write(f"<h2>{html.escape(_title(rows, study))}</h2><table><tr>"
                  + "".join(f"<th>{html.escape(_one_line(h))}</th>" for h in headers) + "</tr>")
        for cells in body:
            out.write("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
        out.write(f"</table><p>{html.escape(_legend(rows, columns))}</p>")
    for image in images:
        data = base64.b64encode(Path(image).read_bytes()).decode()
        out.write(f"<h2>{html.escape(Path(image).stem)}</h2><img alt='{html.escape(Path(image).name)}' "
                  f"src='data:image/png;base64,{data}'>")
    return out.getvalue()


def check_view_columns(frame: pd.DataFrame, names: Iterable[str]) -> list[str]:
    """``names`` for ``--columns``: summary columns or views of several (``delta_ci``)."""
    return check_columns(frame, names, "--columns", _COMPOSITES)
