"""Comparisons with a baseline that a reviewer accepts: paired or Welch's t-test, Holm's
correction, the t-interval of the difference, the probability of improvement and the smallest
detectable difference.

Input is per-seed values (top-1) of each configuration of one study, keyed by seed id, and the
label of the baseline. Within a study every configuration loads its data with the experiment's
seeds, and a seed fixes the split, the batch order and the initialisation
(:mod:`attnbench.data`), so the same seed id means the same split and order. "Same seeds" is
therefore decided on seed ids: a configuration is compared *paired* on the seeds it shares with
the baseline when it shares at least two (seeds only one side ran are left out of the paired
test, and the note says so); otherwise it gets Welch's unequal-variance test over all its seeds.
Welch's p over all seeds is kept beside the deciding one for exports.

The interval of a difference is the t-interval of the test that decides it (paired: of the
per-seed differences; Welch's: with the Welch-Satterthwaite degrees of freedom), so interval and
p always agree. It covers at the seed counts studies use: simulated at 3, 5 and 10 seeds, 95%
for normal differences and at least 93% for differences with skewness up to 1
(``tests/test_stats.py``; strongly skewed, exponential differences: 88-90%). A percentile or
BCa bootstrap of a handful of seeds does not (BCa: about 73% at 3 seeds, 85% at 5, 92% at 10 on
normal data), so there is none here.

All comparisons of one call form one family for Holm's step-down correction, and "beyond
noise" is the Holm-corrected p below :data:`ALPHA`. Undefined numbers are NaN and the
``comparison_note`` column says why; no scipy or numpy warning leaves this module.
"""
from __future__ import annotations

import math
import warnings
from typing import Hashable, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
from scipy import optimize, stats

__all__ = ["ALPHA", "POWER", "CONFIDENCE", "FEW_SEEDS", "COLUMNS", "compare_to_baseline",
           "welch_p", "paired_p", "holm", "difference_interval", "prob_improvement", "min_detectable_effect"]

ALPHA = 0.05          #: two-sided significance level of "beyond noise" (on Holm-corrected p)
POWER = 0.8           #: power at which the minimum detectable effect is computed
CONFIDENCE = 0.95     #: level of the t-interval of the difference
FEW_SEEDS = 5         #: below this many seeds per side a comparison reports its minimum detectable effect
#: Columns of :func:`compare_to_baseline`, in order.
COLUMNS = ("test", "n_pairs", "delta_tested", "p_raw", "p_welch", "p_holm", "delta_ci_low", "delta_ci_high",
           "prob_improvement", "min_detectable", "beyond_noise", "comparison_note")

Samples = Mapping[Hashable, Mapping[Hashable, float]]


def _constant(x: np.ndarray):
    """Whether all values (over the last axis) are equal up to float rounding (differences of
    accuracies computed per seed, e.g. 71.03 - 70.75 and 72.14 - 71.87, agree only to ~1e-14;
    scipy then warns of catastrophic cancellation and returns a meaningless huge t)."""
    flat = np.isclose(x, x[..., :1], rtol=1e-9, atol=1e-9).all(-1)
    return bool(flat) if flat.ndim == 0 else flat


def _quiet(call):
    """``call()`` with scipy's and numpy's warnings kept in: callers check the cases they flag."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return call()


def welch_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p of Welch's t-test (``scipy.stats.ttest_ind(equal_var=False)``).

    NaN when a side has fewer than 2 values, or when both sides have no spread and equal means
    (nothing to test); 0.0 when both have no spread and the means differ (t is infinite: the
    test's limit).
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or len(b) < 2:
        return math.nan
    if _constant(a) and _constant(b):
        return math.nan if math.isclose(a[0], b[0], rel_tol=1e-9, abs_tol=1e-9) else 0.0
    return float(_quiet(lambda: stats.ttest_ind(a, b, equal_var=False).pvalue))


def paired_p(differences: Sequence[float]) -> float:
    """Two-sided p of the paired t-test on per-seed differences (``scipy.stats.ttest_rel``).

    NaN with fewer than 2 differences or when all are zero; 0.0 when all are the same nonzero
    value (t is infinite: the test's limit).
    """
    d = np.asarray(differences, float)
    if len(d) < 2:
        return math.nan
    if _constant(d):
        return math.nan if math.isclose(d[0], 0.0, abs_tol=1e-9) else 0.0
    return float(_quiet(lambda: stats.ttest_rel(d, np.zeros_like(d)).pvalue))


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values, in the input order; NaN entries stay NaN and are not
    counted in the family size m.

    Sorted ascending, p_(i) becomes max over j <= i of min(1, (m - j + 1) p_(j)): the smallest
    is multiplied by m, the next by m - 1, ..., and the running maximum keeps the order.
    (scipy has no Holm; ``scipy.stats.false_discovery_control`` is Benjamini-Hochberg, which
    controls the false discovery rate rather than the family-wise error.)
    """
    p = np.asarray(p_values, float)
    adjusted = np.full(p.shape, math.nan)
    tested = np.flatnonzero(~np.isnan(p))
    m = len(tested)
    order = tested[np.argsort(p[tested], kind="stable")]
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return adjusted


def prob_improvement(a: Sequence[float], b: Sequence[float], paired: bool) -> float:
    """Share of seed pairs where ``a`` beats ``b``, ties counting half; NaN when there are none.

    Paired: pairs are the positions of ``a`` and ``b`` (the same seed). Unpaired: every value
    of ``a`` against every value of ``b``.
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    if paired:
        diff = a - b
    else:
        diff = (a[:, None] - b[None, :]).ravel()
    if diff.size == 0:
        return math.nan
    return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def _power(noncentrality: float, df: float) -> float:
    critical = stats.t.ppf(1 - ALPHA / 2, df)
    # the far (wrong-sign) tail is below 1e-9 once power nears 0.8, and scipy's nct.cdf there can
    # return NaN: count it as 0
    wrong_sign = np.nan_to_num(stats.nct.cdf(-critical, df, noncentrality), nan=0.0)
    return float(stats.nct.sf(critical, df, noncentrality) + wrong_sign)


def min_detectable_effect(standard_error: float, df: float) -> float:
    """Smallest true difference a two-sided t-test detects at :data:`ALPHA` with :data:`POWER`.

    Exact for the t-test: the noncentral t distribution (``scipy.stats.nct``) gives the power
    at noncentrality delta / standard_error; the noncentrality reaching POWER is solved with
    ``scipy.optimize.brentq`` and scaled back by the standard error. NaN without a spread
    (standard error 0 or NaN) or without degrees of freedom.
    """
    if not (standard_error > 0 and df > 0):
        return math.nan
    upper = 10.0
    while _quiet(lambda: _power(upper, df)) < POWER:   # df = 1 needs a noncentrality near 20
        upper *= 2
    noncentrality = _quiet(lambda: optimize.brentq(lambda nc: _power(nc, df) - POWER, 0.0, upper, xtol=1e-10))
    return float(noncentrality * standard_error)


def _spread(a: np.ndarray, b: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean difference, its standard error and the t-test's degrees of freedom, over the last axis.

    ``b`` None: ``a`` are paired differences (standard error sd / sqrt(n), n - 1 df). Otherwise
    Welch's: standard error sqrt(var_a / n_a + var_b / n_b) with Welch-Satterthwaite df (NaN
    when neither side has a spread).
    """
    if b is None:
        n = a.shape[-1]
        return a.mean(-1), a.std(-1, ddof=1) / math.sqrt(n), np.full(a.shape[:-1], n - 1.0)
    na, nb = a.shape[-1], b.shape[-1]
    va, vb = a.var(-1, ddof=1) / na, b.var(-1, ddof=1) / nb
    with np.errstate(all="ignore"):
        df = np.where(va + vb > 0, (va + vb) ** 2 / (va ** 2 / (na - 1) + vb ** 2 / (nb - 1)), math.nan)
    return a.mean(-1) - b.mean(-1), np.sqrt(va + vb), df


def difference_interval(a: Sequence[float], b: Optional[Sequence[float]] = None):
    """:data:`CONFIDENCE` t-interval of a mean difference: mean ± t(df) x standard error.

    With ``b`` None, ``a`` are per-seed (paired) differences and the interval is of their mean,
    n - 1 degrees of freedom; otherwise it is Welch's interval of mean(a) - mean(b). (NaN, NaN)
    with fewer than 2 values on a side or no spread at all (no interval: the difference is the
    same on every seed).

    Arrays of more than one dimension are many samples at once, one per row (the last axis holds
    the seeds); the bounds are then arrays. Coverage is in the module's docstring.
    """
    data = [np.asarray(a, float)] + ([] if b is None else [np.asarray(b, float)])
    if min(x.shape[-1] for x in data) < 2:
        nan = np.full(np.broadcast_shapes(*(x.shape[:-1] for x in data)), math.nan)
        return (math.nan, math.nan) if nan.ndim == 0 else (nan, nan.copy())
    delta, standard_error, df = _spread(*data)
    # no spread: a standard error of float rounding (1e-15), not an interval
    flat = np.all([_constant(x) for x in data], axis=0)
    with np.errstate(all="ignore"):
        half = np.where(flat, math.nan, stats.t.ppf(0.5 + CONFIDENCE / 2, df) * standard_error)
    low, high = delta - half, delta + half
    return (float(low), float(high)) if np.ndim(low) == 0 else (low, high)


def _finite(values: Mapping[Hashable, float]) -> dict[Hashable, float]:
    """Seed -> value for the seeds with a number (a missing top-1 is no sample)."""
    return {seed: float(v) for seed, v in values.items() if pd.notna(v) and np.isfinite(float(v))}


def _compare_one(own: dict, base: dict) -> dict:
    common = [seed for seed in own if seed in base]
    a, b = np.array(list(own.values())), np.array(list(base.values()))
    row = dict.fromkeys(COLUMNS, math.nan) | {"n_pairs": len(common), "comparison_note": ""}
    row["p_welch"] = welch_p(a, b)
    notes = []
    if len(common) >= 2:
        pa, pb = np.array([own[s] for s in common]), np.array([base[s] for s in common])
        d = pa - pb
        left_out = (len(a) - len(common), len(b) - len(common))
        if any(left_out):
            notes.append(f"paired on the {len(common)} seeds both ran ({left_out[0]} of this configuration's "
                         f"and {left_out[1]} of the baseline's left out)")
        row.update(test="paired", delta_tested=float(d.mean()), p_raw=paired_p(d),
                   prob_improvement=prob_improvement(pa, pb, paired=True))
        row["delta_ci_low"], row["delta_ci_high"] = difference_interval(d)
        spread, n_tested, constant = tuple(map(float, _spread(d)[1:])), len(common), _constant(d)
    elif min(len(a), len(b)) >= 2:
        row.update(test="welch", delta_tested=float(a.mean() - b.mean()), p_raw=row["p_welch"],
                   prob_improvement=prob_improvement(a, b, paired=False))
        row["delta_ci_low"], row["delta_ci_high"] = difference_interval(a, b)
        spread, n_tested = tuple(map(float, _spread(a, b)[1:])), min(len(a), len(b))
        constant = _constant(a) and _constant(b)
    else:
        row.update(test=None, beyond_noise="n<2",
                   prob_improvement=prob_improvement(a, b, paired=False) if len(a) and len(b) else math.nan,
                   comparison_note=f"fewer than 2 seeds on a side ({len(a)} here, {len(b)} in the baseline, "
                                   f"{len(common)} shared): no test, interval or detectable difference")
        return row
    if constant:
        notes.append("equal to the baseline on every seed: nothing to test" if math.isnan(row["p_raw"]) else
                     "no spread over seeds: t is infinite, p = 0 is the test's limit, and there is no interval")
    if n_tested < FEW_SEEDS:
        row["min_detectable"] = min_detectable_effect(*spread)
    row["comparison_note"] = "; ".join(notes)
    return row


def compare_to_baseline(samples: Samples, baseline: Hashable) -> pd.DataFrame:
    """Every configuration of ``samples`` against ``baseline``: one row per key, in input order.

    Args:
        samples: configuration -> (seed id -> value, e.g. top-1 %), one study's configurations.
        baseline: the key of the baseline configuration.

    Returns:
        A DataFrame indexed by the keys of ``samples`` with :data:`COLUMNS`:
        ``test`` ("paired", "welch", "baseline" or None when a side has < 2 seeds);
        ``n_pairs`` (seeds both ran); ``delta_tested`` (the mean difference the test and the
        interval are about: over the shared seeds when paired); ``p_raw`` (the deciding test's
        two-sided p); ``p_welch`` (Welch's p over all seeds, whatever the test);
        ``p_holm`` (``p_raw`` after Holm's correction over all comparisons here);
        ``delta_ci_low``/``delta_ci_high`` (95% t-interval of the difference, paired or Welch's as
        the test);
        ``prob_improvement`` (share of seed pairs where the configuration beats the baseline,
        ties half: shared seeds when paired, all pairs otherwise); ``min_detectable`` (with
        fewer than :data:`FEW_SEEDS` seeds tested, the smallest difference detectable at alpha
        0.05 and power 0.8 with the observed spread, noncentral t); ``beyond_noise`` ("yes",
        "no", "n<2", "baseline"); ``comparison_note`` (why a number is missing, or what was
        left out).

    Raises:
        KeyError: ``baseline`` is not a key of ``samples``.
    """
    if baseline not in samples:
        raise KeyError(f"baseline {baseline!r} is not among the compared configurations")
    base = _finite(samples[baseline])
    rows = {}
    for key, values in samples.items():
        if key == baseline:
            rows[key] = dict.fromkeys(COLUMNS, math.nan) | {
                "test": "baseline", "n_pairs": len(base), "beyond_noise": "baseline", "comparison_note": ""}
        else:
            rows[key] = _compare_one(_finite(values), base)
    table = pd.DataFrame.from_dict(rows, orient="index", columns=list(COLUMNS))
    table["p_holm"] = holm(table["p_raw"].to_numpy(float))
    tested = table["test"].isin(["paired", "welch"])
    table.loc[tested, "beyond_noise"] = np.where(table.loc[tested, "p_holm"] < ALPHA, "yes", "no")
    table["n_pairs"] = table["n_pairs"].astype(int)
    return table
