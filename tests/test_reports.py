"""Statistics, leaderboard, paired comparison and the HTML report, on run folders in the format of
docs/run-format.md (built here by hand, and one from real ALFWorld episodes)."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps
from typer.testing import CliRunner

from sage_cli.main import app
from sage_evals.leaderboard import RunFormatError, compare, find_runs, leaderboard, load_run
from sage_evals.report import EXTERNAL_URL, render_report, write_report
from sage_evals.stats import mcnemar, mcnemar_exact_p, mean_std_ci, paired_bootstrap
from sage_gym.errors import SageError

SAGE = str(Path(sys.executable).parent / "sage")
TYPES = ("pick_and_place_simple", "look_at_obj_in_light")


# ---- run folders in the documented format ------------------------------------------------
def record(episode_id: str, seed: int, success: bool, score: float | None = None, task_type: str = TYPES[0],
           turns: int = 4, invalid: int = 0, env_id: str = "alfworld-unseen", **extra) -> dict:
    steps = [{"turn": t + 1, "response": f"thinking <action>look</action>", "action": "look" if t >= invalid else None,
              "action_valid": t >= invalid, "invalid_reason": None if t >= invalid else "unparseable",
              "observation": f"obs {t + 1}", "reward": 0.0, "score": 0.0} for t in range(turns)]
    return {"episode_id": episode_id, "seed": seed, "env_id": env_id, "task_type": task_type, "success": success,
            "score": float(success) if score is None else score, "metrics": {}, "turns": turns,
            "terminated": success, "truncated": not success,
            "invalid_turns": {"empty": 0, "unparseable": invalid, "schema_violation": 0},
            "prompt_tokens": 100, "completion_tokens": 20, "seconds": 1.0, "gen_seconds": 0.8, "env_seconds": 0.2,
            "error": None, "messages": [{"role": "system", "content": "rules"}, {"role": "user", "content": "task"}],
            "steps": steps, **extra}


def write_run(folder: Path, model: str, records: list[dict], env_id: str = "alfworld-unseen",
              created: str = "2026-11-20T10:00:00+00:00", torn_tail: bool = False) -> Path:
    folder.mkdir(parents=True)
    panel = sorted({r["episode_id"] for r in records})
    settings = {"model": model, "model_kind": "hf", "env_id": env_id, "panel": panel, "panel_sha256": "ab" * 32,
                "seeds": sorted({r["seed"] for r in records}),
                "decoding": {"temperature": 0.4, "top_p": 1.0, "top_k": None, "max_new_tokens": 4096},
                "max_turns": 30, "history_window": None, "limit": None, "sage_version": "0.1.0",
                "git_commit": "deadbeef", "created": created}
    (folder / "run.json").write_text(json.dumps(settings))
    with open(folder / "episodes.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        if torn_tail:
            f.write('{"episode_id": "torn", "se')
    return folder


def seeded_run(folder: Path, model: str, rates: list[float], n: int = 10, **kw) -> Path:
    """``n`` episodes per seed; seed s succeeds on its first ``rates[s] * n`` episodes."""
    recs = [record(f"ep{i}", s, i < round(rate * n), task_type=TYPES[i % 2], invalid=1 if i == 0 else 0)
            for s, rate in enumerate(rates) for i in range(n)]
    return write_run(folder, model, recs, **kw)


# ---- statistics ---------------------------------------------------------------------------
def test_mean_std_and_t_interval_match_hand_computation():
    est = mean_std_ci([0.5, 0.6, 0.7])
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t_{0.975, df=2} from tables
    assert est.mean == pytest.approx(0.6) and est.std == pytest.approx(0.1) and est.n == 3
    assert est.ci95 == pytest.approx((0.6 - half, 0.6 + half))
    one = mean_std_ci([0.4])
    assert one.mean == 0.4 and one.std is None and one.ci95 is None
    with pytest.raises(ValueError, match="at least one"):
        mean_std_ci([])


def test_exact_mcnemar_on_textbook_tables():
    assert mcnemar_exact_p(1, 9) == pytest.approx(22 / 1024)  # 2 * (C(10,0) + C(10,1)) / 2^10
    assert mcnemar_exact_p(0, 6) == pytest.approx(2 / 64)
    assert mcnemar_exact_p(5, 5) == 1.0 and mcnemar_exact_p(0, 0) == 1.0
    for b, c in [(3, 11), (12, 4), (7, 8), (0, 1), (20, 35)]:
        assert mcnemar_exact_p(b, c) == pytest.approx(sps.binomtest(b, b + c, 0.5).pvalue)
    a = [1, 1, 1, 0, 0, 0, 1, 0]
    b = [1, 0, 0, 1, 0, 0, 1, 1]
    t = mcnemar(a, b)
    assert (t.both, t.b, t.c, t.neither, t.n) == (2, 2, 2, 2, 8) and t.p_value == 1.0
    with pytest.raises(ValueError, match="equal length"):
        mcnemar([1], [1, 0])


def test_paired_bootstrap_is_seeded_and_matches_the_normal_approximation():
    rng = np.random.default_rng(1)
    a = rng.random(400)
    b = a + 0.1 + rng.normal(0, 0.2, 400)
    r1 = paired_bootstrap(a, b, n_resamples=4000, seed=7)
    assert r1 == paired_bootstrap(a, b, n_resamples=4000, seed=7)
    assert r1.ci95 != paired_bootstrap(a, b, n_resamples=4000, seed=8).ci95
    d = b - a
    assert r1.diff == pytest.approx(d.mean())
    half = 1.96 * d.std(ddof=1) / math.sqrt(d.size)
    assert r1.ci95 == pytest.approx((d.mean() - half, d.mean() + half), abs=0.004)
    assert r1.ci95[0] > 0  # a real improvement is detected
    same = paired_bootstrap([0.2, 0.5, 0.9], [0.3, 0.6, 1.0], n_resamples=100)
    assert same.ci95 == pytest.approx((0.1, 0.1))


# ---- leaderboard ---------------------------------------------------------------------------
def test_leaderboard_rows_from_run_folders(tmp_path):
    seeded_run(tmp_path / "runs" / "small__alfworld-unseen", "small", [0.5, 0.6, 0.7], torn_tail=True)
    seeded_run(tmp_path / "runs" / "big__alfworld-unseen", "big", [0.8, 0.9, 0.9])
    runs = find_runs([tmp_path / "runs"])
    assert sorted(r.model for r in runs) == ["big", "small"]
    rows = leaderboard(runs)
    assert [r.model for r in rows] == ["big", "small"]  # best success first
    small = rows[1]
    assert small.episodes == 30 and small.seeds == [0, 1, 2]  # the torn last line is skipped
    assert small.success_mean == pytest.approx(0.6) and small.success_std == pytest.approx(0.1)
    assert small.success_ci95 == pytest.approx(mean_std_ci([0.5, 0.6, 0.7]).ci95)
    assert small.invalid_rate == pytest.approx(3 / 120)  # one invalid turn per seed, 4 turns per episode
    assert small.per_task_type[TYPES[0]]["n"] == 15 and small.date == "2026-11-20"
    assert find_runs([tmp_path / "runs" / "big__alfworld-unseen"])[0].model == "big"  # a run folder itself


def test_leaderboard_cli_formats(tmp_path):
    seeded_run(tmp_path / "a", "small", [0.5, 0.6, 0.7])
    runner = CliRunner()
    md = runner.invoke(app, ["leaderboard", str(tmp_path), "--format", "markdown"])
    assert md.exit_code == 0, md.output
    assert "| small | alfworld-unseen | 60.0 ± 10.0 |" in md.output
    rows = list(csv.DictReader(io.StringIO(runner.invoke(app, ["leaderboard", str(tmp_path), "--format", "csv"]).output)))
    assert len(rows) == 1 and float(rows[0]["success_mean"]) == pytest.approx(0.6) and rows[0]["seeds"] == "0 1 2"
    table = runner.invoke(app, ["leaderboard", str(tmp_path)], env={"COLUMNS": "250"})
    assert table.exit_code == 0 and "small" in table.output and "60.0 ± 10.0" in table.output
    bad = runner.invoke(app, ["leaderboard", str(tmp_path), "--format", "xml"])
    assert bad.exit_code != 0 and "markdown" in bad.output


def test_run_folder_errors_are_clear(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunFormatError, match="no run folders"):
        find_runs([tmp_path / "empty"])
    run = seeded_run(tmp_path / "r", "m", [0.5])
    lines = (run / "episodes.jsonl").read_text().splitlines()
    lines.insert(2, "{broken")
    (run / "episodes.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(RunFormatError, match=r"episodes.jsonl:3 is not valid JSON"):
        load_run(run)
    lines[2] = "3"
    (run / "episodes.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(RunFormatError, match=r"episodes.jsonl:3 holds a JSON int, not an object"):
        load_run(run)


# ---- compare ----------------------------------------------------------------------------
def _pair_runs(tmp_path: Path) -> tuple[Path, Path]:
    """A and B on 20 shared pairs: b = 1 (A only), c = 9 (B only), 6 both, 4 neither; B has 2 extra pairs."""
    outcomes = [(1, 0)] + [(0, 1)] * 9 + [(1, 1)] * 6 + [(0, 0)] * 4
    ra = [record(f"ep{i}", i % 2, bool(a), task_type=TYPES[i % 2]) for i, (a, _) in enumerate(outcomes)]
    rb = [record(f"ep{i}", i % 2, bool(b), task_type=TYPES[i % 2]) for i, (_, b) in enumerate(outcomes)]
    rb += [record("extra0", 0, True), record("extra1", 1, True)]
    return write_run(tmp_path / "A", "base", ra), write_run(tmp_path / "B", "tuned", rb)


def test_compare_pairs_shared_keys_with_mcnemar_and_bootstrap(tmp_path):
    a, b = _pair_runs(tmp_path)
    result = compare(load_run(a), load_run(b), n_resamples=2000)
    overall = result.results[0]
    assert (result.only_a, result.only_b) == (0, 2)
    assert overall.n == 20 and (overall.mcnemar.b, overall.mcnemar.c) == (1, 9)
    assert overall.mcnemar.p_value == pytest.approx(22 / 1024)
    assert overall.success_a == pytest.approx(7 / 20) and overall.success_b == pytest.approx(15 / 20)
    assert overall.score_diff.diff == pytest.approx(8 / 20)
    assert 0 < overall.score_diff.ci95[0] < 0.4 < overall.score_diff.ci95[1]
    per_type = {r.group: r for r in result.results[1:]}
    assert set(per_type) == set(TYPES) and sum(r.n for r in per_type.values()) == 20
    assert sum(r.mcnemar.c for r in per_type.values()) == 9


def test_compare_refuses_unpaired_or_different_env_runs(tmp_path):
    a = write_run(tmp_path / "A", "m", [record("ep0", 0, True)])
    other_seed = write_run(tmp_path / "B", "m", [record("ep0", 1, True)])
    other_env = write_run(tmp_path / "C", "m", [record("ep0", 0, True)], env_id="alfworld-seen")
    with pytest.raises(SageError, match="share no"):
        compare(load_run(a), load_run(other_seed))
    with pytest.raises(SageError, match="different envs"):
        compare(load_run(a), load_run(other_env))
    out = subprocess.run([SAGE, "compare", str(a), str(other_env)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "different envs" in out.stdout + out.stderr and "Traceback" not in out.stderr


def test_compare_cli_json(tmp_path):
    a, b = _pair_runs(tmp_path)
    out = CliRunner().invoke(app, ["compare", str(a), str(b), "--format", "json", "--resamples", "500"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["results"][0]["mcnemar"]["c"] == 9 and data["results"][0]["group"] == "overall"
    table = CliRunner().invoke(app, ["compare", str(a), str(b)], env={"COLUMNS": "250"})
    assert "0.0215" in table.output and "2 only in B" in table.output


# ---- report -------------------------------------------------------------------------------
def _report_runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    seeded_run(root / "small__alfworld-unseen", "small", [0.5, 0.6, 0.7])
    recs = [record(f"ep{i}", s, i % 3 == 0, task_type=TYPES[i % 2]) for s in range(2) for i in range(6)]
    recs[1]["steps"][0].update(response="</script><script>alert(1)</script> <action>x</action>", action_valid=False,
                               invalid_reason="schema_violation", action=None)
    recs[1]["invalid_turns"]["schema_violation"] = 1
    write_run(root / "big__alfworld-unseen", "big", recs)
    return root


def test_wilson_interval_always_holds_the_rate():
    from sage_evals.summary import wilson_interval

    for n in range(1, 60):
        for k in range(n + 1):
            lo, hi = wilson_interval(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0, (k, n, lo, hi)  # 0 of 6 gave lo = 2.8e-17 > 0


def test_report_plots_runs_whose_interval_ends_round_past_the_mean(tmp_path):
    """`sage report` on an expert run (4 of 4) and a random run (0 of 6), one seed each: no matplotlib crash."""
    from sage_evals.leaderboard import Row
    from sage_evals.report import _plots

    a = write_run(tmp_path / "A", "expert", [record(f"e{i}", 0, True) for i in range(4)])
    b = write_run(tmp_path / "B", "random", [record(f"e{i}", 0, False) for i in range(6)])
    result = CliRunner().invoke(app, ["report", str(a), str(b), "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    assert "<svg" in (tmp_path / "r.html").read_text()
    row = Row("run", "m", "alfworld-unseen", 0.5, 0.1, (0.5 + 1e-12, 0.9), 0.5, 4, [0], 0.0, 0, "",
              {TYPES[0]: {"n": 4, "success": 0.5, "score": 0.5}}, {0: 0.5})  # an end past the mean by rounding
    assert "<svg" in _plots("alfworld-unseen", [load_run(a)], {"A": row})


def test_report_is_self_contained_and_embeds_capped_trajectories(tmp_path):
    runs = find_runs([_report_runs(tmp_path)])
    page = render_report(runs, max_trajectories=5)
    assert page.count("<svg") == 2 and "<?xml" not in page  # one env: per task type + per seed
    assert not EXTERNAL_URL.search(page), EXTERNAL_URL.search(page)
    assert page.count("</script>") == 2  # model text cannot close the data element
    data = json.loads(re.search(r'<script type="application/json" id="sage-data">(.*?)</script>', page, re.S).group(1))
    assert {d["name"]: (len(d["episodes"]), d["total"]) for d in data} == {
        "small__alfworld-unseen": (5, 30), "big__alfworld-unseen": (5, 12)}
    big = next(d for d in data if d["name"] == "big__alfworld-unseen")
    assert big["episodes"][1]["steps"][0]["response"].startswith("</script>")
    assert "60.0 ± 10.0" in page and "temperature=0.4" in page


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.skip("chromium is not installed (apt-get install chromium) - the report page is not rendered")
    return path


def _chrome(binary: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chrome-profile'}"]
    return subprocess.run([binary, *flags, *args], capture_output=True, text=True, timeout=120)


def test_report_viewer_renders_in_headless_chromium(tmp_path):
    binary = _chromium()
    out = write_report(find_runs([_report_runs(tmp_path)]), tmp_path / "report.html")
    url = out.resolve().as_uri() + "#run=big__alfworld-unseen&episode=ep1&seed=0"
    dom = _chrome(binary, tmp_path, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    assert 'data-episode="ep1"' in page and 'data-seed="0"' in page  # the viewer rendered the asked episode
    assert page.count('class="step invalid"') == 1 and page.count('class="step valid"') == 3
    assert "invalid: schema_violation" in page and "&lt;/script&gt;&lt;script&gt;alert(1)" in page
    assert "12 of 12 episodes embedded" in page and "invalid turns: schema_violation 1" in page
    shot = tmp_path / "report.png"
    _chrome(binary, tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", url)
    assert shot.is_file() and shot.stat().st_size > 10_000


# ---- a run from real ALFWorld episodes --------------------------------------------------------
def test_report_on_a_run_of_real_alfworld_episodes(tmp_path):
    """Episodes played on the real engine (expert, and an agent that starts with a malformed turn),
    written in the run format, go through leaderboard, compare and report."""
    import sage_gym
    from sage_gym.agents import ExpertAgent

    env = sage_gym.make("alfworld-unseen", max_turns=8)
    ids = env.unwrapped.episode_ids[:2]
    runs = {}
    for model, sloppy in (("expert", False), ("sloppy-expert", True)):
        recs = []
        for eid in ids:
            obs, info = env.reset(seed=0, options={"episode_id": eid})
            agent, steps, done, turn = ExpertAgent(), [], False, 0
            agent.reset(env, info)
            while not done:
                response = "I am not sure." if sloppy and turn < 3 else agent.act(env, info)
                obs, reward, terminated, truncated, info = env.step(response)
                turn += 1
                done = terminated or truncated
                steps.append({"turn": info["turn"], "response": response, "action": info["action"],
                              "action_valid": info["action_valid"], "invalid_reason": info["invalid_reason"],
                              "observation": obs, "reward": reward, "score": info["score"]})
            invalid = sum(not s["action_valid"] for s in steps)
            recs.append(record(eid, 0, bool(info["won"]), float(info["score"]), info["task_type"], turns=len(steps),
                               invalid=invalid) | {"messages": info["messages"], "steps": steps,
                                                   "terminated": terminated, "truncated": truncated})
        runs[model] = write_run(tmp_path / "runs" / model, model, recs)
    env.close()
    rows = {r.model: r for r in leaderboard(find_runs([tmp_path / "runs"]))}
    assert rows["expert"].success_mean == 1.0 and rows["expert"].invalid_rate == 0
    assert rows["sloppy-expert"].invalid_rate > 0
    c = compare(load_run(runs["expert"]), load_run(runs["sloppy-expert"]), n_resamples=200)
    assert c.results[0].n == 2 and c.results[0].mcnemar.b == sum(not r["success"] for r in load_run(runs["sloppy-expert"]).episodes)
    page = render_report(find_runs([tmp_path / "runs"]))
    assert "Nothing happened" in page  # the real invalid-turn feedback is embedded
