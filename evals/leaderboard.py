"""Read `sage evaluate` run folders (docs/run-format.md) into leaderboard rows and paired comparisons.

Metrics are recomputed from ``episodes.jsonl`` so that a run still in progress (no
``summary.json`` yet) is reported the same way as a finished one.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sage_evals.stats import McNemar, PairedDifference, mcnemar, paired_bootstrap
from sage_gym.durable import RunFileError, read_jsonl
from sage_gym.errors import SageError

INVALID_REASONS = ("empty", "unparseable", "schema_violation")


class RunFormatError(SageError):
    """A run folder that cannot be read (missing or malformed files)."""


@dataclass
class Run:
    """One evaluation run: its settings (``run.json``) and its episode records (one per (episode_id, seed))."""

    path: Path
    settings: dict[str, Any]
    episodes: list[dict[str, Any]]
    summary: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def model(self) -> str:
        return str(self.settings.get("model", "?"))

    @property
    def env_id(self) -> str:
        return str(self.settings.get("env_id", "?"))

    @property
    def created(self) -> str:
        return str(self.settings.get("created", ""))

    def by_key(self) -> dict[tuple[str, int], dict[str, Any]]:
        return {(e["episode_id"], int(e["seed"])): e for e in self.episodes}


def _read_episodes(path: Path) -> list[dict[str, Any]]:
    """Episode lines; a torn last line (a run killed mid-write) is skipped, a broken middle line or a line that
    is not a JSON object is an error."""
    try:
        rows = read_jsonl(path, repair=False)  # read only: a run may still be writing the file
    except RunFileError as err:
        raise RunFormatError(f"{err}; every line must be one episode record") from None
    records: dict[tuple[str, int], dict[str, Any]] = {}
    for n, record in enumerate(rows, 1):
        missing = [k for k in ("episode_id", "seed", "success", "score") if k not in record]
        if missing:
            raise RunFormatError(f"{path}: record {n} lacks {', '.join(missing)}; see docs/run-format.md")
        records[(record["episode_id"], int(record["seed"]))] = record  # a repeated key keeps the last
    return list(records.values())


def load_run(path: str | Path) -> Run:
    """Read one run folder (``run.json``, ``episodes.jsonl``, optional ``summary.json``)."""
    path = Path(path)
    settings_file = path / "run.json"
    if not settings_file.is_file():
        raise RunFormatError(f"{path} is not a run folder: it has no run.json (written by `sage evaluate --out DIR`)")
    try:
        settings = json.loads(settings_file.read_text(encoding="utf-8"))
        summary_file = path / "summary.json"
        summary = json.loads(summary_file.read_text(encoding="utf-8")) if summary_file.is_file() else None
    except json.JSONDecodeError as err:
        raise RunFormatError(f"{path}: {err.msg} in run.json or summary.json") from None
    return Run(path, settings, _read_episodes(path / "episodes.jsonl"), summary)


def find_runs(paths: list[str | Path]) -> list[Run]:
    """Runs from each path: a run folder itself or any folder holding run folders (searched recursively)."""
    runs: list[Run] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise RunFormatError(f"{p} is not a folder; pass run folders or folders of run folders")
        folders = [p] if (p / "run.json").is_file() else sorted(f.parent for f in p.rglob("run.json"))
        if not folders:
            raise RunFormatError(f"no run folders (folders with a run.json) under {p}")
        runs.extend(load_run(f) for f in folders)
    return runs


# ---- leaderboard ----------------------------------------------------------------------
@dataclass
class Row:
    """One leaderboard row: a run's success/score over seeds and its turn statistics."""

    run: str
    model: str
    env_id: str
    success_mean: float
    success_std: float | None
    success_ci95: tuple[float, float] | None
    score_mean: float
    episodes: int
    seeds: list[int]
    invalid_rate: float
    errors: int
    date: str
    per_task_type: dict[str, dict[str, float]] = field(default_factory=dict)
    per_seed: dict[int, float] = field(default_factory=dict)
    interval: str = ""  # how success_ci95 was computed (t over seeds, or over episodes with one seed)


def run_row(run: Run) -> Row:
    """Aggregate one run with the same statistics as its summary.json (sage_evals.summary): success
    mean/std/CI over per-seed rates (over episodes when there is one seed), score, invalid rate per turn."""
    from sage_evals.summary import metric_summary

    eps = run.episodes
    if not eps:
        return Row(run.name, run.model, run.env_id, float("nan"), None, None, float("nan"), 0, [], float("nan"), 0,
                   run.created[:10])
    success, score = metric_summary(eps, "success", binary=True), metric_summary(eps, "score", binary=False)
    turns = sum(int(e.get("turns", 0)) for e in eps)
    invalid = sum(sum(int(v) for v in (e.get("invalid_turns") or {}).values()) for e in eps)
    types: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in eps:
        types[e.get("task_type") or "unknown"].append(e)
    per_type = {t: {"n": len(v), "success": sum(bool(e["success"]) for e in v) / len(v),
                    "score": sum(float(e["score"]) for e in v) / len(v)} for t, v in sorted(types.items())}
    return Row(run=run.name, model=run.model, env_id=run.env_id, success_mean=success["mean"],
               success_std=success["std"], success_ci95=tuple(success["ci95"]) if success["ci95"] else None,
               score_mean=score["mean"], episodes=len(eps), seeds=sorted({int(e["seed"]) for e in eps}),
               invalid_rate=invalid / turns if turns else 0.0, errors=sum(1 for e in eps if e.get("error")),
               date=run.created[:10], per_task_type=per_type,
               per_seed={int(s): v for s, v in success["per_seed"].items()}, interval=success.get("interval", ""))


def leaderboard(runs: list[Run]) -> list[Row]:
    """Rows grouped by env, best success first."""
    rows = [run_row(r) for r in runs]
    return sorted(rows, key=lambda r: (r.env_id, math.isnan(r.success_mean), -r.success_mean if r.episodes else 0, r.model))


COLUMNS = ("model", "env", "success", "95% CI", "score", "episodes", "seeds", "invalid rate", "errors", "date", "run")


def _pct(x: float | None) -> str:
    return "–" if x is None or x != x else f"{100 * x:.1f}"


def row_cells(row: Row) -> list[str]:
    """A row as display strings (percentages)."""
    std = f" ± {_pct(row.success_std)}" if row.success_std is not None else ""
    ci = f"[{_pct(row.success_ci95[0])}, {_pct(row.success_ci95[1])}]" if row.success_ci95 else "–"
    return [row.model, row.env_id, f"{_pct(row.success_mean)}{std}", ci, _pct(row.score_mean), str(row.episodes),
            ",".join(map(str, row.seeds)), _pct(row.invalid_rate), str(row.errors), row.date, row.run]


def to_markdown(header: list[str] | tuple[str, ...], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def leaderboard_csv(rows: list[Row]) -> str:
    """Machine-readable CSV with raw fractions (not percentages)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["model", "env_id", "success_mean", "success_std", "success_ci95_lo", "success_ci95_hi", "score_mean",
                "episodes", "seeds", "invalid_rate", "errors", "date", "run"])
    for r in rows:
        ci = r.success_ci95 or ("", "")
        w.writerow([r.model, r.env_id, r.success_mean, "" if r.success_std is None else r.success_std, ci[0], ci[1],
                    r.score_mean, r.episodes, " ".join(map(str, r.seeds)), r.invalid_rate, r.errors, r.date, r.run])
    return buf.getvalue()


# ---- paired comparison ------------------------------------------------------------------
@dataclass
class PairedResult:
    """Run B against run A on shared (episode_id, seed) pairs: McNemar on success, bootstrap on score (B - A)."""

    group: str
    n: int
    success_a: float
    success_b: float
    mcnemar: McNemar
    score_a: float
    score_b: float
    score_diff: PairedDifference


@dataclass
class Comparison:
    run_a: str
    run_b: str
    env_id: str
    only_a: int
    only_b: int
    results: list[PairedResult]  # overall first, then one per task type


def _paired(group: str, pairs: list[tuple[dict, dict]], n_resamples: int, seed: int) -> PairedResult:
    sa, sb = [bool(a["success"]) for a, _ in pairs], [bool(b["success"]) for _, b in pairs]
    xa, xb = [float(a["score"]) for a, _ in pairs], [float(b["score"]) for _, b in pairs]
    n = len(pairs)
    return PairedResult(group, n, sum(sa) / n, sum(sb) / n, mcnemar(sa, sb), sum(xa) / n, sum(xb) / n,
                        paired_bootstrap(xa, xb, n_resamples=n_resamples, seed=seed))


def compare(run_a: Run, run_b: Run, n_resamples: int = 10_000, seed: int = 0) -> Comparison:
    """Pair two runs on their shared (episode_id, seed) keys; refuse runs on different envs or with no shared pair."""
    if run_a.env_id != run_b.env_id:
        raise SageError(f"cannot compare runs on different envs: {run_a.path} is on {run_a.env_id}, "
                        f"{run_b.path} is on {run_b.env_id}; compare two runs of the same env and panel")
    ka, kb = run_a.by_key(), run_b.by_key()
    shared = sorted(set(ka) & set(kb))
    if not shared:
        raise SageError(f"{run_a.path} ({len(ka)} episodes) and {run_b.path} ({len(kb)} episodes) share no "
                        "(episode_id, seed) pair; evaluate both on the same panel and seeds")
    pairs = [(ka[k], kb[k]) for k in shared]
    results = [_paired("overall", pairs, n_resamples, seed)]
    by_type: dict[str, list[tuple[dict, dict]]] = defaultdict(list)
    for a, b in pairs:
        by_type[a.get("task_type") or "?"].append((a, b))
    if len(by_type) > 1:
        results += [_paired(t, p, n_resamples, seed) for t, p in sorted(by_type.items())]
    return Comparison(run_a.name, run_b.name, run_a.env_id, len(ka) - len(shared), len(kb) - len(shared), results)


COMPARE_COLUMNS = ("group", "pairs", "success A", "success B", "b", "c", "McNemar p", "score A", "score B",
                   "score B-A", "95% CI")


def comparison_cells(r: PairedResult) -> list[str]:
    d = r.score_diff
    return [r.group, str(r.n), _pct(r.success_a), _pct(r.success_b), str(r.mcnemar.b), str(r.mcnemar.c),
            f"{r.mcnemar.p_value:.3g}", _pct(r.score_a), _pct(r.score_b), f"{100 * d.diff:+.1f}",
            f"[{100 * d.ci95[0]:+.1f}, {100 * d.ci95[1]:+.1f}]"]


def comparison_json(c: Comparison) -> dict[str, Any]:
    return {"run_a": c.run_a, "run_b": c.run_b, "env_id": c.env_id, "only_a": c.only_a, "only_b": c.only_b,
            "results": [{"group": r.group, "n": r.n, "success_a": r.success_a, "success_b": r.success_b,
                         "mcnemar": {"b": r.mcnemar.b, "c": r.mcnemar.c, "both": r.mcnemar.both,
                                     "neither": r.mcnemar.neither, "p_value": r.mcnemar.p_value},
                         "score_a": r.score_a, "score_b": r.score_b,
                         "score_diff": {"mean": r.score_diff.diff, "ci95": list(r.score_diff.ci95),
                                        "n_resamples": r.score_diff.n_resamples, "seed": r.score_diff.seed}}
                        for r in c.results]}
