"""Learning curves of a study's configurations: per epoch, mean and spread over seeds.

Every trial row stores its curves (``curve_*`` columns: one value per epoch trained, epoch 0
first). This module gathers, for each configuration of a summary (one point of ``across`` at a
time), the complete seeds' curves and averages them epoch by epoch; :func:`attnbench.results.plots`
draws them.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from attnbench.results import schema

__all__ = ["CURVES", "learning_curves"]

#: The curves drawn, each with its axis label.
CURVES = {schema.names("curve_val_top1")[0]: "validation top-1 % (training form)",
          schema.names("curve_train_loss")[0]: "training loss (cross-entropy)"}
_IMPROVING = schema.names("still_improving")[0]


def _values(cell) -> np.ndarray | None:
    if cell is None or (isinstance(cell, float) and np.isnan(cell)):
        return None
    values = np.asarray(list(cell), dtype=float)
    return values if values.size else None


def learning_curves(trials: pd.DataFrame, summary: pd.DataFrame, keys: Sequence[str]) -> list[dict]:
    """Per summary row with curves: ``{config, variant, point, n, epochs, improving,
    <curve>: (mean, std)}`` for each of :data:`CURVES`, over the complete seeds' curves cut to the
    shortest (seeds of one configuration train the same epochs, unless a budget stopped one early).

    ``trials`` are prepared rows (:func:`attnbench.results.report.prepare_trials`); ``keys`` the
    columns that name a configuration; rows match a summary row on them and on ``point_index``.
    """
    out = []
    for _, row in summary.iterrows():
        match = np.logical_and.reduce([trials[k] == row[k] for k in keys])
        if "point_index" in trials and "point_index" in summary:
            match &= trials["point_index"] == row["point_index"]
        done = trials[match & (trials["status"] == "complete")].drop_duplicates("seed", keep="last")
        curves = {}
        for column in CURVES:
            series = [v for v in (_values(c) for c in done.get(column, pd.Series(dtype=object))) if v is not None]
            if not series:
                break
            length = min(len(v) for v in series)
            stacked = np.stack([v[:length] for v in series])
            curves[column] = (stacked.mean(axis=0), stacked.std(axis=0, ddof=1) if len(series) > 1
                              else np.zeros(length), len(series))
        if len(curves) < len(CURVES):
            continue
        n = min(count for _, _, count in curves.values())
        out.append({"config": row["config"], "variant": row["variant"], "point": row.get("point"), "n": n,
                    "epochs": int(min(len(m) for m, _, _ in curves.values())),
                    "improving": int((done[_IMPROVING] == True).sum()) if _IMPROVING in done else 0,  # noqa: E712
                    **{column: (mean, std) for column, (mean, std, _) in curves.items()}})
    return out
