"""Conclusions across the named points of a study's ``across``: where each comparison holds or flips.

A study run ``across`` points (recipes, budgets) is summarised point by point by
:func:`attnbench.results.report.summarize`: each point's comparisons with the baseline have their
own test, interval and Holm family. This module reads those per-point rows and says, for every
configuration against the baseline, the sign and the verdict at every point, and how well the
points agree on the ranking of all configurations (Kendall's tau-b between each pair of points).

A comparison *holds* at a point when it is beyond noise there (Holm-corrected p below alpha) with
the sign it has at the other points where it is beyond noise; it *flips* when it is beyond noise
with opposite signs at two points; elsewhere it is *unresolved* (not beyond noise).
"""
from __future__ import annotations

import itertools
import math
from typing import Optional

import pandas as pd

from attnbench.results import stats

__all__ = ["has_points", "points_of", "verdicts", "rank_agreement", "rich_tables", "markdown", "legend"]


def has_points(summary: pd.DataFrame) -> bool:
    """Whether any study in ``summary`` ran across named points."""
    return "point" in summary and summary["point"].map(lambda p: isinstance(p, str)).any()


def points_of(rows: pd.DataFrame) -> list[str]:
    """A study's point labels, in the order of its ``across``."""
    named = rows[rows["point"].map(lambda p: isinstance(p, str))]
    return list(dict.fromkeys(named.sort_values("point_index", kind="stable")["point"]))


def _sign(row) -> int:
    """+1 / -1: better / worse than the baseline beyond noise; 0: not beyond noise (or no test)."""
    delta = row.get("delta_tested")
    if row.get("beyond_noise") != "yes" or delta is None or not math.isfinite(float(delta)):
        return 0
    return 1 if float(delta) > 0 else -1


def _verdict(signs: dict[str, Optional[int]]) -> str:
    """The verdict of one comparison from its sign at each point (None: not run there)."""
    n = len(signs)
    missing = [p for p, s in signs.items() if s is None]
    better = [p for p, s in signs.items() if s == 1]
    worse = [p for p, s in signs.items() if s == -1]
    unresolved = [p for p, s in signs.items() if s == 0]
    quote = lambda points: ", ".join(f"'{p}'" for p in points)  # noqa: E731
    if better and worse:
        text = f"flips: better at {quote(better)}, worse at {quote(worse)}"
    elif better or worse:
        held = better or worse
        text = f"{'better' if better else 'worse'}, holds at {len(held)} of {n}"
        if unresolved:
            text += f"; unresolved at {quote(unresolved)}"
    else:
        text = "unresolved at every point" if not missing else f"unresolved at {quote(unresolved)}"
    if missing:
        text += f"; not run at {quote(missing)}"
    return text


def verdicts(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per (study, configuration) other than the baseline, for studies run across points.

    Columns: ``study``, ``config``, ``points`` (the study's labels, in order), per point
    ``delta`` (top-1 minus the baseline's at that point), ``sign`` (+1/-1 beyond noise, 0 not),
    ``p_holm``, and ``verdict`` (see the module docstring).
    """
    out = []
    for study in dict.fromkeys(summary["study"]):
        rows = summary[summary["study"] == study]
        labels = points_of(rows) if "point" in rows else []
        if not labels:
            continue
        compared = rows[rows["baseline"].notna() & (rows["config"] != rows["baseline"])]
        for config in dict.fromkeys(compared["config"]):
            at = {r["point"]: r for _, r in compared[compared["config"] == config].iterrows()}
            signs = {p: (_sign(at[p]) if p in at else None) for p in labels}
            out.append({"study": study, "config": config, "points": labels,
                        "delta": {p: float(at[p]["delta_top1"]) for p in labels if p in at},
                        "sign": signs,
                        "p_holm": {p: float(at[p]["p_holm"]) for p in labels if p in at},
                        "verdict": _verdict(signs)})
    return pd.DataFrame(out, columns=["study", "config", "points", "delta", "sign", "p_holm", "verdict"])


def rank_agreement(summary: pd.DataFrame) -> pd.DataFrame:
    """Kendall's tau-b between the rankings (by mean top-1) that each pair of a study's points give
    the configurations both ran; one row per (study, point a, point b) with ``n`` configurations."""
    from scipy.stats import kendalltau

    out = []
    for study in dict.fromkeys(summary["study"]):
        rows = summary[summary["study"] == study]
        labels = points_of(rows) if "point" in rows else []
        top1 = {p: dict(zip(rows.loc[rows["point"] == p, "config"], rows.loc[rows["point"] == p, "top1"]))
                for p in labels}
        for a, b in itertools.combinations(labels, 2):
            shared = [c for c in top1[a] if c in top1[b] and math.isfinite(top1[a][c]) and math.isfinite(top1[b][c])]
            tau = float(kendalltau([top1[a][c] for c in shared], [top1[b][c] for c in shared]).statistic) \
                if len(shared) >= 2 else math.nan
            out.append({"study": study, "point_a": a, "point_b": b, "n": len(shared), "tau": tau})
    return pd.DataFrame(out, columns=["study", "point_a", "point_b", "n", "tau"])


def _cell(delta: Optional[float], sign: Optional[int]) -> str:
    if delta is None or not math.isfinite(delta):
        return "-"
    return f"{delta:+.2f}" + ("*" if sign else "")


def _study_rows(summary: pd.DataFrame):
    table, taus = verdicts(summary), rank_agreement(summary)
    for study in dict.fromkeys(table["study"]):
        mine = table[table["study"] == study]
        labels = mine["points"].iloc[0]
        body = [[row["config"], *(_cell(row["delta"].get(p), row["sign"].get(p)) for p in labels), row["verdict"]]
                for _, row in mine.iterrows()]
        yield study, labels, body, taus[taus["study"] == study]


def legend(summary: pd.DataFrame, study: str, taus: pd.DataFrame) -> str:
    baseline = next(iter(summary.loc[summary["study"] == study, "baseline"].dropna()), "")
    agreement = "; ".join(f"'{r['point_a']}' vs '{r['point_b']}' {r['tau']:+.2f}" if math.isfinite(r["tau"])
                          else f"'{r['point_a']}' vs '{r['point_b']}' -" for _, r in taus.iterrows())
    n = int(taus["n"].max()) if len(taus) else 0
    return (f"Δ: top-1 minus the baseline '{baseline}' at each point; *: beyond noise there (p Holm < "
            f"{stats.ALPHA:g}, each point its own Holm family). holds at k of n: beyond noise with the same sign at k "
            f"of the n points; flips: beyond noise with opposite signs at two points; unresolved: not beyond noise. "
            f"Kendall's tau-b of the points' rankings of the {n} configurations by top-1 (1: the same order, "
            f"-1: reversed): {agreement}.")


def rich_tables(summary: pd.DataFrame) -> list:
    """One Rich table per study run across points: Δ at each point and the verdict, then the legend."""
    from attnbench.fitted_table import FittedColumn, FittedTable

    tables = []
    for study, labels, body, taus in _study_rows(summary):
        headers = ["configuration", *(f"Δ {p}" for p in labels), "verdict"]
        # the verdict a clause a line: the Δ of every point then fits beside it
        cells = [[*row[:-1], row[-1].replace("; ", ";\n")] for row in body]
        columns = [FittedColumn(header, header, [row[i] for row in cells], "right" if 0 < i <= len(labels) else "left")
                   for i, header in enumerate(headers)]
        tables.append(FittedTable(columns, title=f"study '{study}': does each comparison hold across its points?",
                                  priority=[columns[0].name, columns[-1].name, *(c.name for c in columns[1:-1])],
                                  required=2,
                                  legend=lambda shown, study=study, taus=taus: legend(summary, study, taus),
                                  omitted_note=lambda omitted, width: f"Left out to fit {width} columns: "
                                                                      f"{', '.join(omitted)} (a wider terminal, or "
                                                                      f"--format markdown, shows them)."))
    return tables


def markdown(summary: pd.DataFrame, cell=lambda text: text, prose=lambda text: text) -> str:
    """The tables of :func:`rich_tables` as Markdown; ``cell`` escapes user text for a table cell,
    ``prose`` for the legend."""
    parts = []
    for study, labels, body, taus in _study_rows(summary):
        line = lambda cells: "| " + " | ".join(map(cell, cells)) + " |"  # noqa: E731
        parts += [f"**{cell(f'study {study!r}: does each comparison hold across its points?')}**", "",
                  line(["configuration", *(f"Δ {p}" for p in labels), "verdict"]),
                  "|---|" + "---:|" * len(labels) + "---|", *(line(cells) for cells in body), "",
                  prose(legend(summary, study, taus)), ""]
    return "\n".join(parts)
