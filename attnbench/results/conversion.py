"""The report of a conversion study (rows with ``teacher_top1``): each configuration against its teacher.

Per configuration, over its complete seeds: the teacher's top-1, the converted model's top-1
zero-shot, after attention transfer and after fine-tuning (mean ± sample std), the updates its
mean validation curve takes to come within :data:`WITHIN` points of the teacher's validation
top-1, and the fine-tuned top-1 against the teacher's with the statistics of
:mod:`attnbench.results.stats` (paired on seeds: each seed's conversion against the teacher it
started from, one teacher for every seed unless the study trains one a seed; Holm's family is
the study). :mod:`attnbench.results.report` shows these columns for conversion studies.
"""
from __future__ import annotations

import json
import math
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd

from attnbench.results import schema, stats

__all__ = ["WITHIN", "TEACHER", "COLUMNS", "PRIORITY", "VIEWS", "is_conversion", "compare_to_teacher",
           "recovery_curves", "legend"]

WITHIN = 1.0          #: points of validation top-1 from the teacher's that count as recovered
TEACHER = "teacher"   #: the baseline of a conversion study's comparisons
_TEACHER, _TEACHER_VAL, _ZERO, _TRANSFER, _STEPS, _CURVE, _CONFIG = schema.names(
    "teacher_top1", "teacher_val_top1", "top1_zero_shot", "top1_after_transfer", "recovery_steps",
    "recovery_val_top1", "convert_config")

#: The columns of a conversion study's table, in display order.
COLUMNS = ("config", "n", _TEACHER, _ZERO, _TRANSFER, "top1", "delta_teacher", "beyond_noise", "delta_ci", "p_holm",
           "steps_to_teacher", "macs", "latency_median_ms")
#: Which of them the terminal keeps first when the width does not hold them all.
PRIORITY = ("config", "n", "top1", _ZERO, _TRANSFER, "delta_teacher", "steps_to_teacher", _TEACHER, "beyond_noise",
            "delta_ci", "p_holm", "macs", "latency_median_ms")


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA \
        else format(value, spec)


def _mean_std(column: str) -> Callable:
    def cell(row) -> str:
        value, std = row.get(column), row.get(f"{column}_std")
        if value is None or pd.isna(value):
            return "-"
        return _fmt(value) + (f" ± {std:.2f}" if row["n"] > 1 and std is not None and not pd.isna(std) else "")
    return cell


def _steps(row) -> str:
    value = row.get("steps_to_teacher")
    if value is None or pd.isna(value):
        last = row.get("recovery_last_step")
        return "-" if last is None or pd.isna(last) else f"> {int(last)}"
    return str(int(value))


#: column -> (header, cell) for :data:`attnbench.results.report`'s views.
VIEWS = {
    _TEACHER: ("teacher\n%", lambda r: _fmt(r.get(_TEACHER))),
    _ZERO: ("zero-shot\n%", _mean_std(_ZERO)),
    _TRANSFER: ("after\ntransfer %", _mean_std(_TRANSFER)),
    "steps_to_teacher": (f"updates to\n-{WITHIN:g} pt", _steps),
    "delta_teacher": ("Δ vs\nteacher", lambda r: _fmt(r.get("delta_teacher"), "+.2f")),
}


def is_conversion(rows: pd.DataFrame) -> bool:
    """Whether a study's rows (trial rows or summary rows) are a conversion study's."""
    return _TEACHER in rows and rows[_TEACHER].notna().any()


def _curve(rows: pd.DataFrame) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(updates, mean, std) of the complete seeds' validation curves, on the updates all share."""
    curves = [(list(s), list(v)) for s, v in zip(rows.get(_STEPS, []), rows.get(_CURVE, []))
              if isinstance(s, (list, np.ndarray)) and len(s) and len(s) == len(v)]
    if not curves:
        return None
    shared = sorted(set.intersection(*(set(int(x) for x in s) for s, _ in curves)))
    values = np.array([[dict(zip((int(x) for x in s), v))[x] for x in shared] for s, v in curves], float)
    std = values.std(axis=0, ddof=1) if len(values) > 1 else np.full(len(shared), np.nan)
    return np.array(shared), values.mean(axis=0), std


def compare_to_teacher(summary: pd.DataFrame, trials: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """``summary`` with, for each conversion study, the conversion columns and the comparison of
    each configuration's fine-tuned top-1 with the teacher's (replacing the comparison with a
    baseline configuration). ``trials``: the prepared trial rows; ``keys``: the configuration keys."""
    out = summary.copy()
    for column in (_TEACHER, _TEACHER_VAL, _ZERO, f"{_ZERO}_std", _TRANSFER, f"{_TRANSFER}_std",
                   "steps_to_teacher", "recovery_last_step", "delta_teacher"):
        if column not in out:
            out[column] = math.nan
    if _CONFIG not in out:
        out[_CONFIG] = None
    for study in out["study"].unique():
        in_study = trials[trials["study"] == study]
        if not is_conversion(in_study):
            continue
        rows = out.index[out["study"] == study]
        samples: dict = {}
        teacher: dict = {}
        for i in rows:
            match = np.logical_and.reduce([in_study[k] == out.at[i, k] for k in keys])
            done = in_study[match & (in_study["status"] == "complete")].drop_duplicates("seed", keep="last")
            for column in (_TEACHER, _TEACHER_VAL):
                out.at[i, column] = pd.to_numeric(done[column], errors="coerce").mean()
            for column in (_ZERO, _TRANSFER):
                values = pd.to_numeric(done[column], errors="coerce").dropna()
                out.at[i, column] = values.mean() if len(values) else math.nan
                out.at[i, f"{column}_std"] = values.std(ddof=1) if len(values) > 1 else math.nan
            curve = _curve(done)
            if curve is not None:
                steps, mean, _ = curve
                reached = np.flatnonzero(mean >= out.at[i, _TEACHER_VAL] - WITHIN)
                out.at[i, "steps_to_teacher"] = float(steps[reached[0]]) if len(reached) else math.nan
                out.at[i, "recovery_last_step"] = float(steps[-1])
            out.at[i, _CONFIG] = next(iter(done[_CONFIG].dropna()), None)
            samples[i] = dict(zip(done["seed"], pd.to_numeric(done["top1"], errors="coerce")))
            teacher.update(zip(done["seed"], pd.to_numeric(done[_TEACHER], errors="coerce")))
        samples[TEACHER] = teacher
        compared = stats.compare_to_baseline(samples, TEACHER)
        out.loc[rows, list(stats.COLUMNS)] = compared.loc[list(rows), list(stats.COLUMNS)].to_numpy()
        out.loc[rows, "baseline"] = TEACHER
        out.loc[rows, "delta_top1"] = out.loc[rows, "top1"] - float(np.nanmean(list(teacher.values())))
        out.loc[rows, "delta_teacher"] = out.loc[rows, "delta_top1"]
    return out


def recovery_curves(trials: pd.DataFrame, summary: pd.DataFrame, keys: Sequence[str]) -> list[dict]:
    """Per configuration of a conversion study: ``{config, variant, steps, mean, std, n,
    teacher_val, transfer_steps}`` (validation top-1, mean and std over the complete seeds)."""
    out = []
    for _, row in summary.iterrows():
        match = np.logical_and.reduce([trials[k] == row[k] for k in keys])
        done = trials[match & (trials["status"] == "complete")].drop_duplicates("seed", keep="last")
        curve = _curve(done) if is_conversion(done) else None
        if curve is None:
            continue
        config = next(iter(done[_CONFIG].dropna()), None)
        transfer = json.loads(config).get("transfer_steps") if isinstance(config, str) else None
        out.append({"config": row["config"], "variant": row["variant"], "steps": curve[0], "mean": curve[1],
                    "std": curve[2], "n": len(done), "teacher_val": float(done[_TEACHER_VAL].mean()),
                    "transfer_steps": transfer})
    return out


def legend(rows: pd.DataFrame, columns: Sequence[str]) -> str:
    """What a conversion table's own columns mean."""
    config = next(iter(rows[_CONFIG].dropna()), None) if _CONFIG in rows else None
    spec = json.loads(config) if isinstance(config, str) else {}
    stages = (f" ({spec.get('transfer_steps')} updates of attention transfer, then {spec.get('finetune_steps')} of "
              f"fine-tuning, {spec.get('finetune')} parameters)") if spec else ""
    notes = {
        _TEACHER: "teacher: the trained softmax model's test top-1 %, the configurations' starting point.",
        _ZERO: "zero-shot: test top-1 with the teacher's weights loaded, before any training.",
        _TRANSFER: "after transfer: after the attention layers alone learnt to match the teacher's layer outputs.",
        "top1": f"top-1: after fine-tuning{stages}, inference form (castled); every top-1 is mean ± sample std "
                f"over n seeds.",
        "delta_teacher": "Δ vs teacher: fine-tuned top-1 minus the teacher's (every seed compared with the teacher it "
                      "started from).",
        "steps_to_teacher": f"updates to -{WITHIN:g} pt: the first update (transfer, then fine-tuning) at which the "
                            f"mean validation curve comes within {WITHIN:g} point of the teacher's validation top-1; "
                            f"'> N': not within the N updates run.",
    }
    return " ".join(notes[c] for c in columns if c in notes)
