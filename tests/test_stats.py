"""attnbench.results.stats against hand-computed cases: paired vs Welch, Holm, the t-interval and its coverage,
probability of improvement, minimum detectable effect, and the n < 2 and no-spread cases."""
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from attnbench.results import stats

# scipy's warnings (catastrophic cancellation, divide by zero) must not leak
pytestmark = pytest.mark.filterwarnings("error")

# Seed effect: seeds 0..4 differ by 4 points each (a split that is easy or hard for every model).
BASE = [70.0, 74.0, 78.0, 82.0, 86.0]
GAIN = [1.0, 0.8, 1.2, 1.0, 0.9]          # per-seed gain of the configuration over the baseline


def _samples(*configs, seeds=range(5)):
    """{"base": BASE by seed, "c0": BASE + gains of configs[0], ...}"""
    out = {"base": dict(zip(seeds, BASE))}
    out.update({f"c{i}": dict(zip(seeds, np.add(BASE, gains))) for i, gains in enumerate(configs)})
    return out


def test_paired_detects_what_welch_cannot():
    table = stats.compare_to_baseline(_samples(GAIN), "base")
    row = table.loc["c0"]
    # by hand: differences mean 0.98, sample variance (0.02²+0.18²+0.22²+0.02²+0.08²)/4 = 0.022,
    # t = 0.98 / sqrt(0.022 / 5) = 14.774 with 4 degrees of freedom
    assert row["test"] == "paired" and row["n_pairs"] == 5
    assert row["delta_tested"] == pytest.approx(0.98)
    assert row["p_raw"] == pytest.approx(2 * scipy_stats.t.sf(14.774056, 4), rel=1e-5)
    assert row["p_raw"] < 0.001 and row["beyond_noise"] == "yes"
    # Welch's ignores the pairing: the 6.3-point seed spread swamps a 1-point gain
    assert row["p_welch"] == pytest.approx(scipy_stats.ttest_ind(np.add(BASE, GAIN), BASE, equal_var=False).pvalue)
    assert row["p_welch"] > 0.5
    assert table.loc["base", "test"] == "baseline" and table.loc["base", "beyond_noise"] == "baseline"


def test_different_seeds_get_welch():
    samples = _samples(GAIN)
    samples["c0"] = {seed + 10: v for seed, v in samples["c0"].items()}    # same values, other seeds
    row = stats.compare_to_baseline(samples, "base").loc["c0"]
    assert row["test"] == "welch" and row["n_pairs"] == 0
    assert row["p_raw"] == row["p_welch"] > 0.5 and row["beyond_noise"] == "no"
    samples["c0"][0] = samples["c0"].pop(10)                                # one shared seed: still Welch
    assert stats.compare_to_baseline(samples, "base").loc["c0", "test"] == "welch"


def test_paired_on_the_shared_seeds_only():
    samples = _samples(GAIN)
    samples["c0"][7] = 50.0          # a seed the baseline did not run: left out of the paired test
    del samples["base"][4]           # a seed only the configuration ran, and one only the baseline ran
    samples["base"][9] = 75.0
    row = stats.compare_to_baseline(samples, "base").loc["c0"]
    assert row["test"] == "paired" and row["n_pairs"] == 4
    assert row["delta_tested"] == pytest.approx(np.mean(GAIN[:4]))
    assert row["p_raw"] == pytest.approx(scipy_stats.ttest_1samp(GAIN[:4], 0).pvalue)
    assert "paired on the 4 seeds both ran (2 of this configuration's and 1 of the baseline's left out)" \
        in row["comparison_note"]


def test_holm_by_hand():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> running max 0.06;
    # NaN is no comparison and does not count in m = 4
    adjusted = stats.holm([0.01, 0.04, 0.03, 0.005, math.nan])
    assert adjusted[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02]) and math.isnan(adjusted[4])
    # 0.5 x 2 = 1.0 caps at 1; 0.6 x 1 is raised to the running max 1.0
    assert stats.holm([0.6, 0.5]) == pytest.approx([1.0, 1.0])
    assert stats.holm([0.02]) == pytest.approx([0.02]) and stats.holm([]).size == 0


def test_beyond_noise_is_decided_on_holm():
    gains = (GAIN, [0.5, 1.0, 1.5, 0.2, 0.8], [1.0, 0.5, 1.5, 0.0, 1.0], [0.6, 1.2, 0.4, 1.0, -0.2])
    table = stats.compare_to_baseline(_samples(*gains) | {"c4": {0: 71.0}}, "base")
    raw = [scipy_stats.ttest_1samp(g, 0).pvalue for g in gains]        # 1.2e-4, 0.0225, 0.0349, 0.0705
    assert table["p_raw"].iloc[1:5].tolist() == pytest.approx(raw)
    # m = 4 (c4 has one seed: no test): 4 p0, 3 p1, max(3 p1, 2 p2), max(.., p3)
    expected = [4 * raw[0], 3 * raw[1], max(3 * raw[1], 2 * raw[2]), max(3 * raw[1], 2 * raw[2], raw[3])]
    assert table["p_holm"].iloc[1:5].tolist() == pytest.approx(expected)
    assert raw[1] < 0.05 <= expected[1]                                 # the correction changes c1's verdict
    assert table["beyond_noise"].tolist() == ["baseline", "yes", "no", "no", "no", "n<2"]


def test_interval_by_hand():
    # paired: differences GAIN, mean 0.98, sd sqrt(0.022), t(0.975, 4 df) = 2.776445
    row = stats.compare_to_baseline(_samples(GAIN), "base").loc["c0"]
    half = 2.776445 * math.sqrt(0.022 / 5)
    assert (row["delta_ci_low"], row["delta_ci_high"]) == pytest.approx((0.98 - half, 0.98 + half), rel=1e-5)
    assert stats.difference_interval(GAIN) == pytest.approx((0.98 - half, 0.98 + half), rel=1e-5)
    # Welch's: [1, 2, 3] against [5, 6, 9]: variances 1 and 4.333, standard error sqrt(1/3 + 4.333/3) = 1.3333,
    # df = 1.7778^2 / ((1/3)^2 / 2 + (4.333/3)^2 / 2) = 2.8764
    low, high = stats.difference_interval([1.0, 2.0, 3.0], [5.0, 6.0, 9.0])
    half = scipy_stats.t.ppf(0.975, 2.876404) * 1.333333
    assert (low, high) == pytest.approx((-4.666667 - half, -4.666667 + half), rel=1e-5)
    # the interval is the deciding test's: it excludes 0 exactly when p < 0.05
    p = scipy_stats.ttest_ind([1.0, 2.0, 3.0], [5.0, 6.0, 9.0], equal_var=False).pvalue
    assert (high < 0) == (p < 0.05)


def test_interval_of_the_deciding_test():
    rng = np.random.default_rng(0)
    seed_effect = rng.normal(0, 3, 10)
    base = 70 + seed_effect + rng.normal(0, 0.5, 10)
    config = 71.5 + seed_effect + rng.normal(0, 0.5, 10)               # true difference 1.5
    paired = stats.compare_to_baseline({"b": dict(enumerate(base)), "c": dict(enumerate(config))}, "b").loc["c"]
    assert paired["test"] == "paired"
    assert paired["delta_ci_low"] < 1.5 < paired["delta_ci_high"]
    assert paired["delta_ci_low"] < paired["delta_tested"] < paired["delta_ci_high"]
    assert paired["delta_ci_low"] > 0                                   # pairing removes the seed effect
    low, high = stats.difference_interval(config, base)                 # unpaired: wider, still around 1.5
    assert low < 1.5 < high and high - low > paired["delta_ci_high"] - paired["delta_ci_low"]
    welch = stats.compare_to_baseline({"b": dict(enumerate(base)), "c": {s + 10: v for s, v in enumerate(config)}},
                                      "b").loc["c"]
    assert welch["test"] == "welch" and (welch["delta_ci_low"], welch["delta_ci_high"]) == (low, high)


# Coverage by simulation: the printed 95% interval must hold the true difference at least 93% of the
# time at the seed counts studies use. 20,000 samples per case (vectorised, well under a second): the
# estimate's standard error is 0.17 points, and the generator is seeded, so the figures are fixed:
# paired normal 94.9 / 95.1 / 95.2% at n = 3 / 5 / 10, skewed 93.6 / 93.5 / 93.5%; Welch's 94.1-95.5%.
# (More skewed differences cover less: exponential ones, skewness 2, 88-90%.)
COVERAGE_SAMPLES = 20_000
DIFFERENCES = {
    "normal": lambda rng, size: rng.normal(1.5, 1.0, size) - 1.5,
    "skewed": lambda rng, size: rng.gamma(4.0, 0.5, size) - 2.0,         # gamma, skewness 1, mean 0
}


def _coverage(low, high, truth=0.0):
    return float(np.mean((low <= truth) & (truth <= high)))


@pytest.mark.parametrize("n", [3, 5, 10])
@pytest.mark.parametrize("distribution", DIFFERENCES)
def test_paired_interval_covers(distribution, n):
    rng = np.random.default_rng(n)
    differences = 0.7 + DIFFERENCES[distribution](rng, (COVERAGE_SAMPLES, n))
    coverage = _coverage(*stats.difference_interval(differences), truth=0.7)
    assert 0.93 <= coverage <= 0.97


@pytest.mark.parametrize("n", [3, 5, 10])
@pytest.mark.parametrize("distribution", DIFFERENCES)
def test_welch_interval_covers(distribution, n):
    # unequal spreads (1 against 3) and seed counts (n against n + 2)
    rng = np.random.default_rng(100 + n)
    a = 1.0 + DIFFERENCES[distribution](rng, (COVERAGE_SAMPLES, n))
    b = 3.0 * DIFFERENCES[distribution](rng, (COVERAGE_SAMPLES, n + 2))
    coverage = _coverage(*stats.difference_interval(a, b), truth=1.0)
    assert 0.93 <= coverage <= 0.98


def test_batched_interval_is_the_scalar_one():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0, 1, (4, 5)), rng.normal(0, 2, (4, 3))
    for batched, scalar in ((stats.difference_interval(a), [stats.difference_interval(x) for x in a]),
                            (stats.difference_interval(a, b), [stats.difference_interval(x, y) for x, y in zip(a, b)])):
        assert np.column_stack(batched).ravel().tolist() == pytest.approx(np.ravel(scalar).tolist())


def test_prob_improvement_by_hand():
    # paired differences 2, 0, -1: a win, a tie (half) and a loss -> 1.5 / 3
    assert stats.prob_improvement([3, 1, 2], [1, 1, 3], paired=True) == pytest.approx(0.5)
    # all 6 pairs: 1 loses to 2, 2, 3; 3 beats 2, 2 and ties 3 -> 2.5 / 6
    assert stats.prob_improvement([1, 3], [2, 2, 3], paired=False) == pytest.approx(2.5 / 6)
    assert math.isnan(stats.prob_improvement([], [1.0], paired=False))
    table = stats.compare_to_baseline({"b": {0: 1.0, 1: 1.0, 2: 3.0}, "c": {0: 3.0, 1: 1.0, 2: 2.0}}, "b")
    assert table.loc["c", "prob_improvement"] == pytest.approx(0.5)


def test_min_detectable_effect():
    def mde(sd, n):                                   # paired test: standard error sd / sqrt(n), n - 1 df
        return stats.min_detectable_effect(sd / math.sqrt(n), n - 1)
    by_n = [mde(1.0, n) for n in (2, 3, 4, 5, 10)]
    assert by_n == sorted(by_n, reverse=True) and by_n[0] > 10 * by_n[-1]
    assert mde(2.0, 4) == pytest.approx(2 * mde(1.0, 4)) and mde(2.0, 4) > mde(1.0, 4)
    # R's power.t.test(n = 10, sd = 1, power = 0.8, type = "one.sample") gives delta = 0.9962 (it drops
    # the wrong-sign tail, which this includes); large df: z(0.975) + z(0.8) = 2.8016 standard errors
    assert mde(1.0, 10) == pytest.approx(0.9962, abs=5e-4)
    assert stats.min_detectable_effect(1.0, 1e6) == pytest.approx(2.8016, abs=1e-3)
    assert math.isnan(stats.min_detectable_effect(0.0, 3)) and math.isnan(stats.min_detectable_effect(1.0, 0))


def test_min_detectable_only_with_few_seeds():
    few = stats.compare_to_baseline(_samples(GAIN, seeds=range(3)), "base")
    # 3 shared seeds -> differences 1.0, 0.8, 1.2: sd 0.2, standard error 0.2 / sqrt(3), 2 df
    assert few.loc["c0", "min_detectable"] == pytest.approx(stats.min_detectable_effect(0.2 / math.sqrt(3), 2))
    assert math.isnan(stats.compare_to_baseline(_samples(GAIN), "base").loc["c0", "min_detectable"])


def test_fewer_than_two_seeds():
    # missing values (None, NaN, pd.NA) are no samples
    table = stats.compare_to_baseline({"b": {0: 70.0, 1: 71.0, 2: None}, "one": {0: 60.0, 1: math.nan},
                                       "none": {0: pd.NA}}, "b")
    for key in ("one", "none"):
        row = table.loc[key]
        assert pd.isna(row["test"]) and row["beyond_noise"] == "n<2"
        assert all(math.isnan(row[c]) for c in ("p_raw", "p_welch", "p_holm", "delta_ci_low", "min_detectable"))
        assert "fewer than 2 seeds on a side" in row["comparison_note"]
    assert table.loc["one", "prob_improvement"] == 0.0 and math.isnan(table.loc["none", "prob_improvement"])
    one_baseline = stats.compare_to_baseline({"b": {0: 70.0}, "c": {0: 71.0, 1: 72.0}}, "b").loc["c"]
    assert one_baseline["beyond_noise"] == "n<2" and "(2 here, 1 in the baseline, 1 shared)" in \
        one_baseline["comparison_note"]
    assert math.isnan(stats.welch_p([1.0], [1.0, 2.0])) and math.isnan(stats.paired_p([1.0]))
    assert stats.difference_interval([1.0], [1.0, 2.0]) == pytest.approx((math.nan, math.nan), nan_ok=True)


def test_no_spread():
    table = stats.compare_to_baseline({"b": {0: 70.0, 1: 71.0, 2: 72.0}, "same": {0: 70.0, 1: 71.0, 2: 72.0},
                                       "shift": {0: 71.0, 1: 72.0, 2: 73.0}}, "b")
    same, shift = table.loc["same"], table.loc["shift"]
    assert math.isnan(same["p_raw"]) and same["beyond_noise"] == "no" and "nothing to test" in same["comparison_note"]
    assert shift["p_raw"] == 0.0 and shift["beyond_noise"] == "yes" and "no spread" in shift["comparison_note"]
    assert math.isnan(shift["delta_ci_low"]) and math.isnan(shift["min_detectable"])
    # accuracies over 359 images: the same one-image gain per seed differs only by float rounding
    base, config = [100 * k / 359 for k in (250, 260, 270)], [100 * k / 359 for k in (251, 261, 271)]
    assert len(set(np.subtract(config, base))) > 1 and stats.paired_p(np.subtract(config, base)) == 0.0
    assert stats.welch_p([5, 5], [4, 4]) == 0.0 and math.isnan(stats.welch_p([5, 5], [5, 5]))
    assert stats.welch_p([1, 2, 3], [1, 2, 3]) == pytest.approx(1.0)
    low, high = stats.difference_interval([1.0, 2.0, 3.0], [5.0, 5.0, 5.0])     # one side without spread: defined
    assert low < -3.0 < high


def test_unknown_baseline():
    with pytest.raises(KeyError, match="baseline 'nope'"):
        stats.compare_to_baseline({"b": {0: 1.0}}, "nope")
