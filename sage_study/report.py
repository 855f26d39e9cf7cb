"""The study's results: tables (markdown), plots (PNG), results.json and the `sage report` page.

Method comparisons follow SPEC section 6 with the game as the unit: each method's evaluation
episodes (all its training seeds x evaluation seeds) are averaged per game; the headline is
the mean over games with a game-bootstrap 95% interval; "std over seeds" is the std of the
per-training-run means; each method is compared with the baseline by a paired sign-flip test
on per-game mean success and a paired game-bootstrap interval of the difference, and by
exact McNemar tests per (training seed, evaluation seed) pair.
"""

from __future__ import annotations

import json
import shutil
import statistics
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sage_study.driver import Study

PLOTS = "plots"


def _episodes(folder: Path) -> list[dict]:
    from sage_evals.leaderboard import load_run

    return load_run(folder).episodes if (folder / "run.json").is_file() else []


def _composite(runs: dict[str, list[dict]]) -> list[dict]:
    """All episodes of a method's runs, each seed made ``run index * 1000 + evaluation seed`` so that the
    (game, seed) pairs of two methods line up run by run and seed by seed."""
    return [{**e, "seed": k * 1000 + int(e["seed"])} for k, (_, eps) in enumerate(sorted(runs.items())) for e in eps]


def _invalid_rate(episodes: list[dict]) -> float | None:
    turns = sum(e["turns"] for e in episodes)
    return sum(sum(e["invalid_turns"].values()) for e in episodes) / turns if turns else None


def model_summary(runs: dict[str, list[dict]]) -> dict[str, Any]:
    """Mean success over games with a game-bootstrap interval, std over seeds (over training runs when there
    are several, else over evaluation seeds), invalid-turn rate and turns per episode."""
    from sage_evals.stats import game_estimate, per_game

    episodes = _composite(runs)
    if not episodes:
        return {"n_games": 0}
    est = game_estimate(per_game(episodes, "success"))
    run_means = [game_estimate(per_game(eps, "success")).mean for eps in runs.values() if eps]
    several = len(run_means) > 1
    return {"n_games": est.n_games, "episodes": len(episodes), "success": est.mean, "ci95": list(est.ci95),
            "std_over_seeds": statistics.stdev(run_means) if several else est.std_over_seeds,
            "std_over": "training seeds" if several else "evaluation seeds",
            "score": game_estimate(per_game(episodes, "score")).mean,
            "invalid_rate": _invalid_rate(episodes), "turns_mean": statistics.fmean(e["turns"] for e in episodes)}


def compare(base: dict[str, list[dict]], other: dict[str, list[dict]]) -> dict[str, Any]:
    """``other`` - ``base``, runs paired by training seed: sign-flip test and game-bootstrap interval of per-game
    mean success, and exact McNemar per (training seed, evaluation seed)."""
    from sage_evals.stats import mcnemar, paired_games, per_game

    keys = sorted(set(base) & set(other))
    a = per_game(_composite({k: base[k] for k in keys}), "success")
    b = per_game(_composite({k: other[k] for k in keys}), "success")
    try:
        paired = paired_games(a, b)
    except ValueError:
        return {"n_games": 0}
    mcn = []
    for seed in sorted({s for g in a.values() for s in g} & {s for g in b.values() for s in g}):
        games = sorted(g for g in set(a) & set(b) if seed in a[g] and seed in b[g])
        m = mcnemar([a[g][seed] > 0.5 for g in games], [b[g][seed] > 0.5 for g in games])
        mcn.append({"run": keys[seed // 1000], "eval_seed": seed % 1000, "b": m.b, "c": m.c, "p": m.p_value})
    return {"n_games": paired.n_games, "diff": paired.diff.diff, "ci95": list(paired.diff.ci95),
            "p_sign_flip": paired.p_value, "mcnemar": mcn, "mcnemar_p_min": min((m["p"] for m in mcn), default=None)}


def by_task_type(base: dict[str, list[dict]], other: dict[str, list[dict]]) -> dict[str, dict[str, Any]]:
    """``compare`` restricted to the games of each task type (the episodes' ``task_type``)."""
    types = sorted({e.get("task_type") or "-" for eps in list(base.values()) + list(other.values()) for e in eps})

    def only(runs: dict[str, list[dict]], kind: str) -> dict[str, list[dict]]:
        return {k: [e for e in eps if (e.get("task_type") or "-") == kind] for k, eps in runs.items()}

    return {kind: compare(only(base, kind), only(other, kind)) for kind in types}


def _fmt(x: float | None, pct: bool = True, digits: int = 1) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.{digits}f}" if pct else f"{x:.{digits}f}"


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _judge_on_rollouts(run_dirs: list[Path]) -> dict[str, Any]:
    """The judge on real student turns: its decisions against the expert's label (action != expert's move)."""
    from sage_evals.stats import auroc

    rows = []
    for d in run_dirs:
        path = d / "judge_turns.jsonl"
        if path.is_file():
            rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    labelled = [r for r in rows if r.get("expert_action")]
    if not labelled:
        return {"judged_turns": len(rows)}
    labels = [r["action"] != r["expert_action"] for r in labelled]
    decisions = [r["p_yes"] >= 0.5 for r in labelled]
    return {"judged_turns": len(rows), "labelled_turns": len(labelled),
            "expert_yes_rate": sum(labels) / len(labels), "judge_yes_rate": sum(decisions) / len(decisions),
            "agreement": sum(d == y for d, y in zip(decisions, labels)) / len(labels),
            "auroc": auroc([r["p_yes"] for r in labelled], labels)}


def _plot_curves(study: Study, seeds: dict[str, list[int]], out: Path) -> list[str]:
    """Learning curves per method (mean over its finished training seeds ``seeds[name]``): rollout success, KL,
    intervention rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("rollout_success", "rollout success (training batch)"), ("kl", "token reverse KL to the teacher"),
              ("intervention_rate", "intervention rate (sage_opd variants)")]
    width, legend_width = 5 * len(panels) + 2, 2  # inches: the panels, then the legend on the right
    fig, axes = plt.subplots(1, len(panels), figsize=(width, 3.6))
    for i, method in enumerate(study.cfg.methods):
        # one colour and line style per method in every panel (a panel skips methods without that metric)
        style = {"color": plt.get_cmap("tab10")(i % 10), "linestyle": ("-", "--", ":")[i // 10 % 3]}
        runs = [_metrics(study.run_dir(method.name, s)) for s in seeds.get(method.name, [])]
        for ax, (key, title) in zip(axes, panels):
            by_step: dict[int, list[float]] = defaultdict(list)
            for run in runs:
                for m in run:
                    if m.get(key) is not None:
                        by_step[m["step"]].append(m[key])
            if by_step:
                steps = sorted(by_step)
                ax.plot(steps, [statistics.fmean(by_step[s]) for s in steps], label=method.name, marker=".", **style)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("step")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="center right", fontsize=7)
    fig.tight_layout(rect=(0, 0, 1 - legend_width / width, 1))
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "learning-curves.png", dpi=110)
    plt.close(fig)
    return ["learning-curves.png"]


def _plot_methods(table: list[dict], panel: str, out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in table if r["panel"] == panel and r["summary"].get("n_games")]
    fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(rows) + 2), 3.6))
    means = [100 * r["summary"]["success"] for r in rows]
    lows = [max(0.0, m - 100 * r["summary"]["ci95"][0]) for m, r in zip(means, rows)]
    highs = [max(0.0, 100 * r["summary"]["ci95"][1] - m) for m, r in zip(means, rows)]
    bars = ax.bar(range(len(rows)), means, yerr=[lows, highs], capsize=3, color="#4c72b0")
    for bar, m in zip(bars, means):
        ax.annotate(f"{m:.1f}", (bar.get_x() + bar.get_width() / 2, max(m, 0.5)), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(rows)), [r["model"] for r in rows], rotation=40, ha="right", fontsize=7)
    ax.set_ylabel(f"{panel} success % (95% game bootstrap)")
    fig.tight_layout()
    name = f"success-{panel}.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def finished_runs(study: Study) -> tuple[dict[str, list[int]], list[str]]:
    """The training seeds of each method whose training and evaluation stages are both recorded, and the runs
    (``method/seed``) that are not: a report written before the study ends covers only finished runs."""
    seeds: dict[str, list[int]] = {}
    missing = []
    for method in study.cfg.methods:
        for s in method.seeds:
            if study.done(f"train/{method.name}/{s}") and study.done(f"eval/{method.name}/{s}"):
                seeds.setdefault(method.name, []).append(s)
            else:
                missing.append(f"{method.name}/{s}")
    return seeds, missing


def write_report(study: Study) -> dict[str, Any]:
    """Compute every result from the finished runs, write results.json, report.md, plots/ and report.html;
    return the headline (``incomplete`` when some runs are not finished yet)."""
    from sage_evals.leaderboard import find_runs
    from sage_evals.report import write_report as write_html

    cfg, out = study.cfg, study.out
    panels = [p[0] for p in study.panels()]
    seeds, missing = finished_runs(study)
    methods = [m for m in cfg.methods if m.name in seeds]
    models = [("teacher", {"teacher": _episodes_by_panel(study, "teacher")}),
              ("student-warm", {"student-warm": _episodes_by_panel(study, "student-warm")})]
    for method in methods:
        models.append((method.name, {f"{method.name}-seed{s}": _episodes_by_panel(study, f"{method.name}-seed{s}")
                                     for s in seeds[method.name]}))
    table, comparisons = [], []
    baseline = dict(models).get(cfg.baseline)
    for name, runs in models:
        for panel in panels:
            per_run = {run: eps[panel] for run, eps in runs.items() if eps.get(panel)}
            table.append({"model": name, "panel": panel, "summary": model_summary(per_run)})
            if baseline is not None and name not in (cfg.baseline, "teacher", "student-warm"):
                base = {k.split("-seed")[-1]: v.get(panel, []) for k, v in baseline.items()}
                other = {k.split("-seed")[-1]: v.get(panel, []) for k, v in runs.items()}
                comparisons.append({"model": name, "panel": panel, **compare(base, other),
                                    "by_task_type": by_task_type(base, other)})
    plots = out / PLOTS
    figures = _plot_curves(study, seeds, plots) if methods else []
    figures += [_plot_methods(table, p, plots) for p in panels]
    judge = {"held_out": study.done("judge_eval"),
             "rollouts": _judge_on_rollouts([study.run_dir(m.name, s) for m in methods if m.algorithm == "sage_opd"
                                             for s in seeds[m.name]])}
    training = {}
    for method in methods:
        runs = [_metrics(study.run_dir(method.name, s)) for s in seeds[method.name]]
        steps = [m for run in runs for m in run]
        if steps:
            training[method.name] = {
                "seconds_per_step": statistics.fmean(m["time/step"] for m in steps),
                "judge_calls": sum(m.get("judge_calls", 0) for m in steps),
                "intervention_rate": _mean([m.get("intervention_rate") for m in steps]),
                "short_circuit": {r: sum(m.get(f"short_circuit/{r}", 0) for m in steps)
                                  for r in ("empty", "unparseable", "schema_violation")},
                "rollout_success_first": _mean([rollout_success(run, last=False) for run in runs if run]),
                "rollout_success_last": _mean([rollout_success(run, last=True) for run in runs if run]),
                "no_update_steps": sum(m.get("no_update", 0) for m in steps)}
    stages = {name: rec.get("seconds") for name, rec in _stage_records(study).items()}
    results = {"profile": cfg.profile, "config": cfg.to_dict(), "panels": panels, "table": table,
               "comparisons": comparisons, "judge": judge, "training": training, "stage_seconds": stages,
               "figures": figures, "missing_runs": missing, "version": _version(), "commit": _commit(),
               "command": _command()}
    from sage_study.driver import atomic_json

    atomic_json(out / "results.json", results)
    (out / "report.md").write_text(render_markdown(results))
    runs = find_runs([out / "evals"]) if (out / "evals").is_dir() else []  # none before the first evaluation
    if runs:
        write_html(runs, out / "report.html")
    return {"table_rows": len(table), "comparisons": len(comparisons), "incomplete": bool(missing)}


def _episodes_by_panel(study: Study, name: str) -> dict[str, list[dict]]:
    return {panel: _episodes(study.out / "evals" / name / panel) for panel, *_ in study.panels()}


def _stage_records(study: Study) -> dict[str, dict]:
    return {p.stem.replace("__", "/"): json.loads(p.read_text()) for p in sorted(study.stage_dir.glob("*.json"))}


def rollout_success(steps: list[dict], last: bool) -> float | None:
    """Mean rollout success over a run's first (or last) quarter of steps, at least one: a single step's few
    episodes are too noisy to show a trend."""
    k = max(1, len(steps) // 4)
    return _mean([m.get("rollout_success") for m in (steps[-k:] if last else steps[:k])])


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _version() -> str:
    import sage_gym

    return sage_gym.__version__


def _command() -> str | None:
    """The command line that wrote this report (``sage study ...``); None when it was not the sage command."""
    import shlex
    import sys

    if Path(sys.argv[0]).name not in ("sage", "__main__.py") or sys.argv[1:2] != ["study"]:
        return None
    return shlex.join(["sage", *sys.argv[1:]])


def _commit() -> str | None:
    from sage_evals.runner import git_commit

    return git_commit()


def render_markdown(r: dict[str, Any]) -> str:
    """The report as markdown: settings, the table of methods, paired comparisons, judge, timing, figures."""
    cfg = r["config"]
    lines = [f"# SAGE-OPD study on ALFWorld ({r['profile']} profile)", "",
             f"Package {r['version']}, commit {r['commit'] or 'unknown'}. Panels: "
             + ", ".join(_panel_text(cfg, p) for p in r["panels"])
             + f"; evaluation seeds {cfg['eval']['seeds']}, temperature {cfg['eval']['temperature']}, "
             f"at most {cfg['eval']['max_new_tokens']} new tokens per turn, turn cap {cfg['envs']['max_turns']}.",
             *(["", f"Written by `{r['command']}`."] if r.get("command") else []),
             *(["", f"**Partial report: {len(r['missing_runs'])} training runs are not finished** (trained and "
                    f"evaluated): {', '.join(r['missing_runs'])}. Every table and figure below covers the finished "
                    "runs only; the study's next run finishes the others and rewrites this report."]
               if r.get("missing_runs") else []),
             "", "## Success by model", "",
             "Mean success over games (each game averaged over all its episodes) with a 95% game-bootstrap "
             "interval; std over seeds is the std of per-run (or per-evaluation-seed) means.", "",
             "| model | panel | games | success % | 95% CI | std over seeds | invalid turns % | turns |",
             "|---|---|---|---|---|---|---|---|"]
    for row in r["table"]:
        s = row["summary"]
        if not s.get("n_games"):
            continue
        lines.append(f"| {row['model']} | {row['panel']} | {s['n_games']} | {_fmt(s['success'])} | "
                     f"[{_fmt(s['ci95'][0])}, {_fmt(s['ci95'][1])}] | {_fmt(s['std_over_seeds'])} "
                     f"({s['std_over']}) | {_fmt(s['invalid_rate'])} | {s['turns_mean']:.1f} |")
    if r["comparisons"]:
        lines += ["", f"## Paired comparisons against `{cfg['baseline']}`", "",
                  "Difference in per-game mean success (method - baseline), paired game-bootstrap 95% interval, "
                  "sign-flip permutation p on per-game means, and the smallest exact McNemar p over "
                  "(training seed, evaluation seed) pairs.", "",
                  "| method | panel | games | diff (pts) | 95% CI | sign-flip p | McNemar p (min) |",
                  "|---|---|---|---|---|---|---|"]
        for c in r["comparisons"]:
            if not c.get("n_games"):
                continue
            lines.append(f"| {c['model']} | {c['panel']} | {c['n_games']} | {_fmt(c['diff'])} | "
                         f"[{_fmt(c['ci95'][0])}, {_fmt(c['ci95'][1])}] | {c['p_sign_flip']:.3g} | "
                         f"{_fmt(c['mcnemar_p_min'], pct=False, digits=3)} |")
        won = {(row["model"], row["panel"]) for row in r["table"] if row["summary"].get("success")}
        typed = [(c, kind, t) for c in r["comparisons"] for kind, t in (c.get("by_task_type") or {}).items()
                 if t.get("n_games") and {(c["model"], c["panel"]), (cfg["baseline"], c["panel"])} & won]
        if typed:
            lines += ["", "Per task type (same tests, on the games of that type; panels on which neither the method "
                      "nor the baseline won an episode are left out):", "",
                      "| method | panel | task type | games | diff (pts) | 95% CI | sign-flip p |",
                      "|---|---|---|---|---|---|---|"]
            lines += [f"| {c['model']} | {c['panel']} | {kind} | {t['n_games']} | {_fmt(t['diff'])} | "
                      f"[{_fmt(t['ci95'][0])}, {_fmt(t['ci95'][1])}] | {t['p_sign_flip']:.3g} |" for c, kind, t in typed]
    j = r["judge"]
    lines += ["", "## The judge", ""]
    if j.get("held_out"):
        h = j["held_out"]
        lines.append(f"Held-out turns ({h.get('turns', 0)}, from games never trained on): accuracy "
                     f"{_fmt(h.get('accuracy'))}%, AUROC {_fmt(h.get('auroc'), pct=False, digits=3)}, "
                     f"expert says correct {_fmt(h.get('yes_rate'))}% of turns, judge {_fmt(h.get('judged_yes_rate'))}%.")
        if h.get("graded"):
            g = h["graded"]
            lines.append(f"The graded judge on the same turns (1 - q(Skip) against the same label): accuracy "
                         f"{_fmt(g['accuracy'])}%, AUROC {_fmt(g['auroc'], pct=False, digits=3)}, "
                         f"corrects {_fmt(g['judged_yes_rate'])}% of turns.")
    ro = j.get("rollouts") or {}
    if ro.get("labelled_turns"):
        lines.append(f"On real student turns of the sage_opd runs ({ro['labelled_turns']} judged): agreement with "
                     f"the hand-coded expert {_fmt(ro['agreement'])}%, AUROC {_fmt(ro['auroc'], pct=False, digits=3)}, "
                     f"expert Yes-rate {_fmt(ro['expert_yes_rate'])}%, judge Yes-rate {_fmt(ro['judge_yes_rate'])}%.")
    if r["training"]:
        lines += ["", "## Training", "",
                  "| method | s/step | judge calls | intervention rate | short circuits (empty/unparseable/schema) "
                  "| rollout success, first -> last quarter of steps | steps without update |",
                  "|---|---|---|---|---|---|---|"]
        for name, t in r["training"].items():
            sc = t["short_circuit"]
            lines.append(f"| {name} | {t['seconds_per_step']:.1f} | {t['judge_calls']} | "
                         f"{_fmt(t['intervention_rate'])} | {sc['empty']}/{sc['unparseable']}/{sc['schema_violation']} | "
                         f"{_fmt(t['rollout_success_first'])} -> {_fmt(t['rollout_success_last'])} | "
                         f"{t['no_update_steps']} |")
    lines += ["", "## Wall time per stage (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in r["stage_seconds"].items()]
    lines.append(f"| total | {sum(v or 0 for v in r['stage_seconds'].values()):.1f} |")
    lines += ["", "## Figures", ""] + [f"![{f}]({PLOTS}/{f})" for f in r["figures"]]
    return "\n".join(lines) + "\n"


def _panel_text(cfg: dict, panel: str) -> str:
    e, envs = cfg["eval"], cfg["envs"]
    if panel == "pool":
        return f"pool (the first {e['pool_limit']} games of the rollout pool, {envs['train']})"
    limit = e[f"{panel}_limit"]
    return f"{envs[panel]} ({'first ' + str(limit) + ' games' if limit else 'all games'})"


def publish(out_dir: Path, dest: Path) -> None:
    """Copy report.md to ``dest`` and its plots to ``dest``'s folder, with image links rewritten."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    figures = dest.parent / (dest.stem + "-plots")
    shutil.rmtree(figures, ignore_errors=True)
    shutil.copytree(out_dir / PLOTS, figures)
    dest.write_text((out_dir / "report.md").read_text().replace(f"]({PLOTS}/", f"]({figures.name}/"))
