"""The data side of a report: a result store's trial rows summarised per configuration.

A configuration is one (study, label, options): a swept option makes several configurations
of one label. Per configuration, over its complete seeds (failed and pruned rows are counted,
never averaged in): top-1 mean and sample std (n shown), top-1 before castling, switch cost,
the seeds still improving at their last epoch, the difference from the study's baseline with the
statistics of :mod:`attnbench.results.stats` (paired or Welch's test, Holm's correction, the test's
t-interval), MACs and the reduction against the baseline, parameters, latency and memory, and
Pareto marks. A study run ``across`` named points is summarised point by point. Everything here
returns plain DataFrames; :mod:`attnbench.results.report` renders them.
"""
from __future__ import annotations

import ast
import json
import math
import re
import typing
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import pandas as pd

from attnbench.results import conversion, schema, stats, store
from attnbench.suggest import did_you_mean

__all__ = ["ReportError", "BASELINE", "KEYS", "DERIVED", "Results", "load_results", "load_store", "prepare_trials",
           "summarize", "baseline_warnings", "consistency_warnings", "pareto_front", "select", "apply_filter",
           "check_columns"]

BASELINE = schema.BASELINE   #: default baseline label (used when a study has it)
KEYS = list(schema.names("study", "label", "options"))
# Stored columns are named through the schema (a renamed column fails at import); the summary's
# own columns are listed in DERIVED.
DERIVED = ("config", "n", "failed", "pruned", "top1_std", "improving_seeds", "curve_seeds", "baseline", "delta_top1",
           *stats.COLUMNS, "macs_reduction_pct", "pareto_macs", "pareto_latency", "pareto")
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
