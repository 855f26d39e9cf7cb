"""Aggregate episode records into a run summary (docs/run-format.md, SPEC section 6).

The game (episode id) is the unit: success and score are averaged over seeds per game, the
headline is the mean over games with a 95% bootstrap interval over games (a resampled game keeps
all its seeds), and the std of the per-seed means is reported beside it as "std over seeds".
Episodes recorded as errors count as failures with score 0 (they are also counted in ``n_errors``).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any, Iterable

from sage_models.policy import CUT, FINISH_REASONS
from sage_evals.stats import game_estimate, per_game
from sage_gym.formatting import INVALID_REASONS

CUT_CAUSE = "cut_at_token_limit"  # an invalid turn whose generation hit max_new_tokens or the context window


def metric_summary(records: list[dict], key: str) -> dict[str, Any]:
    """mean (over games), ci95 (bootstrap over games), std_over_seeds, per_seed means of one metric."""
    if not records:
        return {"mean": None, "ci95": None, "std_over_seeds": None, "per_seed": {}, "n_games": 0, "n_seeds": 0,
                "interval": "no episodes"}
    est = game_estimate(per_game(records, key))
    return {"mean": est.mean, "ci95": list(est.ci95), "std_over_seeds": est.std_over_seeds,
            "per_seed": {str(s): m for s, m in est.per_seed.items()}, "n_games": est.n_games, "n_seeds": est.n_seeds,
            "interval": f"bootstrap over {est.n_games} games, seeds kept together"}


def task_type_summary(records: list[dict]) -> dict[str, Any]:
    """Episodes, games, and success/score means over games with their game-bootstrap intervals."""
    success, score = metric_summary(records, "success"), metric_summary(records, "score")
    return {"n": len(records), "games": success["n_games"], "success": success["mean"], "success_ci95": success["ci95"],
            "score": score["mean"], "score_ci95": score["ci95"]}


def turn_counts(records: list[dict]) -> dict[str, Any]:
    """Model turns by how the generation ended, and invalid turns by cause: a turn cut at the token or
    context limit counts as ``cut_at_token_limit`` whatever the env said, apart from a model that
    finished its response without a usable action (``empty``/``unparseable``/``schema_violation``)."""
    finish = dict.fromkeys(FINISH_REASONS, 0)
    causes = dict.fromkeys((CUT_CAUSE, *INVALID_REASONS), 0)
    for r in records:
        for reason, n in (r.get("finish_reasons") or {}).items():
            finish[reason] = finish.get(reason, 0) + n
        cut = r.get("cut_invalid_turns") or {}
        causes[CUT_CAUSE] += sum(cut.values())
        for k, v in (r.get("invalid_turns") or {}).items():
            causes[k] = causes.get(k, 0) + int(v) - int(cut.get(k, 0))
    return {"finish": finish, "invalid_causes": causes}


def summarize(records: Iterable[dict], settings: dict, timing: dict | None = None) -> dict[str, Any]:
    """The summary.json object of a run from its episode records."""
    records = list(records)
    by_type: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_type[r.get("task_type") or "unknown"].append(r)
    turns = sum(r["turns"] for r in records)
    counts = turn_counts(records)
    cut = sum(counts["finish"][k] for k in CUT)
    ends: dict[str, int] = defaultdict(int)
    for r in records:
        ends[r.get("end_reason") or ("terminated" if r.get("terminated") else "turn_cap")] += 1
    return {
        "settings": settings,
        "n_episodes": len(records),
        "n_errors": sum(1 for r in records if r.get("error")),
        "errors_by_cause": dict(Counter(r.get("error_cause") or "unknown" for r in records if r.get("error"))),
        "success": metric_summary(records, "success"),
        "score": metric_summary(records, "score"),
        "per_task_type": {t: task_type_summary(rs) for t, rs in sorted(by_type.items())},
        "invalid_rate": {k: (sum(r["invalid_turns"].get(k, 0) for r in records) / turns if turns else 0.0)
                         for k in INVALID_REASONS},
        "invalid_causes": {k: v / turns if turns else 0.0 for k, v in counts["invalid_causes"].items()},
        "finish_reasons": counts["finish"],
        "cut_at_token_limit": {"turns": cut, "rate": cut / turns if turns else 0.0,
                               "invalid": counts["invalid_causes"][CUT_CAUSE]},
        "end_reasons": dict(ends),
        "turns_mean": turns / len(records) if records else 0.0,
        "tokens": {"prompt": sum(r["prompt_tokens"] for r in records),
                   "completion": sum(r["completion_tokens"] for r in records)},
        "timing": timing or {},
    }
