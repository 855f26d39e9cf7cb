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

from sage_models import SCRIPTED
from sage_evals.stats import McNemar, PairedGames, mcnemar, paired_games, per_game
from sage_evals.summary import metric_summary, task_type_summary, turn_counts
from sage_gym.durable import RunFileError, read_jsonl
from sage_gym.errors import SageError


class RunFormatError(SageError):
    """A run folder that cannot be read (missing or malformed files)."""


@dataclass
class Run:
    """One evaluation run: its settings (``run.json``) and its episode records (one per (episode_id, seed)).
    ``name`` tells runs apart in tables: the folder's path under the folder searched (default: its name)."""

    path: Path
    settings: dict[str, Any]
    episodes: list[dict[str, Any]]
    summary: dict[str, Any] | None = None
    name: str = ""

    def __post_init__(self) -> None:
        self.name = self.name or self.path.name

    @property
    def scripted(self) -> bool:
        """A scripted agent (expert, random): it reads no prompt, so decoding settings do not apply."""
        return self.settings.get("model_kind") in SCRIPTED

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
    """Runs from each path: a run folder itself or any folder holding run folders (searched recursively).
    Each run is named by its path below the folder given (a run folder given itself: its own name), with
    as many parent folders as it takes to tell apart runs that would otherwise share a name."""
    found: list[tuple[Path, str]] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise RunFormatError(f"{p} is not a folder; pass run folders or folders of run folders")
        folders = [p] if (p / "run.json").is_file() else sorted(f.parent for f in p.rglob("run.json"))
        if not folders:
            raise RunFormatError(f"no run folders (folders with a run.json) under {p}")
        found += [(f, f.relative_to(p).as_posix() if f != p else p.name) for f in folders]
    names = _distinct_names(found)
    runs = []
    for (folder, _), name in zip(found, names):
        run = load_run(folder)
        run.name = name
        runs.append(run)
    return runs


def _distinct_names(found: list[tuple[Path, str]]) -> list[str]:
    """The given names; names shared by several folders are lengthened with parent folders until they differ."""
    names = [name for _, name in found]
    parts = [folder.resolve().parts for folder, _ in found]
    used = [len(Path(name).parts) for name in names]
    while True:
        counts = defaultdict(int)
        for name in names:
            counts[name] += 1
        clashing = [k for k, name in enumerate(names) if counts[name] > 1 and used[k] < len(parts[k]) - 1]
        if not clashing:
            return names
        for k in clashing:
            used[k] += 1
            names[k] = "/".join(parts[k][-used[k]:])


# ---- leaderboard ----------------------------------------------------------------------
@dataclass
class Row:
    """One leaderboard row: a run's headline over games (SPEC section 6) and its turn statistics."""

    run: str
    model: str
    env_id: str
    label: str  # the model and the settings that tell it apart from the other runs shown with it
    success_mean: float  # mean over games of per-game success over seeds
    success_ci95: tuple[float, float] | None  # bootstrap over games, seeds kept together
    success_std_over_seeds: float | None  # std of the per-seed means (None with one seed)
    score_mean: float
    score_ci95: tuple[float, float] | None
    episodes: int
    games: int
    seeds: list[int]
    invalid_rate: float
    cut_rate: float  # turns whose generation was cut at max_new_tokens or the context window
    errors: int
    date: str
    per_task_type: dict[str, dict[str, Any]] = field(default_factory=dict)
    per_seed: dict[int, float] = field(default_factory=dict)
    interval: str = ""


def run_row(run: Run, label: str | None = None) -> Row:
    """Aggregate one run with the statistics of its summary.json (``sage_evals.summary``)."""
    eps = run.episodes
    label = label or run.model
    if not eps:
        return Row(run.name, run.model, run.env_id, label, float("nan"), None, None, float("nan"), None, 0, 0, [],
                   float("nan"), float("nan"), 0, run.created[:10])
    success, score = metric_summary(eps, "success"), metric_summary(eps, "score")
    turns = sum(int(e.get("turns", 0)) for e in eps)
    invalid = sum(sum(int(v) for v in (e.get("invalid_turns") or {}).values()) for e in eps)
    finish = turn_counts(eps)["finish"]
    types: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in eps:
        types[e.get("task_type") or "unknown"].append(e)
    return Row(run=run.name, model=run.model, env_id=run.env_id, label=label, success_mean=success["mean"],
               success_ci95=tuple(success["ci95"]), success_std_over_seeds=success["std_over_seeds"],
               score_mean=score["mean"], score_ci95=tuple(score["ci95"]), episodes=len(eps), games=success["n_games"],
               seeds=sorted({int(e["seed"]) for e in eps}), invalid_rate=invalid / turns if turns else 0.0,
               cut_rate=(finish["length"] + finish["context"]) / turns if turns else 0.0,
               errors=sum(1 for e in eps if e.get("error")), date=run.created[:10],
               per_task_type={t: task_type_summary(v) for t, v in sorted(types.items())},
               per_seed={int(s): v for s, v in success["per_seed"].items()}, interval=success["interval"])


def leaderboard(runs: list[Run]) -> list[Row]:
    """Rows grouped by env, best success first; labels name each run by model and distinguishing settings."""
    labels = run_labels(runs)
    rows = [run_row(r, labels[r.name]) for r in runs]
    return sorted(rows, key=lambda r: (r.env_id, math.isnan(r.success_mean), -r.success_mean if r.episodes else 0, r.model))


# ---- what a run is, and which runs can be compared ------------------------------------------
def settings_terms(run: Run) -> dict[str, str]:
    """The settings that shape a run's numbers, as short ``name=value`` terms (no decoding for scripted agents)."""
    s = run.settings
    terms: dict[str, str] = {}
    if not run.scripted:
        d = s.get("decoding") or {}
        terms["decoding"] = ", ".join(f"{short}={d[k]}" for k, short in (("temperature", "T"), ("top_p", "top_p"),
                                      ("top_k", "top_k"), ("max_new_tokens", "max_new")) if d.get(k) is not None)
        prompt = s.get("prompt") or {}
        if prompt.get("fewshot"):
            terms["fewshot"] = f"{prompt['fewshot']}-shot"
        if prompt.get("system_prompt"):
            terms["system"] = f"system prompt {prompt.get('sha256', '')[:6]}"
    terms["turns"] = f"turn cap {s.get('max_turns')}"
    if s.get("history_window"):
        terms["window"] = f"window {s['history_window']}"
    terms["panel"] = f"{len(s.get('panel') or [])} games" if s.get("limit") else "full panel"
    return terms


def run_labels(runs: list[Run]) -> dict[str, str]:
    """A legend name per run: its model, plus the settings that differ among runs of that model (the
    folder name only where two runs of one env would still read the same)."""
    by_model: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        by_model[r.model].append(r)
    labels: dict[str, str] = {}
    for model, group in by_model.items():
        terms = {r.name: settings_terms(r) for r in group}
        varying = [k for k in dict.fromkeys(k for t in terms.values() for k in t)
                   if len({t.get(k) for t in terms.values()}) > 1]
        for r in group:
            extra = "; ".join(terms[r.name][k] for k in varying if k in terms[r.name])
            labels[r.name] = f"{model} ({extra})" if extra else model
    env = {r.name: r.env_id for r in runs}  # runs are shown by env: a label need only be unique within one
    counts = defaultdict(int)
    for name, label in labels.items():
        counts[env[name], label] += 1
    return {name: f"{label} [{name}]" if counts[env[name], label] > 1 else label for name, label in labels.items()}


def comparable_key(run: Run) -> tuple:
    """Runs with equal keys can be compared pair by pair: same env, panel (hence limit) and turn cap."""
    s = run.settings
    return run.env_id, s.get("panel_sha256"), s.get("max_turns")


def incomparable(a: Run, b: Run) -> list[str]:
    """Why ``b``'s numbers cannot be set against ``a``'s (empty: they can)."""
    sa, sb = a.settings, b.settings
    why = []
    if a.env_id != b.env_id:
        why.append(f"env {b.env_id} vs {a.env_id}")
    elif sa.get("panel_sha256") != sb.get("panel_sha256"):
        why.append(f"panel differs ({len(sb.get('panel') or [])} vs {len(sa.get('panel') or [])} games"
                   + (", another --limit" if sa.get("limit") != sb.get("limit") else "") + ")")
    if sa.get("max_turns") != sb.get("max_turns"):
        why.append(f"turn cap {sb.get('max_turns')} vs {sa.get('max_turns')}")
    if not (a.scripted or b.scripted) and sa.get("decoding") != sb.get("decoding"):
        why.append(f"decoding {settings_terms(b)['decoding']} vs {settings_terms(a)['decoding']}")
    return why


COLUMNS = ("model", "env", "success", "95% CI", "std over seeds", "score", "games", "seeds", "invalid rate",
           "cut at limit", "errors", "date", "run")


def _pct(x: float | None) -> str:
    return "–" if x is None or x != x else f"{100 * x:.1f}"


def _ci(ci: tuple[float, float] | list[float] | None, signed: bool = False) -> str:
    if not ci:
        return "–"
    fmt = "{:+.1f}" if signed else "{:.1f}"
    return f"[{fmt.format(100 * ci[0])}, {fmt.format(100 * ci[1])}]"


def row_cells(row: Row) -> list[str]:
    """A row as display strings (percentages)."""
    return [row.label, row.env_id, _pct(row.success_mean), _ci(row.success_ci95), _pct(row.success_std_over_seeds),
            _pct(row.score_mean), str(row.games), ",".join(map(str, row.seeds)), _pct(row.invalid_rate),
            _pct(row.cut_rate), str(row.errors), row.date, row.run]


def to_markdown(header: list[str] | tuple[str, ...], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def leaderboard_csv(rows: list[Row]) -> str:
    """Machine-readable CSV with raw fractions (not percentages)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["model", "label", "env_id", "success_mean", "success_ci95_lo", "success_ci95_hi",
                "success_std_over_seeds", "score_mean", "episodes", "games", "seeds", "invalid_rate", "cut_rate",
                "errors", "date", "run"])
    for r in rows:
        ci = r.success_ci95 or ("", "")
        w.writerow([r.model, r.label, r.env_id, r.success_mean, ci[0], ci[1],
                    "" if r.success_std_over_seeds is None else r.success_std_over_seeds, r.score_mean, r.episodes,
                    r.games, " ".join(map(str, r.seeds)), r.invalid_rate, r.cut_rate, r.errors, r.date, r.run])
    return buf.getvalue()


# ---- paired comparison (SPEC section 6) ---------------------------------------------------------
@dataclass
class PairedResult:
    """Run B against run A on one group of games (all, or one task type): per seed an exact McNemar
    test on success (one outcome per game); over seeds, sign-flip tests and game-bootstrap intervals
    of B - A on per-game mean success and score."""

    group: str
    n_games: int
    seeds: list[int]
    success: PairedGames
    score: PairedGames
    mcnemar: dict[int, McNemar]


@dataclass
class Comparison:
    run_a: str
    run_b: str
    env_id: str
    only_a: int  # (game, seed) pairs only run A has
    only_b: int
    results: list[PairedResult]  # overall first, then one per task type
    warnings: list[str] = field(default_factory=list)  # why the two runs may not be comparable


def _paired(group: str, a: list[dict], b: list[dict], n_resamples: int, seed: int) -> PairedResult:
    ka = {(e["episode_id"], int(e["seed"])): e for e in a}
    kb = {(e["episode_id"], int(e["seed"])): e for e in b}
    shared = sorted(set(ka) & set(kb))
    seeds = sorted({s for _, s in shared})
    tests = {s: mcnemar([bool(ka[k]["success"]) for k in shared if k[1] == s],
                        [bool(kb[k]["success"]) for k in shared if k[1] == s]) for s in seeds}
    ea, eb = [ka[k] for k in shared], [kb[k] for k in shared]
    success = paired_games(per_game(ea, "success"), per_game(eb, "success"), n_resamples, seed)
    return PairedResult(group, success.n_games, seeds, success,
                        paired_games(per_game(ea, "score"), per_game(eb, "score"), n_resamples, seed), tests)


def compare(run_a: Run, run_b: Run, n_resamples: int = 10_000, seed: int = 0) -> Comparison:
    """Pair two runs on their shared (episode_id, seed) keys; refuse runs on different envs or with no shared pair."""
    if run_a.env_id != run_b.env_id:
        raise SageError(f"cannot compare runs on different envs: {run_a.path} is on {run_a.env_id}, "
                        f"{run_b.path} is on {run_b.env_id}; compare two runs of the same env and panel")
    ka, kb = run_a.by_key(), run_b.by_key()
    shared = set(ka) & set(kb)
    if not shared:
        raise SageError(f"{run_a.path} ({len(ka)} episodes) and {run_b.path} ({len(kb)} episodes) share no "
                        "(episode_id, seed) pair; evaluate both on the same panel and seeds")
    a = [ka[k] for k in shared]
    results = [_paired("overall", a, [kb[k] for k in shared], n_resamples, seed)]
    by_type: dict[str, list[tuple]] = defaultdict(list)
    for k in shared:
        by_type[ka[k].get("task_type") or "?"].append(k)
    if len(by_type) > 1:
        results += [_paired(t, [ka[k] for k in keys], [kb[k] for k in keys], n_resamples, seed)
                    for t, keys in sorted(by_type.items())]
    return Comparison(run_a.name, run_b.name, run_a.env_id, len(ka) - len(shared), len(kb) - len(shared), results,
                      incomparable(run_a, run_b))


COMPARE_COLUMNS = ("group", "games", "seeds", "success A", "success B", "B-A", "95% CI", "p (sign-flip)",
                   "McNemar p per seed (b/c)", "score A", "score B", "score B-A", "score 95% CI", "score p")


def _p(x: float) -> str:
    return f"{x:.3g}"


def comparison_cells(r: PairedResult) -> list[str]:
    s, x = r.success, r.score
    per_seed = "; ".join(f"s{k}: {_p(t.p_value)} ({t.b}/{t.c})" for k, t in r.mcnemar.items())
    return [r.group, str(r.n_games), ",".join(map(str, r.seeds)), _pct(s.mean_a), _pct(s.mean_b),
            f"{100 * s.diff.diff:+.1f}", _ci(s.diff.ci95, signed=True), _p(s.p_value), per_seed,
            _pct(x.mean_a), _pct(x.mean_b), f"{100 * x.diff.diff:+.1f}", _ci(x.diff.ci95, signed=True), _p(x.p_value)]


def _paired_json(g: PairedGames) -> dict[str, Any]:
    return {"mean_a": g.mean_a, "mean_b": g.mean_b, "diff": g.diff.diff, "ci95": list(g.diff.ci95),
            "p_value": g.p_value, "p_exact": g.exact, "n_games": g.n_games, "n_resamples": g.diff.n_resamples,
            "seed": g.diff.seed}


def comparison_json(c: Comparison) -> dict[str, Any]:
    return {"run_a": c.run_a, "run_b": c.run_b, "env_id": c.env_id, "only_a": c.only_a, "only_b": c.only_b,
            "warnings": c.warnings,
            "results": [{"group": r.group, "n_games": r.n_games, "seeds": r.seeds,
                         "success": _paired_json(r.success), "score": _paired_json(r.score),
                         "mcnemar_per_seed": {str(k): {"b": t.b, "c": t.c, "both": t.both, "neither": t.neither,
                                                       "p_value": t.p_value} for k, t in r.mcnemar.items()}}
                        for r in c.results]}
