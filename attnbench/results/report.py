"""Tables of a result store: one row per configuration, compared with a baseline.

The data side (:func:`load_results`, :func:`summarize`, :func:`select`) returns plain
DataFrames; the rendering side (:func:`rich_tables`, :func:`export`, :func:`html_page`) turns
a summary into text. Plots live in :mod:`attnbench.results.plots`.

A configuration is one (study, label, options): a swept option makes several configurations
of one label. Per configuration, over its complete seeds (failed and pruned rows are counted,
never averaged in): top-1 mean and sample std (n shown), top-1 before castling, switch cost,
the difference from the study's baseline with the statistics of :mod:`attnbench.results.stats`
(paired or Welch's test, Holm's correction, the test's t-interval), MACs and the reduction against
the baseline, parameters, latency and memory, and Pareto marks.
"""
from __future__ import annotations

import ast
import base64
import html
import io
import json
import math
import re
import typing
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import pandas as pd

from attnbench.results import across, conversion, schema, stats, store
from attnbench.suggest import did_you_mean
from attnbench.terminal import IMPROVING_MARK, printable

__all__ = ["ReportError", "BASELINE", "DEFAULT_COLUMNS", "TABLE_PRIORITY", "FORMATS", "Results", "load_results",
           "load_store", "prepare_trials", "summarize", "baseline_warnings", "consistency_warnings", "pareto_front",
           "select", "apply_filter",
           "check_columns", "check_view_columns", "rich_tables", "export", "html_page"]

BASELINE = schema.BASELINE   #: default baseline label (used when a study has it)
KEYS = list(schema.names("study", "label", "options"))
FORMATS = ("table", "csv", "markdown", "json")
# Stored columns are named through the schema (a renamed column fails at import); the summary's
# own columns are listed in _DERIVED.
_DERIVED = ("config", "n", "failed", "pruned", "top1_std", "improving_seeds", "curve_seeds", "baseline", "delta_top1", *stats.COLUMNS,
            "macs_reduction_pct", "pareto_macs", "pareto_latency", "pareto")
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
_MEANS = schema.names("top1_train_form", "switch_cost", "best_val_top1", "mask_density_end", "branch_ratio_end",
                      "wall_time_s")
_MEDIANS = schema.names("macs", "attention_macs", "params", "num_tokens", "latency_median_ms", "latency_iqr_ms",
                        "samples_per_s", "forward_memory_mb")
_FIRSTS = schema.names("variant", "arch", "dataset", "checkpoint", "tuned_lr", "tuned_weight_decay", "tuning_seed",
                       "tuning_trials")
_IMPROVING = schema.names("still_improving")[0]
_OPTION_PREFIX = "opt_"   # summary columns spread from the stored options JSON


class ReportError(ValueError):
    """Results that cannot be reported, or a bad request (unknown column, study, filter)."""


# ------------------------------------------------------------------------------------ data

class Results(typing.NamedTuple):
    """The rows of a result store, by kind, and the files that could not be read."""

    trials: pd.DataFrame
    bench: pd.DataFrame
    skipped: list


def load_store(results: str | Path, strict: bool = False,
               on_skip: Optional[Callable[[store.SkippedFile], None]] = None) -> Results:
    """The trial rows and benchmark rows under ``results``, and the files skipped.

    Args:
        strict: fail on an unreadable, foreign or other-version file instead of skipping it.
        on_skip: called with each skipped file, before any error is raised.

    Raises:
        ReportError: a missing folder, no rows at all, or (``strict``) a file that cannot be read.
    """
    root = Path(results)
    if not root.is_dir():
        raise ReportError(f"results folder '{root}' does not exist (give one with --results DIR)")
    try:
        contents = store.read_store(root, strict=strict)
    except store.StoreError as err:
        raise ReportError(str(err)) from None
    rows = contents.rows
    for skipped in contents.skipped if on_skip else ():
        on_skip(skipped)
    if rows.empty:
        skipped = f" ({len(contents.skipped)} unreadable file(s) skipped)" if contents.skipped else ""
        raise ReportError(f"no result rows under '{root}'{skipped}: run `attnbench sweep EXPERIMENT.yaml` or "
                          f"`attnbench bench` first")
    pick = lambda kind: rows[rows["kind"] == kind].dropna(axis=1, how="all").reset_index(drop=True)  # noqa: E731
    return Results(pick(schema.TRIAL), pick(schema.BENCHMARK), contents.skipped)


def load_results(results: str | Path, strict: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The trial rows and benchmark rows under ``results`` (see :func:`load_store`)."""
    loaded = load_store(results, strict)
    return loaded.trials, loaded.bench


def summarize(trials: pd.DataFrame, baseline: Optional[str] = None) -> pd.DataFrame:
    """One row per (study, label, options), sorted by study then top-1 (best first).

    Args:
        trials: trial rows (``kind == "trial"``), one per (trial, seed).
        baseline: label (or config name) to compare with; default ``"softmax"`` where present.

    Returns:
        Columns ``study, label, config, variant, options, n, failed, pruned, top1, top1_std,
        top1_train_form, switch_cost, baseline, delta_top1, macs, macs_reduction_pct, params,
        latency_median_ms, forward_memory_mb, pareto_macs, pareto_latency, pareto``, the comparison
        with the baseline (:data:`attnbench.results.stats.COLUMNS`: ``test, n_pairs,
        delta_tested, p_raw, p_welch, p_holm, delta_ci_low, delta_ci_high, prob_improvement,
        min_detectable, beyond_noise, comparison_note``; Holm's family is the study) and more
        (means/medians of other measured columns, ``opt_*``). ``delta_top1`` compares the
        means over all complete seeds; ``delta_tested`` is the difference the test and interval
        are about (over the shared seeds when paired: the same unless seeds were left out).

    Raises:
        ReportError: no trial rows, or an explicit ``baseline`` that no study has.
    """
    if trials.empty:
        raise ReportError("no trial rows to summarize (run `attnbench sweep EXPERIMENT.yaml` first)")
    t = prepare_trials(trials)
    if baseline and not (t["label"] == baseline).any():   # it may name a configuration (label and options)
        names = set(_summarize(t, None)["config"]) | set(t["label"])
        if baseline not in names:
            raise ReportError(f"--baseline '{baseline}' is not a configuration in these results"
                              f"{did_you_mean(baseline, names)}")
    # A study run 'across' named points is summarised point by point: every comparison, interval,
    # Holm family and Pareto front is within one point (attnbench.results.across compares points).
    parts = [_summarize(rows, baseline).assign(point=point, point_index=index)
             for (index, point), rows in t.groupby(["point_index", "point"], sort=True, dropna=False)]
    summary = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
    return summary.sort_values(["study", "point_index", "top1"], ascending=[True, True, False],
                               na_position="last", kind="stable").reset_index(drop=True)


def _summarize(t: pd.DataFrame, baseline: Optional[str]) -> pd.DataFrame:
    """:func:`summarize` of prepared rows of one point (or of studies without ``across``)."""
    groups = list(t.groupby(KEYS, sort=False))
    summary = pd.DataFrame([_config_row(key, group) for key, group in groups])
    summary.insert(2, "config", _config_names(summary))
    seeds = [dict(zip(done["seed"], pd.to_numeric(done["top1"], errors="coerce")))
             for done in (_complete(group) for _, group in groups)]
    summary = _compare(summary, seeds, baseline)
    summary = conversion.compare_to_teacher(summary, t, KEYS)   # conversion studies: against their teacher
    return _mark_pareto(summary)


def prepare_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """A copy of the trial rows with the columns the summary reads, keys and status filled in."""
    t = trials.copy()
    for column in (*schema.names("study", "label", "variant", "seed", "status", "top1"), *_MEANS, *_MEDIANS,
                   *_FIRSTS, _IMPROVING):
        if column not in t:
            t[column] = pd.NA
    t["study"] = t["study"].fillna("(no study)")
    t["label"] = t["label"].fillna(t["variant"]).fillna("(no label)")
    t["options"] = t["options"].fillna("{}") if "options" in t else "{}"
    t["status"] = t["status"].fillna("complete")
    t["point"] = t["point"].astype(object).where(t["point"].notna(), None) if "point" in t else None
    t["point_index"] = pd.to_numeric(t["point_index"], errors="coerce").fillna(-1).astype(int) \
        if "point_index" in t else -1
    options = [_options(text) for text in t["options"]]
    for name in dict.fromkeys(k for o in options for k in o):
        t[_OPTION_PREFIX + name] = [o.get(name) for o in options]
    return t


def _options(text) -> dict:
    try:
        value = json.loads(text) if isinstance(text, str) else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _complete(group: pd.DataFrame) -> pd.DataFrame:
    """Complete rows, one per seed (a re-run of a seed replaces the earlier row)."""
    return group[group["status"] == "complete"].drop_duplicates("seed", keep="last")


def _num(series: pd.Series, how: str) -> float:
    values = pd.to_numeric(series, errors="coerce").dropna()
    return float(getattr(values, how)()) if len(values) else math.nan


def _config_row(key: tuple, group: pd.DataFrame) -> dict:
    done = _complete(group)
    top1 = pd.to_numeric(done["top1"], errors="coerce").dropna()
    row = dict(zip(KEYS, key))
    row.update({c: next(iter(group[c].dropna()), None) for c in _FIRSTS})
    row.update(n=len(top1), failed=int((group["status"] == "failed").sum()),
               pruned=int((group["status"] == "pruned").sum()),
               top1=float(top1.mean()) if len(top1) else math.nan,
               top1_std=float(top1.std(ddof=1)) if len(top1) > 1 else math.nan,
               # seeds whose best checkpoint was their last epoch, of the seeds that recorded curves
               improving_seeds=int((done[_IMPROVING] == True).sum()),  # noqa: E712 - nullable booleans
               curve_seeds=int(done[_IMPROVING].notna().sum()))
    row.update({c: _num(done[c], "mean") for c in _MEANS})
    row.update({c: _num(group[c], "median") for c in _MEDIANS})
    row.update({c: next(iter(group[c].dropna()), None) for c in group if c.startswith(_OPTION_PREFIX)})
    return row


def _config_names(summary: pd.DataFrame) -> list[str]:
    """The label, plus the options that tell apart configurations sharing it."""
    names = []
    for _, row in summary.iterrows():
        siblings = summary[(summary["study"] == row["study"]) & (summary["label"] == row["label"])]
        if len(siblings) == 1:
            names.append(row["label"])
            continue
        options = [json.loads(o) for o in siblings["options"]]
        own = json.loads(row["options"])
        differing = {k: v for k, v in own.items() if any(o.get(k) != v for o in options)}
        names.append(f"{row['label']} (" + ", ".join(f"{k}={v}" for k, v in sorted(differing.items())) + ")")
    return names


def _baseline_index(summary: pd.DataFrame, study: str, baseline: str) -> Optional[int]:
    rows = summary[(summary["study"] == study) & ((summary["label"] == baseline) | (summary["config"] == baseline))]
    return None if rows.empty else int(rows["n"].idxmax())


def _compare(summary: pd.DataFrame, seeds: list[dict], baseline: Optional[str]) -> pd.DataFrame:
    """``summary`` with the baseline's config, ``delta_top1``, the MACs reduction and, per study,
    :func:`stats.compare_to_baseline` of each row's ``seeds`` (seed -> top-1)."""
    name = baseline or BASELINE   # an unknown --baseline was refused by summarize()
    out = summary.assign(baseline=None, delta_top1=math.nan, macs_reduction_pct=math.nan,
                         **{c: math.nan for c in stats.COLUMNS} | {"test": None, "beyond_noise": "-",
                                                                   "comparison_note": None})
    for study in out["study"].unique():
        base = _baseline_index(out, study, name)
        if base is None:
            continue
        for i in out.index[out["study"] == study]:
            out.at[i, "baseline"] = out.at[base, "config"]
            out.at[i, "delta_top1"] = out.at[i, "top1"] - out.at[base, "top1"]
            out.at[i, "macs_reduction_pct"] = 100.0 * (1 - out.at[i, "macs"] / out.at[base, "macs"])
        rows = out.index[out["study"] == study]
        out.loc[rows, list(stats.COLUMNS)] = stats.compare_to_baseline({i: seeds[i] for i in rows}, base)
    return out


def baseline_warnings(summary: pd.DataFrame) -> list[str]:
    """One line per study whose baseline has no complete seed (all pruned or failed): its
    comparisons are then empty, and the reader must be told why rather than see dashes."""
    out = []
    for study, rows in summary.groupby("study", sort=False):
        named = rows["baseline"].dropna()
        base = rows[rows["config"] == named.iloc[0]] if not named.empty else rows.iloc[:0]
        if not base.empty and int(base["n"].iloc[0]) == 0:
            out.append(f"study '{study}': the baseline '{named.iloc[0]}' has no complete seed "
                       f"({int(base['failed'].iloc[0])} failed, {int(base['pruned'].iloc[0])} pruned), so no "
                       f"configuration is compared with it")
    return out


#: Settings one study's rows must share (train_config: all but the per-seed fields); data options
#: and the architecture may differ between configurations (a swept image size) but not within one.
_SHARED_TRAIN_IGNORED = ("seed", "device")
#: A column that says which named point of a study a row belongs to (rows of different points may
#: differ in any setting on purpose), if the store has one.
_POINT_COLUMNS = ("point",)


def consistency_warnings(trials: pd.DataFrame) -> list[str]:
    """One line per study whose rows ran under different training settings (or, within one
    configuration, different data options or architectures): a study resumed after its file
    changed, or result files copied together. Their comparisons would mix the two without a word."""
    out = []
    if trials.empty or "study" not in trials:
        return out
    points = [c for c in _POINT_COLUMNS if c in trials]
    for keys, rows in trials.groupby(["study", *points], sort=False, dropna=False):
        study = keys[0] if isinstance(keys, tuple) else keys
        found = []
        if "train_config" in rows:
            found += _differing_keys(rows["train_config"], "train", _SHARED_TRAIN_IGNORED)
        for column, field in (("data_options", "data.options"), ("arch", "model.arch")):
            if column in rows and "label" in rows:
                for _, group in rows.groupby("label", sort=False, dropna=False):
                    found += [f for f in (_differing_keys(group[column], field) if column == "data_options"
                                          else [field] if group[column].dropna().nunique() > 1 else [])
                              if f not in found]
        if found:
            out.append(f"study '{study}': its rows ran under different settings ({', '.join(found[:6])}); its "
                       f"configurations are compared across them (resumed after the file changed, or files "
                       f"copied together?)")
    return out


def _differing_keys(column: pd.Series, field: str, ignored: Sequence[str] = ()) -> list[str]:
    """``field.key`` for each key whose value differs between the JSON objects of ``column``."""
    values: dict[str, set] = {}
    for text in column.dropna().unique():
        try:
            parsed = json.loads(text)
        except (TypeError, ValueError):
            continue
        for key, value in (parsed.items() if isinstance(parsed, dict) else ()):
            if key not in ignored:
                values.setdefault(key, set()).add(json.dumps(value, sort_keys=True))
    return [f"{field}.{key}" for key, seen in sorted(values.items()) if len(seen) > 1]


def pareto_front(score: Sequence[float], cost: Sequence[float]) -> np.ndarray:
    """True where no other point has >= score and <= cost, one of them strict (NaN: never)."""
    score, cost = np.asarray(score, float), np.asarray(cost, float)
    ok = ~(np.isnan(score) | np.isnan(cost))
    front = np.zeros(len(score), bool)
    for i in np.flatnonzero(ok):
        better = ok & (score >= score[i]) & (cost <= cost[i]) & ((score > score[i]) | (cost < cost[i]))
        front[i] = not better.any()
    return front


def _mark_pareto(summary: pd.DataFrame) -> pd.DataFrame:
    out = summary.assign(pareto_macs=False, pareto_latency=False)
    for study in out["study"].unique():
        rows = out["study"] == study
        for column, cost in (("pareto_macs", "macs"), ("pareto_latency", "latency_median_ms")):
            out.loc[rows, column] = pareto_front(out.loc[rows, "top1"], out.loc[rows, cost])
    out["pareto"] = [", ".join(name for name, on in (("MACs", m), ("lat", lat)) if on)
                     for m, lat in zip(out["pareto_macs"], out["pareto_latency"])]
    return out


# ------------------------------------------------------------------------------- selection

def check_columns(frame: pd.DataFrame, names: Iterable[str], option: str, extra: Iterable[str] = ()) -> list[str]:
    """``names`` if all are columns of ``frame`` (or in ``extra``), else ReportError with the closest column."""
    names, known = list(names), set(frame.columns) | set(extra)
    for name in names:
        if name not in known:
            raise ReportError(f"{option}: unknown column '{name}'{did_you_mean(name, known)}")
    return names


def check_view_columns(frame: pd.DataFrame, names: Iterable[str]) -> list[str]:
    """``names`` for ``--columns``: summary columns or views of several (``delta_ci``)."""
    return check_columns(frame, names, "--columns", _COMPOSITES)


def apply_filter(frame: pd.DataFrame, expression: str) -> pd.DataFrame:
    """Rows matching a pandas query such as ``macs < 1e8`` or ``label == 'castling'`` (``=`` means ``==``)."""
    query = re.sub(r"(?<![<>=!])=(?!=)", "==", expression)
    try:
        names = {node.id for node in ast.walk(ast.parse(query, mode="eval")) if isinstance(node, ast.Name)}
    except SyntaxError:
        raise ReportError(f"--filter '{expression}': not an expression like 'macs<1e8' or "
                          f"\"label == 'castling'\"") from None
    for name in sorted(names - set(frame.columns)):
        texts = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
        if any(frame[c].astype(str).eq(name).any() for c in texts):
            raise ReportError(f"--filter '{expression}': quote the text '{name}', e.g. \"label == '{name}'\"")
    check_columns(frame, sorted(names), f"--filter '{expression}'")
    try:
        return frame.query(query, engine="python")
    except Exception as err:  # noqa: BLE001 - pandas raises many kinds; report one line
        raise ReportError(f"--filter '{expression}': {type(err).__name__}: {err}") from None


def select(summary: pd.DataFrame, studies: Sequence[str] = (), labels: Sequence[str] = (),
           variants: Sequence[str] = (), filters: Sequence[str] = (), sort: Optional[str] = None,
           descending: bool = False) -> pd.DataFrame:
    """The summary's rows of the given studies, labels and variants that match every filter, sorted.

    Raises:
        ReportError: an unknown study, label, variant or column, or a malformed filter.
    """
    frame = summary
    for column, wanted in (("study", studies), ("label", labels), ("variant", variants)):
        for value in wanted:
            if value not in set(summary[column]):
                raise ReportError(f"--{column}: no {column} '{value}' in these results"
                                  f"{did_you_mean(value, set(summary[column].dropna()))}")
        if wanted:
            frame = frame[frame[column].isin(wanted)]
    for expression in filters:
        frame = apply_filter(frame, expression)
    if sort:
        check_columns(frame, [sort], "--sort")
        frame = frame.sort_values(sort, ascending=not descending, na_position="last", kind="stable")
    return frame.reset_index(drop=True)


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
schema.names(*(set(_VIEWS) - set(_DERIVED) - set(_COMPOSITES)))
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
