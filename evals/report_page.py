"""The HTML page of `sage report`: CSS, layout and the trajectory viewer (vanilla JS over embedded JSON).
``{{name}}`` slots are filled by ``sage_evals.report.render_report``."""

TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{title}}</title>
<style>
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2b45;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}header p{margin:2px 0 0;opacity:.8}
main{padding:8px 24px 40px;max-width:1400px}h2{margin:26px 0 8px;font-size:17px}h3{margin:16px 0 4px;font-size:15px}
table{border-collapse:collapse;background:#fff;font-size:13px;margin:4px 0}th,td{border:1px solid #dde1e8;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef1f6}.leaderboard td:nth-child(3),.leaderboard td:nth-child(6){font-weight:600}
td.flag{color:#b26a00}tr.base td{background:#f3f6fb}h4{margin:14px 0 4px;font-size:14px}
section.group{border-top:2px solid #dde1e8;margin-top:18px}
.scroll{overflow-x:auto}.plots{display:flex;flex-wrap:wrap;gap:12px}.plots figure{margin:0;background:#fff;border:1px solid #dde1e8;padding:6px}
.plots svg{max-width:760px;height:auto}
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
<h2>Results</h2>
<p class="muted">Runs are grouped by what makes them comparable: env, panel (episode list, hence --limit) and turn
cap. Success, score and rates in %. The game (episode id) is the unit (SPEC section 6): success and score are
averaged over seeds per game; the headline is the mean over games with a 95% bootstrap interval over games (a
resampled game keeps all its seeds); "std over seeds" is the std of the per-seed means. Comparisons: B &minus; A
on per-game means over the seeds both runs played, a paired game-bootstrap 95% interval, a sign-flip permutation
test (exact up to 20 differing games) and an exact McNemar test per seed (one outcome per game; b: only the
baseline succeeded, c: only the run). "Cut at limit": turns whose generation hit max_new_tokens or the context
window, counted apart from turns where the model finished without a usable action.</p>
{{groups}}
{{training}}
<h2>Runs</h2>
<div class="scroll">{{settings}}</div>
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
  const ended = ep.end_reason || (ep.terminated ? "terminated" : ep.truncated ? "truncated" : "ended");
  v.appendChild(el("p", "muted", run.label + " · " + run.env_id + " · task type " + ep.task_type + " · seed " + ep.seed +
    " · score " + ep.score + " · " + ep.turns + " turns (ended by " + ended.replace("_", " ") +
    ") · invalid turns: " + (inv || "none")));
  if (ep.error) { const e = el("p", null); e.appendChild(el("span", "badge warn", "error")); e.appendChild(el("span", null, " " + ep.error)); v.appendChild(e); }
  const msgs = ep.messages || [];
  const sys = msgs.find((m) => m.role === "system");
  if (sys) { const d = el("details"); d.appendChild(el("summary", null, "System prompt")); d.appendChild(el("pre", null, sys.content)); v.appendChild(d); }
  const first = msgs.find((m) => m.role === "user");
  if (first) { const m = el("div", "msg"); m.appendChild(el("div", "role", "task / first observation")); m.appendChild(el("pre", null, first.content)); v.appendChild(m); }
  (ep.steps || []).forEach((s) => {
    const d = el("div", "step " + (s.action_valid ? "valid" : "invalid"));
    const why = s.finish_reason ? " · generation ended by " + s.finish_reason +
      (s.finish_reason === "length" || s.finish_reason === "context" ? " (cut at the token limit)" : "") : "";
    d.appendChild(el("div", "head", "turn " + s.turn + " · reward " + s.reward + " · score " + s.score + why));
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
  DATA.forEach((r, i) => { const o = el("option", null, r.label + " (" + r.env_id + ", " + r.name + ")"); o.value = i; $("run").appendChild(o); });
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
