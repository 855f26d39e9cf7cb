"""Statistics for reporting (SPEC section 6). The game (episode id) is the unit: episodes of one
game under different seeds are not independent. A run's headline is the mean over games of the
per-game means over seeds, with a bootstrap interval over games (a resampled game keeps all its
seeds) and the std of the per-seed means beside it ("std over seeds"). Two runs are compared with
an exact McNemar test per seed and, over all seeds, a sign-flip permutation test and a paired
game-bootstrap interval on per-game means."""

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


def bootstrap_ci(values: Sequence[float], n_resamples: int = 10_000, seed: int = 0,
                 confidence: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``, resampled with replacement (seeded)."""
    d = np.asarray(values, dtype=float)
    if d.size == 0:
        raise ValueError("a bootstrap needs at least one value, got none")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    chunk = max(1, 4_000_000 // d.size)  # bound memory: at most ~4M indices at a time
    for start in range(0, n_resamples, chunk):
        stop = min(n_resamples, start + chunk)
        means[start:stop] = d[rng.integers(0, d.size, size=(stop - start, d.size))].mean(axis=1)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


def paired_bootstrap(scores_a: Sequence[float], scores_b: Sequence[float], n_resamples: int = 10_000,
                     seed: int = 0, confidence: float = 0.95) -> PairedDifference:
    """Percentile bootstrap of mean(B - A), resampling pairs with replacement (seeded, reproducible).
    Pass per-game means to resample games (SPEC section 6)."""
    a, b = np.asarray(scores_a, dtype=float), np.asarray(scores_b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired scores must have equal length, got {a.size} and {b.size}")
    if a.size == 0:
        raise ValueError("paired_bootstrap needs at least one pair, got none")
    d = b - a
    return PairedDifference(float(d.mean()), bootstrap_ci(d, n_resamples, seed, confidence), int(d.size),
                            n_resamples, seed)


def sign_flip_test(differences: Sequence[float], n_resamples: int = 100_000, seed: int = 0,
                   exact_up_to: int = 20) -> tuple[float, bool]:
    """Two-sided paired permutation test of mean(differences) = 0 by flipping signs.

    Under the null each paired difference is as likely negated, so p = P(|sum of randomly signed
    differences| >= |observed sum|). Exact (all 2^m sign patterns of the m non-zero differences) when
    m <= ``exact_up_to``, else a seeded Monte Carlo estimate (1 + hits) / (1 + n_resamples).
    Returns (p, exact)."""
    d = np.asarray(differences, dtype=float)
    d = d[d != 0]
    if d.size == 0:
        return 1.0, True
    observed = abs(d.sum())
    tol = 1e-9 * max(1.0, float(np.abs(d).sum()))  # float sums of equal magnitude compare equal
    if d.size <= exact_up_to:
        hits, total = 0, 1 << d.size
        bits = np.arange(d.size)
        for start in range(0, total, 1 << 16):
            codes = np.arange(start, min(total, start + (1 << 16)))
            signs = 1 - 2 * ((codes[:, None] >> bits) & 1)
            hits += int((np.abs(signs @ d) >= observed - tol).sum())
        return hits / total, True
    rng = np.random.default_rng(seed)
    hits = 0
    chunk = max(1, 4_000_000 // d.size)
    for start in range(0, n_resamples, chunk):
        signs = rng.choice((-1.0, 1.0), size=(min(chunk, n_resamples - start), d.size))
        hits += int((np.abs(signs @ d) >= observed - tol).sum())
    return (1 + hits) / (1 + n_resamples), False


# ---- the game as the unit (SPEC section 6) ----------------------------------------------------
def per_game(records: Sequence[dict], key: str) -> dict[str, dict[int, float]]:
    """``{episode_id: {seed: value}}`` of one metric (``success`` or ``score``) over episode records."""
    table: dict[str, dict[int, float]] = {}
    for r in records:
        table.setdefault(str(r["episode_id"]), {})[int(r["seed"])] = float(r[key])
    return table


@dataclass(frozen=True)
class GameEstimate:
    """A run's headline: ``mean`` over games of the per-game means over seeds, ``ci95`` from a bootstrap
    over games, ``std_over_seeds`` the sample std of the per-seed means (None with one seed)."""

    mean: float
    ci95: tuple[float, float]
    std_over_seeds: float | None
    per_seed: dict[int, float]
    n_games: int
    n_seeds: int


def game_estimate(table: dict[str, dict[int, float]], n_resamples: int = 10_000, seed: int = 0,
                  confidence: float = 0.95) -> GameEstimate:
    """The headline of ``table`` (from ``per_game``); each game weighs the same however many seeds it has."""
    if not table:
        raise ValueError("game_estimate needs at least one game, got none")
    game_means = [float(np.mean(list(seeds.values()))) for seeds in table.values()]
    by_seed: dict[int, list[float]] = {}
    for seeds in table.values():
        for s, v in seeds.items():
            by_seed.setdefault(s, []).append(v)
    per_seed = {s: float(np.mean(v)) for s, v in sorted(by_seed.items())}
    std = mean_std_ci(list(per_seed.values())).std if len(per_seed) > 1 else None
    return GameEstimate(float(np.mean(game_means)), bootstrap_ci(game_means, n_resamples, seed, confidence), std,
                        per_seed, len(table), len(per_seed))


@dataclass(frozen=True)
class PairedGames:
    """Run B against run A on the games both played: means over games (per-game means over the seeds
    both played), the game-bootstrap interval of mean(B - A) and the sign-flip p-value."""

    mean_a: float
    mean_b: float
    diff: PairedDifference
    p_value: float
    exact: bool
    n_games: int


def paired_games(table_a: dict[str, dict[int, float]], table_b: dict[str, dict[int, float]],
                 n_resamples: int = 10_000, seed: int = 0) -> PairedGames:
    """Pair two ``per_game`` tables on shared (game, seed) keys and test B - A over games."""
    pairs = [([table_a[g][s] for s in shared], [table_b[g][s] for s in shared])
             for g in sorted(set(table_a) & set(table_b)) if (shared := sorted(set(table_a[g]) & set(table_b[g])))]
    if not pairs:
        raise ValueError("the two runs share no (game, seed) pair")
    a = np.array([np.mean(x) for x, _ in pairs])
    b = np.array([np.mean(y) for _, y in pairs])
    p, exact = sign_flip_test(b - a, seed=seed)
    return PairedGames(float(a.mean()), float(b.mean()), paired_bootstrap(a, b, n_resamples, seed), p, exact, len(pairs))


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
