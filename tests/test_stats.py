"""stats: the Wilson interval against a published value and scipy, the t interval against scipy,
McNemar's exact test by hand."""

from __future__ import annotations

import math

import pytest
from scipy import stats as sp

from fmnist import stats


def test_wilson_against_a_published_value_and_scipy():
    # Newcombe (1998), Statistics in Medicine 17:857, table I: 81 of 263 -> 0.2553 to 0.3662
    lo, hi = stats.wilson(81, 263)
    assert (round(lo, 4), round(hi, 4)) == (0.2553, 0.3662)
    for k, n in ((0, 10), (10, 10), (9321, 10_000), (1, 3)):
        ci = sp.binomtest(k, n).proportion_ci(0.95, method="wilson")
        assert stats.wilson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-12), (k, n)
    assert stats.wilson(0, 10)[0] == pytest.approx(0, abs=1e-15) and stats.wilson(10, 10)[1] == 1
    with pytest.raises(ValueError):
        stats.wilson(0, 0)


def test_summary_is_the_t_interval_over_runs():
    values = [0.912, 0.917, 0.909, 0.915]
    s = stats.summary(values)
    mean = sum(values) / 4
    lo, hi = sp.t.interval(0.95, 3, loc=mean, scale=sp.sem(values))
    assert (s.n, s.kind) == (4, "t")
    assert s.mean == pytest.approx(mean) and s.sd == pytest.approx(sp.tstd(values))
    assert (s.lo, s.hi) == (pytest.approx(lo), pytest.approx(hi))
    assert s.contains(mean) and not s.contains(0) and s.half_width == pytest.approx((hi - lo) / 2)
    one = stats.summary([0.9])
    assert (one.n, one.kind, one.mean) == (1, "none", 0.9) and math.isnan(one.lo) and math.isnan(one.sd)
    with pytest.raises(ValueError):
        stats.summary([])


def test_prediction_interval_holds_one_more_run_95_percent_of_the_time():
    values = [0.912, 0.917, 0.909]
    mean, sd = sum(values) / 3, sp.tstd(values)
    assert stats.prediction(values) == pytest.approx(sp.t.interval(0.95, 2, loc=mean, scale=sd * math.sqrt(1 + 1 / 3)))
    s = stats.summary(values)
    lo, hi = stats.prediction(values)
    assert lo < s.lo and s.hi < hi  # wider than the interval of the mean
    # coverage: three runs, then a fourth from the same normal distribution, many times over
    import random

    rng = random.Random(0)
    trials, inside = 4000, 0
    for _ in range(trials):
        runs = [rng.gauss(0.9, 0.01) for _ in range(4)]
        lo, hi = stats.prediction(runs[:3])
        inside += lo <= runs[3] <= hi
    assert abs(inside / trials - 0.95) < 0.015
    with pytest.raises(ValueError):
        stats.prediction([0.9])


def test_accuracy_summary_over_seeds_or_over_the_test_images():
    over_seeds = stats.accuracy_summary([0.91, 0.92, 0.93], 10_000)
    assert over_seeds.kind == "t" and over_seeds == stats.summary([0.91, 0.92, 0.93])
    one = stats.accuracy_summary([0.9123], 10_000)
    ci = sp.binomtest(9123, 10_000).proportion_ci(0.95, method="wilson")
    assert (one.kind, one.n, one.mean) == ("wilson", 1, 0.9123)
    assert (one.lo, one.hi) == (pytest.approx(ci.low), pytest.approx(ci.high))


def test_from_se_is_the_normal_interval_of_one_mean():
    s = stats.from_se(0.30, 0.01)
    z = sp.norm.ppf(0.975)
    assert (s.kind, s.n) == ("se", 1)
    assert (s.lo, s.hi) == (pytest.approx(0.30 - z * 0.01), pytest.approx(0.30 + z * 0.01))


def test_mcnemar_exact_by_hand():
    a = [True, True, True, True, True, False, True, False]
    b = [False, False, False, True, False, True, True, False]
    t = stats.mcnemar(a, b)
    assert (t.only_a, t.only_b, t.both, t.neither, t.n) == (4, 1, 2, 1, 8)
    # two-sided exact: P(X <= 1) + P(X >= 4) for X ~ Bin(5, 1/2) = (1 + 5 + 5 + 1) / 32
    assert t.p_value == pytest.approx(12 / 32)
    assert stats.mcnemar([True] * 12, [False] * 12).p_value == pytest.approx(2 / 2 ** 12)
    assert stats.mcnemar([True, False], [True, False]).p_value == 1.0  # they never disagree
    with pytest.raises(ValueError, match="same images"):
        stats.mcnemar([True], [True, False])
