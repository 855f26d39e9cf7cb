"""`sage report`: one static, self-contained HTML page (no server, no external URLs).

Runs are grouped by what makes them comparable (env, panel, turn cap); each group has its
leaderboard, a paired-comparison table against a baseline run (SPEC section 6 tests, overall and
per task type), and plots: success per task type with interval bars, success per seed, invalid
turns by cause and the distribution of turns per episode. `sage train` output folders add their
learning curves. A trajectory viewer (vanilla JS over embedded JSON) closes the page.
"""

from __future__ import annotations

import html
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sage_evals import plots
from sage_evals.leaderboard import (COLUMNS, COMPARE_COLUMNS, Comparison, Row, Run, RunFormatError, comparable_key,
                                    compare, comparison_cells, find_runs, incomparable, leaderboard, row_cells)
from sage_evals.report_page import TEMPLATE
from sage_evals.summary import CUT_CAUSE, turn_counts
from sage_gym.errors import SageError
from sage_gym.formatting import INVALID_REASONS

MAX_TEXT_CHARS = 20_000  # longest message/response/observation kept in the viewer


# ---- sources: evaluation runs and `sage train` folders ----------------------------------------
@dataclass
class Training:
    """A `sage train` output folder: its config and the metrics logged per step."""

    path: Path
    name: str
    config: dict[str, Any]
    metrics: list[dict[str, Any]]


def load_training(path: Path, name: str | None = None) -> Training:
    """Read ``metrics.jsonl`` (a torn last line is skipped) and ``config.yaml`` of a training folder."""
    import yaml

    lines = (path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    metrics = []
    for i, line in enumerate(lines):
        try:
            metrics.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise RunFormatError(f"{path / 'metrics.jsonl'}:{i + 1} is not valid JSON") from None
    config_file = path / "config.yaml"
    config = yaml.safe_load(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    return Training(path, name or path.name, config or {}, metrics)


def load_sources(paths: list[str | Path]) -> tuple[list[Run], list[Training]]:
    """Evaluation runs and training folders under ``paths`` (a training folder holds ``metrics.jsonl``;
    the evaluations it ran during training, under ``evals/``, are runs like any other)."""
    runs: list[Run] = []
    trainings: list[Training] = []
    for p in map(Path, paths):
        found = sorted(f.parent for f in p.rglob("metrics.jsonl")) if p.is_dir() else []
        trainings += [load_training(f, f.relative_to(p).as_posix() if f != p else p.name) for f in found]
        if found and not any(p.rglob("run.json")):
            continue  # a training folder that has not evaluated yet
        runs += find_runs([p])
    return runs, trainings


# ---- tables --------------------------------------------------------------------------------------
def _table(cls: str, header: list[str] | tuple[str, ...], rows: list[list[str]], row_classes: list[str] = ()) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    classes = list(row_classes) + [""] * (len(rows) - len(row_classes))
    body = "".join(f'<tr class="{c}">' + "".join(f"<td>{html.escape(x)}</td>" for x in r) + "</tr>"
                   for r, c in zip(rows, classes))
    return f'<div class="scroll"><table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


SETTINGS = ("model", "model_kind", "env_id", "seeds", "decoding", "max_turns", "history_window", "max_context",
            "prompt", "panel_sha256", "limit", "sage_version", "git_commit", "created")


def _settings_table(runs: list[Run], labels: dict[str, str]) -> str:
    rows = []
    for run in runs:
        cells = [labels[run.name], run.name]
        for key in SETTINGS:
            value = run.settings.get(key, "")
            if key == "decoding" and run.scripted:
                value = "– (scripted agent)"
            elif key == "decoding" and isinstance(value, dict):
                value = ", ".join(f"{k}={v}" for k, v in value.items())
            elif key == "prompt" and isinstance(value, dict):
                value = ", ".join(x for x in (f"{value.get('fewshot')}-shot" if value.get("fewshot") else "",
                                              "own system prompt" if value.get("system_prompt") else "") if x)
            elif key == "panel_sha256" and isinstance(value, str):
                value = value[:12]
            elif isinstance(value, (list, dict)):
                value = json.dumps(value)
            cells.append("" if value is None else str(value))
        rows.append(cells)
    return _table("settings", ("label", "run", *SETTINGS), rows)


def _comparisons(base: Run, others: list[Run], labels: dict[str, str]) -> str:
    """The paired-comparison tables of ``others`` against ``base``: overall, then per task type."""
    if not others:
        return '<p class="muted">Only one run in this group: nothing to compare.</p>'
    header = ["run (B)", *COMPARE_COLUMNS[1:], "flags"]
    overall, per_type = [], []
    for run in others:
        try:
            c: Comparison = compare(base, run)
        except SageError as err:
            overall.append([labels[run.name]] + [""] * (len(header) - 2) + [str(err)])
            continue
        flags = "; ".join(c.warnings + ([f"{c.only_a} baseline / {c.only_b} run episodes unpaired"]
                                        if c.only_a or c.only_b else []))
        overall.append([labels[run.name], *comparison_cells(c.results[0])[1:], flags])
        per_type += [[labels[run.name], *comparison_cells(r)] for r in c.results[1:]]
    out = f"<h4>Paired comparison: each run (B) against the baseline {html.escape(labels[base.name])} (A)</h4>"
    out += _table("compare", header, overall, ["flag" if r[-1] else "" for r in overall])
    if per_type:
        out += ("<details><summary>Per task type</summary>"
                + _table("compare", ["run (B)", "task type", *COMPARE_COLUMNS[1:]], per_type) + "</details>")
    return out


# ---- plots ----------------------------------------------------------------------------------------
def _group_plots(group: list[Run], rows: dict[str, Row], labels: dict[str, str], title: str) -> str:
    if not any(r.episodes for r in group):
        return '<p class="muted">No episodes yet.</p>'
    live = [r for r in group if r.episodes]
    types = sorted({t for r in live for t in rows[r.name].per_task_type})

    def per_type(r: Run, key: str) -> list:
        row, per = rows[r.name], rows[r.name].per_task_type
        overall = {"success": row.success_mean, "success_ci95": row.success_ci95}[key]
        return [overall] + [per[t][key] if t in per else None for t in types]

    games = {t: max(rows[r.name].per_task_type.get(t, {}).get("games", 0) for r in live) for t in types}
    categories = [f"all ({max(rows[r.name].games for r in live)} games)"] + [f"{t} ({games[t]})" for t in types]
    series = []
    for r in live:
        cis = per_type(r, "success_ci95")
        series.append(plots.Series(labels[r.name], per_type(r, "success"), [c[0] if c else None for c in cis],
                                   [c[1] if c else None for c in cis]))
    figures = [plots.bars(f"{title}: success per task type (95% interval over games)", categories, series)]
    seeds = sorted({s for r in live for s in rows[r.name].per_seed})
    figures.append(plots.bars(f"{title}: success per seed", [f"seed {s}" for s in seeds],
                              [plots.Series(labels[r.name], [rows[r.name].per_seed.get(s) for s in seeds])
                               for r in live]))
    causes = (CUT_CAUSE, *INVALID_REASONS)
    invalid = []
    for r in live:
        counts = turn_counts(r.episodes)["invalid_causes"]
        turns = sum(int(e.get("turns", 0)) for e in r.episodes)
        invalid.append(plots.Series(labels[r.name], [counts.get(c, 0) / turns if turns else 0.0 for c in causes]))
    figures.append(plots.bars(f"{title}: invalid turns by cause (share of turns)",
                              ["cut at the token limit", "empty", "unparseable (no action)", "schema violation"],
                              invalid, axis_label="turns (%)", full_scale=False))
    figures.append(plots.turns_distribution(f"{title}: turns per episode",
                                            {labels[r.name]: [int(e.get("turns", 0)) for e in r.episodes] for r in live},
                                            max(int(r.settings.get("max_turns") or 0) for r in live)))
    return '<div class="plots">' + "".join(f"<figure>{f}</figure>" for f in figures) + "</div>"


def _training_section(trainings: list[Training]) -> str:
    if not trainings:
        return ""
    out = ["<h2>Training</h2>"]
    for t in trainings:
        cfg, m = t.config, t.metrics

        def line(key: str) -> list[tuple[int, float]]:
            return [(int(x["step"]), float(x[key])) for x in m if isinstance(x.get(key), (int, float))]

        panels = {"loss": {"loss": line("loss")}, "mean token KL": {"kl": line("kl")},
                  "intervention rate": {"rate": line("intervention_rate")},
                  "rollout success": {"success": line("rollout_success")},
                  "eval success": {"seen": line("eval/seen/success"), "unseen": line("eval/unseen/success")}}
        about = (f"{cfg.get('algorithm', '?')}: student {(cfg.get('student') or {}).get('path', '?')}, teacher "
                 f"{(cfg.get('teacher') or {}).get('path', '?')}, env {(cfg.get('rollout') or {}).get('env_id', '?')}, "
                 f"{len(m)} steps logged")
        out.append(f"<h3>{html.escape(t.name)}</h3><p class='muted'>{html.escape(about)}; step N = after N optimiser "
                   "steps (checkpoints/step-N, evals/step-N)</p>")
        out.append('<div class="plots"><figure>' + plots.curves(t.name, panels) + "</figure></div>")
    return "".join(out)


# ---- the page -------------------------------------------------------------------------------------
def _cap(text: Any) -> Any:
    if isinstance(text, str) and len(text) > MAX_TEXT_CHARS:
        return text[:MAX_TEXT_CHARS] + f"\n… [{len(text) - MAX_TEXT_CHARS} more characters not embedded]"
    return text


def _trajectories(run: Run, label: str, max_episodes: int) -> dict[str, Any]:
    """The viewer's data for one run: its first ``max_episodes`` episodes in (seed, panel) order."""
    order = {e: i for i, e in enumerate(run.settings.get("panel") or [])}
    episodes = sorted(run.episodes, key=lambda e: (int(e["seed"]), order.get(e["episode_id"], len(order)), e["episode_id"]))
    shown = []
    for e in episodes[:max_episodes]:
        shown.append({
            "episode_id": e["episode_id"], "seed": int(e["seed"]), "task_type": e.get("task_type", ""),
            "success": bool(e["success"]), "score": float(e["score"]), "turns": e.get("turns"),
            "terminated": e.get("terminated"), "truncated": e.get("truncated"), "end_reason": e.get("end_reason"),
            "error": e.get("error"), "invalid_turns": e.get("invalid_turns") or {},
            "messages": [{"role": m.get("role", "?"), "content": _cap(m.get("content", ""))} for m in e.get("messages") or []],
            "steps": [{k: _cap(v) for k, v in s.items()} for s in e.get("steps") or []],
        })
    return {"name": run.name, "label": label, "model": run.model, "env_id": run.env_id, "total": len(run.episodes),
            "episodes": shown}


def _find_baseline(runs: list[Run], baseline: str | None) -> Run | None:
    if baseline is None:
        return None
    for r in runs:
        if baseline in (r.name, str(r.path)) or Path(baseline).resolve() == r.path.resolve():
            return r
    raise SageError(f"--baseline {baseline!r} is none of the runs in the report: "
                    + ", ".join(r.name for r in runs))


def _group_title(group: list[Run]) -> str:
    s = group[0].settings
    limit = f" (--limit {s['limit']})" if s.get("limit") else ""
    return (f"{group[0].env_id} · {len(s.get('panel') or [])} games{limit} · turn cap {s.get('max_turns')} · "
            f"panel {str(s.get('panel_sha256', ''))[:8]}")


def render_report(runs: list[Run], max_trajectories: int = 200, title: str = "SAGE evaluation report",
                  baseline: str | None = None, trainings: list[Training] = ()) -> str:
    """The whole report page as one HTML string. ``baseline`` names the run the others of its group are
    compared with (default: each group's first run); runs of other groups are listed as not comparable."""
    from sage_gym import __version__

    if not runs and not trainings:
        raise ValueError("render_report needs at least one run or training folder")
    rows = leaderboard(runs)
    by_name = {r.run: r for r in rows}
    labels = {r.run: r.label for r in rows}
    base = _find_baseline(runs, baseline)
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        groups[comparable_key(run)].append(run)
    sections = []
    # the baseline's group first, then the others as found
    for group in sorted(groups.values(), key=lambda g: not any(r is base for r in g)):
        ordered = sorted(group, key=lambda r: [x.run for x in rows].index(r.name))
        head = base if any(r is base for r in group) else (None if base is not None else group[0])
        table_rows = [by_name[r.name] for r in ordered]
        part = [f'<section class="group"><h3>{html.escape(_group_title(group))}</h3>',
                _table("leaderboard", COLUMNS, [row_cells(r) for r in table_rows],
                       ["base" if head is not None and r.run == head.name else "" for r in table_rows])]
        if head is not None:
            part.append(_comparisons(head, [r for r in ordered if r is not head], labels))
        else:
            why = "; ".join(f"{labels[r.name]}: " + ", ".join(incomparable(base, r)) for r in ordered)
            part.append(f'<p class="muted">Not comparable with the baseline {html.escape(labels[base.name])}: '
                        f"{html.escape(why)}</p>")
        part.append(_group_plots(ordered, by_name, labels, group[0].env_id))
        sections.append("".join(part) + "</section>")
    data = [_trajectories(r, labels[r.name], max_trajectories) for r in runs]
    # "<" is escaped so that no text can close the script element
    payload = json.dumps(data, ensure_ascii=False).replace("<", "\\u003c")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = {"title": html.escape(title),
             "meta": html.escape(f"{len(runs)} runs · {len(trainings)} training runs · generated {stamp} by sage "
                                 f"{__version__}"),
             "groups": "".join(sections) or "<p>No evaluation runs.</p>", "training": _training_section(trainings),
             "settings": _settings_table(runs, labels), "data": payload}
    return re.sub(r"\{\{(\w+)\}\}", lambda m: parts[m.group(1)], TEMPLATE)


def write_report(runs: list[Run], out: str | Path, max_trajectories: int = 200, baseline: str | None = None,
                 trainings: list[Training] = ()) -> Path:
    """Write the report page to ``out`` (parent folders are created)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_report(runs, max_trajectories, baseline=baseline, trainings=trainings), encoding="utf-8")
    return out


EXTERNAL_URL = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//|url\(\s*["']?\s*(?:https?:)?//|@import""", re.I)
