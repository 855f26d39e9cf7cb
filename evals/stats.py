"""Statistics for reporting (SPEC section 5): mean/std/95% t-interval over seeds, the exact
McNemar test on paired success and a paired bootstrap interval on a score difference."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Estimate:
    """A mean with its sample std and t-interval; ``std``/``ci95`` are None with fewer than 2 values."""

    mean: float
    std: float | None
    ci95: tuple[float, float] | None
    n: int


def mean_std_ci(values: Sequence[float], confidence: float = 0.95) -> Estimate:
    """Mean, sample std (ddof=1) and the Student-t interval of the mean, e.g. over per-seed rates."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("mean_std_ci needs at least one value, got none")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    mean = float(x.mean())
    if x.size < 2:
        return Estimate(mean, None, None, 1)
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, df=x.size - 1)) * std / math.sqrt(x.size)
    return Estimate(mean, std, (mean - half, mean + half), int(x.size))


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test on paired outcomes.

    ``b``: pairs where A succeeded and B failed; ``c``: A failed and B succeeded;
    ``p_value``: two-sided exact binomial p-value of b against Binomial(b + c, 1/2).
    """

    b: int
    c: int
    both: int
    neither: int
    p_value: float

    @property
    def n(self) -> int:
        return self.b + self.c + self.both + self.neither


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts: min(1, 2 P[X <= min(b, c)]), X ~ Bin(b+c, 1/2)."""
    from scipy import stats

    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    if b + c == 0:
        return 1.0
    return float(min(1.0, 2.0 * stats.binom.cdf(min(b, c), b + c, 0.5)))


def mcnemar(success_a: Sequence[bool], success_b: Sequence[bool]) -> McNemar:
    """Exact McNemar test on two aligned sequences of paired successes."""
    a, b_ = np.asarray(success_a, dtype=bool), np.asarray(success_b, dtype=bool)
    if a.shape != b_.shape:
        raise ValueError(f"paired outcomes must have equal length, got {a.size} and {b_.size}")
    b, c = int((a & ~b_).sum()), int((~a & b_).sum())
    return McNemar(b=b, c=c, both=int((a & b_).sum()), neither=int((~a & ~b_).sum()), p_value=mcnemar_exact_p(b, c))


@dataclass(frozen=True)
class PairedDifference:
    """The mean paired difference ``B - A`` with its percentile bootstrap interval."""

    diff: float
    ci95: tuple[float, float]
    n: int
    n_resamples: int
    seed: int


def paired_bootstrap(scores_a: Sequence[float], scores_b: Sequence[float], n_resamples: int = 10_000,
                     seed: int = 0, confidence: float = 0.95) -> PairedDifference:
    """Percentile bootstrap of mean(B - A), resampling pairs with replacement (seeded, reproducible)."""
    a, b = np.asarray(scores_a, dtype=float), np.asarray(scores_b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired scores must have equal length, got {a.size} and {b.size}")
    if a.size == 0:
        raise ValueError("paired_bootstrap needs at least one pair, got none")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    d = b - a
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    chunk = max(1, 4_000_000 // d.size)  # bound memory: at most ~4M indices at a time
    for start in range(0, n_resamples, chunk):
        stop = min(n_resamples, start + chunk)
        means[start:stop] = d[rng.integers(0, d.size, size=(stop - start, d.size))].mean(axis=1)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return PairedDifference(float(d.mean()), (float(lo), float(hi)), int(d.size), n_resamples, seed)


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counting half
    (the Mann-Whitney U statistic over n_pos * n_neg); None without both classes."""
    from scipy.stats import rankdata

    s, y = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
