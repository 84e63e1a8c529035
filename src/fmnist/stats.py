"""Intervals and tests for comparing figures: a difference is a result only with its interval.

- ``wilson``: the 95% interval of one accuracy, k right out of n test images (one run, test-set noise).
- ``summary``: n, mean, standard deviation and the 95% t interval of a figure over runs (seeds).
- ``from_se``: the normal interval of one run's mean over its test images, from its standard error.
- ``prediction``: where one more run of the same setting falls, 95% of the time (for a figure from
  elsewhere, e.g. a published one, set against this project's runs).
- ``mcnemar``: McNemar's exact test of two classifiers scored on the same test images.

scipy (installed with MLflow) gives the t and binomial distributions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

LEVEL = 0.95


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    sd: float  # sample standard deviation (n - 1); nan when n < 2
    lo: float  # the interval; nan when there is none
    hi: float
    kind: str  # "t" (over runs), "wilson" (one accuracy over the test images), "se" (one mean) or "none"

    def contains(self, value: float) -> bool:
        return self.lo <= value <= self.hi

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2


def wilson(k: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """The Wilson score interval of a proportion k/n (good near 0 and 1, unlike mean +- 1.96 se)."""
    if n <= 0:
        raise ValueError("wilson: n must be positive")
    z = _z(level)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def summary(values: Iterable[float], level: float = LEVEL) -> Summary:
    """Mean, sd and the t interval of the mean over independent runs; no interval for one run."""
    v = [float(x) for x in values]
    n = len(v)
    if n == 0:
        raise ValueError("summary: no values")
    mean = sum(v) / n
    if n < 2:
        return Summary(n, mean, math.nan, math.nan, math.nan, "none")
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))
    half = _t(level, n - 1) * sd / math.sqrt(n)
    return Summary(n, mean, sd, mean - half, mean + half, "t")


def prediction(values: Sequence[float], level: float = LEVEL) -> tuple[float, float]:
    """The t prediction interval of one more run: mean +- t * sd * sqrt(1 + 1/n), over n >= 2 runs.
    Wider than the interval of the mean, since the new run brings its own seed's spread."""
    v = [float(x) for x in values]
    s = summary(v, level)
    if s.n < 2:
        raise ValueError("prediction: at least two runs are needed")
    half = _t(level, s.n - 1) * s.sd * math.sqrt(1 + 1 / s.n)
    return s.mean - half, s.mean + half


def accuracy_summary(accuracies: Sequence[float], n_test: int, level: float = LEVEL) -> Summary:
    """Over seeds when there are two runs or more (t interval); for one run, the Wilson interval of
    its accuracy on ``n_test`` images, which is all the noise one run can show."""
    if len(accuracies) >= 2:
        return summary(accuracies, level)
    acc = float(accuracies[0])
    lo, hi = wilson(round(acc * n_test), n_test, level)
    return Summary(1, acc, math.nan, lo, hi, "wilson")


def from_se(mean: float, se: float, level: float = LEVEL) -> Summary:
    """One run's mean over its test images +- z * its standard error (the images' noise, not the seed's)."""
    half = _z(level) * se
    return Summary(1, float(mean), math.nan, mean - half, mean + half, "se")


@dataclass(frozen=True)
class McNemar:
    only_a: int  # images A got right and B got wrong
    only_b: int  # images B got right and A got wrong
    both: int
    neither: int
    p_value: float  # exact two-sided: binomial test of only_a against only_a + only_b at 1/2

    @property
    def n(self) -> int:
        return self.only_a + self.only_b + self.both + self.neither


def mcnemar(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> McNemar:
    """McNemar's exact test from two classifiers' right/wrong on the same images, in the same order."""
    from scipy.stats import binomtest

    if len(correct_a) != len(correct_b):
        raise ValueError(f"mcnemar: {len(correct_a)} against {len(correct_b)} predictions; "
                         "both must score the same images")
    only_a = sum(1 for a, b in zip(correct_a, correct_b) if a and not b)
    only_b = sum(1 for a, b in zip(correct_a, correct_b) if b and not a)
    both = sum(1 for a, b in zip(correct_a, correct_b) if a and b)
    discordant = only_a + only_b
    p = binomtest(only_a, discordant, 0.5).pvalue if discordant else 1.0
    return McNemar(only_a, only_b, both, len(correct_a) - discordant - both, float(p))


def _z(level: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + level / 2)


def _t(level: float, dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, dof))
