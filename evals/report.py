"""`sage report`: one static, self-contained HTML page (no server, no external URLs) with the
leaderboard, the settings of each run, plots of success per task type and per seed (inline SVG)
and a trajectory viewer (vanilla JS over embedded JSON)."""

from __future__ import annotations

import html
import io
import json
import re
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sage_evals.leaderboard import COLUMNS, Row, Run, leaderboard, row_cells

MAX_TEXT_CHARS = 20_000  # longest message/response/observation kept in the viewer


def _svg(fig) -> str:
    """A matplotlib figure as an inline <svg> element (text kept as text, no XML prolog)."""
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]


def _plots(env_id: str, runs: list[Run], rows: dict[str, Row]) -> str:
    """Success per task type and per seed for the runs of one env, as two inline SVGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    matplotlib.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "sage", "font.size": 9})
    width = 0.8 / max(1, len(runs))

    types = sorted({t for r in runs for t in rows[r.name].per_task_type})
    fig, ax = plt.subplots(figsize=(6.4, 1.2 + 0.22 * len(types) * len(runs)))
    y = np.arange(len(types))
    for i, run in enumerate(runs):
        per = rows[run.name].per_task_type
        values = [100 * per[t]["success"] if t in per else 0 for t in types]
        ax.barh(y + (i - (len(runs) - 1) / 2) * width, values, height=width, label=run.name)
    ax.set_yticks(y, [f"{t} (n={max((rows[r.name].per_task_type.get(t, {}).get('n', 0) for r in runs))})" for t in types])
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("success (%)")
    ax.set_title(f"{env_id}: success per task type")
    ax.legend(fontsize=7, loc="lower right")
    by_type = _svg(fig)

    seeds = sorted({s for r in runs for s in rows[r.name].per_seed})
    labels = [f"seed {s}" for s in seeds] + ["mean ± 95% CI"]
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    x = np.arange(len(labels))
    for i, run in enumerate(runs):
        row = rows[run.name]
        offset = (i - (len(runs) - 1) / 2) * width
        bars = ax.bar(x[:-1] + offset, [100 * row.per_seed.get(s, np.nan) for s in seeds], width=width, label=run.name)
        err = None
        if row.success_ci95:
            # an interval end that rounds past the mean is a zero-length bar, never a negative one
            err = [[100 * max(0.0, row.success_mean - row.success_ci95[0])],
                   [100 * max(0.0, row.success_ci95[1] - row.success_mean)]]
        ax.bar(x[-1:] + offset, [100 * row.success_mean], width=width, yerr=err, capsize=3,
               color=bars.patches[0].get_facecolor() if bars.patches else None)
    ax.set_xticks(x, labels)
    ax.set_ylim(0, 100)
    ax.set_ylabel("success (%)")
    ax.set_title(f"{env_id}: success per seed")
    ax.legend(fontsize=7)
    by_seed = _svg(fig)
    return f'<div class="plots"><figure>{by_type}</figure><figure>{by_seed}</figure></div>'


def _cap(text: Any) -> Any:
    if isinstance(text, str) and len(text) > MAX_TEXT_CHARS:
        return text[:MAX_TEXT_CHARS] + f"\n… [{len(text) - MAX_TEXT_CHARS} more characters not embedded]"
    return text


def _trajectories(run: Run, max_episodes: int) -> dict[str, Any]:
    """The viewer's data for one run: its first ``max_episodes`` episodes in (seed, panel) order."""
    order = {e: i for i, e in enumerate(run.settings.get("panel") or [])}
    episodes = sorted(run.episodes, key=lambda e: (int(e["seed"]), order.get(e["episode_id"], len(order)), e["episode_id"]))
    shown = []
    for e in episodes[:max_episodes]:
        shown.append({
            "episode_id": e["episode_id"], "seed": int(e["seed"]), "task_type": e.get("task_type", ""),
            "success": bool(e["success"]), "score": float(e["score"]), "turns": e.get("turns"),
            "terminated": e.get("terminated"), "truncated": e.get("truncated"), "error": e.get("error"),
            "invalid_turns": e.get("invalid_turns") or {},
            "messages": [{"role": m.get("role", "?"), "content": _cap(m.get("content", ""))} for m in e.get("messages") or []],
            "steps": [{k: _cap(v) for k, v in s.items()} for s in e.get("steps") or []],
        })
    return {"name": run.name, "model": run.model, "env_id": run.env_id, "total": len(run.episodes), "episodes": shown}


SETTINGS = ("model", "model_kind", "env_id", "seeds", "decoding", "max_turns", "history_window", "panel_sha256",
            "limit", "sage_version", "git_commit", "created")


def _settings_table(runs: list[Run]) -> str:
    head = "".join(f"<th>{html.escape(k)}</th>" for k in ("run", *SETTINGS))
    body = []
    for run in runs:
        cells = [run.name]
        for key in SETTINGS:
            value = run.settings.get(key, "")
            if key == "panel_sha256" and isinstance(value, str):
                value = value[:12]
            elif key == "decoding" and isinstance(value, dict):
                value = ", ".join(f"{k}={v}" for k, v in value.items())
            elif isinstance(value, (list, dict)):
                value = json.dumps(value)
            cells.append("" if value is None else str(value))
        body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return f'<table class="settings"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _leaderboard_table(rows: list[Row]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row_cells(r)) + "</tr>" for r in rows)
    return f'<table class="leaderboard"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def render_report(runs: list[Run], max_trajectories: int = 200, title: str = "SAGE evaluation report") -> str:
    """The whole report page as one HTML string."""
    from sage_gym import __version__

    if not runs:
        raise ValueError("render_report needs at least one run")
    rows = leaderboard(runs)
    by_name = {r.run: r for r in rows}
    by_env: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_env[run.env_id].append(run)
    plots = "".join(f"<h3>{html.escape(env)}</h3>{_plots(env, rs, by_name)}" for env, rs in sorted(by_env.items())
                    if any(r.episodes for r in rs))
    data = [_trajectories(r, max_trajectories) for r in runs]
    # "<" is escaped so that no text can close the script element
    payload = json.dumps(data, ensure_ascii=False).replace("<", "\\u003c")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = {"title": html.escape(title), "meta": html.escape(f"{len(runs)} runs · generated {stamp} by sage {__version__}"),
             "leaderboard": _leaderboard_table(rows), "settings": _settings_table(runs),
             "plots": plots or "<p>No episodes yet.</p>", "data": payload}
    return re.sub(r"\{\{(\w+)\}\}", lambda m: parts[m.group(1)], TEMPLATE)


def write_report(runs: list[Run], out: str | Path, max_trajectories: int = 200) -> Path:
    """Write the report page to ``out`` (parent folders are created)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_report(runs, max_trajectories), encoding="utf-8")
    return out


EXTERNAL_URL = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//|url\(\s*["']?\s*(?:https?:)?//|@import""", re.I)

TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{title}}</title>
<style>
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2b45;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}header p{margin:2px 0 0;opacity:.8}
main{padding:8px 24px 40px;max-width:1400px}h2{margin:26px 0 8px;font-size:17px}h3{margin:16px 0 4px;font-size:15px}
table{border-collapse:collapse;background:#fff;font-size:13px;margin:4px 0}th,td{border:1px solid #dde1e8;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef1f6}.leaderboard td:nth-child(3),.leaderboard td:nth-child(5){font-weight:600}
.scroll{overflow-x:auto}.plots{display:flex;flex-wrap:wrap;gap:12px}.plots figure{margin:0;background:#fff;border:1px solid #dde1e8;padding:6px}
.plots svg{max-width:640px;height:auto}
#controls{display:flex;flex-wrap:wrap;gap:10px;align-items:center;margin:6px 0 10px}#controls select{font-size:13px;padding:2px}
#viewer{background:#fff;border:1px solid #dde1e8;padding:12px 16px}
.badge{display:inline-block;border-radius:10px;padding:0 8px;font-size:12px;font-weight:600;color:#fff}
.ok{background:#2e8540}.fail{background:#b3261e}.warn{background:#b26a00}
.msg,.step{border-left:4px solid #c9d1de;margin:10px 0;padding:4px 10px;background:#fafbfc}
.msg .role,.step .head{font-weight:600;font-size:12px;color:#516079;text-transform:uppercase;letter-spacing:.03em}
.step.valid{border-left-color:#2e8540}.step.invalid{border-left-color:#b3261e;background:#fdf3f2}
.action{font-family:ui-monospace,Menlo,Consolas,monospace;margin:4px 0}.step.invalid .action{color:#b3261e}
pre{white-space:pre-wrap;word-break:break-word;margin:4px 0;font:12.5px/1.4 ui-monospace,Menlo,Consolas,monospace}
.obs{color:#31405a}.muted{color:#6b778c;font-size:12px}details{margin:8px 0}summary{cursor:pointer;color:#34507f}
</style></head>
<body>
<header><h1>{{title}}</h1><p>{{meta}}</p></header>
<main>
<h2>Leaderboard</h2>
<p class="muted">Success, score and invalid rate in %. Success: mean ± std over seeds with a Student-t 95% interval (with one seed: over episodes, Wilson interval).</p>
<div class="scroll">{{leaderboard}}</div>
<h2>Runs</h2>
<div class="scroll">{{settings}}</div>
<h2>Plots</h2>
{{plots}}
<h2>Trajectories</h2>
<div id="controls">
<label>Run <select id="run"></select></label>
<label>Show <select id="outcome"><option value="all">all</option><option value="success">successes</option>
<option value="failure">failures</option><option value="invalid">with invalid turns</option></select></label>
<label>Episode <select id="episode"></select></label>
<span id="count" class="muted"></span>
</div>
<div id="viewer"><p class="muted">No trajectories.</p></div>
</main>
<script type="application/json" id="sage-data">{{data}}</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("sage-data").textContent);
const $ = (id) => document.getElementById(id);
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
function nInvalid(ep) { return Object.values(ep.invalid_turns || {}).reduce((a, b) => a + b, 0); }
function keep(ep) {
  const f = $("outcome").value;
  return f === "all" || (f === "success" && ep.success) || (f === "failure" && !ep.success) || (f === "invalid" && nInvalid(ep) > 0);
}
function fillEpisodes(selectId) {
  const run = DATA[+$("run").value], sel = $("episode");
  sel.innerHTML = "";
  if (!run) return;
  run.episodes.forEach((ep, i) => {
    if (!keep(ep)) return;
    const o = el("option", null, (ep.success ? "\\u2713 " : "\\u2717 ") + ep.episode_id + " (seed " + ep.seed + ")");
    o.value = i;
    sel.appendChild(o);
  });
  if (selectId !== undefined) sel.value = selectId;
  $("count").textContent = sel.options.length + " shown · " + run.episodes.length + " of " + run.total + " episodes embedded";
  show();
}
function show() {
  const run = DATA[+$("run").value], v = $("viewer");
  v.innerHTML = "";
  const ep = run && run.episodes[+$("episode").value];
  if (!ep || $("episode").options.length === 0) { v.appendChild(el("p", "muted", "No episode matches.")); return; }
  v.dataset.episode = ep.episode_id;
  v.dataset.seed = ep.seed;
  const h = el("h3", null, ep.episode_id + " ");
  h.appendChild(el("span", "badge " + (ep.success ? "ok" : "fail"), ep.success ? "success" : "failure"));
  v.appendChild(h);
  const inv = Object.entries(ep.invalid_turns || {}).filter(([, n]) => n > 0).map(([k, n]) => k + " " + n).join(", ");
  v.appendChild(el("p", "muted", run.model + " · " + run.env_id + " · task type " + ep.task_type + " · seed " + ep.seed +
    " · score " + ep.score + " · " + ep.turns + " turns (" + (ep.terminated ? "terminated" : ep.truncated ? "truncated" : "ended") +
    ") · invalid turns: " + (inv || "none")));
  if (ep.error) { const e = el("p", null); e.appendChild(el("span", "badge warn", "error")); e.appendChild(el("span", null, " " + ep.error)); v.appendChild(e); }
  const msgs = ep.messages || [];
  const sys = msgs.find((m) => m.role === "system");
  if (sys) { const d = el("details"); d.appendChild(el("summary", null, "System prompt")); d.appendChild(el("pre", null, sys.content)); v.appendChild(d); }
  const first = msgs.find((m) => m.role === "user");
  if (first) { const m = el("div", "msg"); m.appendChild(el("div", "role", "task / first observation")); m.appendChild(el("pre", null, first.content)); v.appendChild(m); }
  (ep.steps || []).forEach((s) => {
    const d = el("div", "step " + (s.action_valid ? "valid" : "invalid"));
    d.appendChild(el("div", "head", "turn " + s.turn + " · reward " + s.reward + " · score " + s.score));
    d.appendChild(el("pre", "response", s.response));
    d.appendChild(el("div", "action", s.action_valid ? "\\u2713 action: " + s.action : "\\u2717 invalid: " + s.invalid_reason));
    d.appendChild(el("pre", "obs", s.observation));
    v.appendChild(d);
  });
  const raw = el("details");
  raw.appendChild(el("summary", null, "All messages (" + msgs.length + ")"));
  msgs.forEach((m) => { const d = el("div", "msg"); d.appendChild(el("div", "role", m.role)); d.appendChild(el("pre", null, m.content)); raw.appendChild(d); });
  v.appendChild(raw);
}
function init() {
  DATA.forEach((r, i) => { const o = el("option", null, r.name + " (" + r.env_id + ")"); o.value = i; $("run").appendChild(o); });
  const want = new URLSearchParams(location.hash.slice(1));
  let runIdx = 0, epIdx;
  if (want.has("run")) runIdx = Math.max(0, DATA.findIndex((r) => r.name === want.get("run")));
  $("run").value = runIdx;
  if (want.has("episode") && DATA[runIdx]) {
    const i = DATA[runIdx].episodes.findIndex((e) => e.episode_id === want.get("episode") &&
      (!want.has("seed") || String(e.seed) === want.get("seed")));
    if (i >= 0) epIdx = i;
  }
  $("run").onchange = () => fillEpisodes();
  $("outcome").onchange = () => fillEpisodes();
  $("episode").onchange = show;
  fillEpisodes(epIdx);
}
init();
</script>
</body></html>
"""
