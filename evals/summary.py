"""Aggregate episode records into a run summary (docs/run-format.md, SPEC section 5).

Over >= 2 seeds: mean, std and a t-interval over the per-seed means. With one seed: the
std over episodes and an interval over episodes (Wilson for success, a percentile bootstrap
for score). Each metric says which in ``interval``. Episodes recorded as errors count as
failures with score 0 (they are also counted in ``n_errors``).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from statistics import mean, stdev
from typing import Any, Iterable

from sage_evals.stats import mean_std_ci, paired_bootstrap
from sage_gym.formatting import INVALID_REASONS


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion."""
    from scipy import stats

    if n == 0:
        return 0.0, 1.0
    z = stats.norm.ppf(0.5 + level / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # the interval holds p; float rounding can put an end a hair past it (e.g. 2.8e-17 for 0 of 6)
    return min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half))


def bootstrap_interval(values: list[float], level: float = 0.95, resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval for the mean (fixed seed: the summary is reproducible): the
    paired bootstrap of ``values`` against zeros."""
    return paired_bootstrap([0.0] * len(values), values, n_resamples=resamples, seed=seed, confidence=level).ci95


def metric_summary(records: list[dict], key: str, binary: bool) -> dict[str, Any]:
    """mean/std/ci95/per_seed of one metric (``success`` or ``score``)."""
    per_seed: dict[int, list[float]] = defaultdict(list)
    for r in records:
        per_seed[r["seed"]].append(float(r[key]))
    seed_means = {s: mean(v) for s, v in sorted(per_seed.items())}
    out: dict[str, Any] = {"per_seed": {str(s): m for s, m in seed_means.items()}}
    if len(seed_means) >= 2:
        est = mean_std_ci(list(seed_means.values()))
        out.update(mean=est.mean, std=est.std, ci95=list(est.ci95), interval=f"t over {est.n} per-seed means")
    else:
        values = [float(r[key]) for r in records]
        if not values:
            return {**out, "mean": None, "std": None, "ci95": None, "interval": "no episodes"}
        ci = wilson_interval(int(sum(values)), len(values)) if binary else bootstrap_interval(values)
        out.update(mean=mean(values), std=stdev(values) if len(values) > 1 else 0.0, ci95=list(ci),
                   interval=("wilson" if binary else "bootstrap") + f" over {len(values)} episodes (one seed; std over episodes)")
    return out


def summarize(records: Iterable[dict], settings: dict, timing: dict | None = None) -> dict[str, Any]:
    """The summary.json object of a run from its episode records."""
    records = list(records)
    by_type: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_type[r.get("task_type") or "unknown"].append(r)
    turns = sum(r["turns"] for r in records)
    return {
        "settings": settings,
        "n_episodes": len(records),
        "n_errors": sum(1 for r in records if r.get("error")),
        "errors_by_cause": dict(Counter(r.get("error_cause") or "unknown" for r in records if r.get("error"))),
        "success": metric_summary(records, "success", binary=True),
        "score": metric_summary(records, "score", binary=False),
        "per_task_type": {t: {"n": len(rs), "success": mean(float(r["success"]) for r in rs),
                              "score": mean(float(r["score"]) for r in rs)} for t, rs in sorted(by_type.items())},
        "invalid_rate": {k: (sum(r["invalid_turns"].get(k, 0) for r in records) / turns if turns else 0.0)
                         for k in INVALID_REASONS},
        "turns_mean": turns / len(records) if records else 0.0,
        "tokens": {"prompt": sum(r["prompt_tokens"] for r in records),
                   "completion": sum(r["completion_tokens"] for r in records)},
        "timing": timing or {},
    }
