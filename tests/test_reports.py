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
from sage_evals.stats import (bootstrap_ci, game_estimate, mcnemar, mcnemar_exact_p, mean_std_ci, paired_bootstrap,
                              per_game, sign_flip_test)
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
              created: str = "2026-11-20T10:00:00+00:00", torn_tail: bool = False, **settings_over) -> Path:
    import hashlib

    folder.mkdir(parents=True)
    panel = sorted({r["episode_id"] for r in records})
    settings = {"model": model, "model_kind": "hf", "env_id": env_id, "panel": panel,
                "panel_sha256": hashlib.sha256("\n".join(panel).encode()).hexdigest(),
                "seeds": sorted({r["seed"] for r in records}),
                "decoding": {"temperature": 0.4, "top_p": 1.0, "top_k": None, "max_new_tokens": 4096},
                "max_turns": 30, "history_window": None, "limit": None, "sage_version": "0.1.0",
                "git_commit": "deadbeef", "created": created, **settings_over}
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


def test_sign_flip_test_on_hand_enumerated_sign_patterns():
    assert sign_flip_test([1, 1, 1, 1]) == (2 / 16, True)  # only all-plus and all-minus reach |sum| 4
    assert sign_flip_test([1, 1, 0, 0, 0, 0]) == (2 / 4, True)  # games without a difference do not count
    assert sign_flip_test([1, 1, 1, -1]) == (1 - 6 / 16, True)  # |sum| >= 2 unless two plus, two minus
    # 0.5, 1, -0.25: the 8 sums are +-1.75, +-1.25, +-0.75, +-0.25; |sum| >= 1.25 in 4 of them
    assert sign_flip_test([0.5, 1.0, -0.25]) == (pytest.approx(4 / 8), True)
    assert sign_flip_test([0, 0]) == (1.0, True)
    rng = np.random.default_rng(3)
    d = rng.normal(0.2, 1.0, 14)
    exact, _ = sign_flip_test(d)
    approx, is_exact = sign_flip_test(d, exact_up_to=5, n_resamples=200_000)
    assert not is_exact and approx == pytest.approx(exact, abs=0.005) and 0.01 < exact < 0.99
    p, is_exact = sign_flip_test([1.0] * 25)  # 2 / 2^25 exactly; Monte Carlo reports (1 + 0) / (1 + R)
    assert not is_exact and p == pytest.approx(1 / 100_001)


def test_game_estimate_resamples_games_with_all_their_seeds():
    # game a wins under every seed, game b never: 6 episodes, but only 2 independent games
    table = per_game([{"episode_id": g, "seed": s, "success": g == "a"} for g in "ab" for s in range(3)], "success")
    est = game_estimate(table)
    assert (est.mean, est.n_games, est.n_seeds, est.std_over_seeds) == (0.5, 2, 3, 0.0)
    # resampled pairs of games have means 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4: the 95% interval is [0, 1]
    assert est.ci95 == (0.0, 1.0)
    # what treating the 6 episodes as independent would claim (narrower) and the old t interval over seeds
    assert 0.0 < bootstrap_ci([1, 1, 1, 0, 0, 0])[0] and bootstrap_ci([1, 1, 1, 0, 0, 0])[1] < 1.0
    assert mean_std_ci([0.5, 0.5, 0.5]).ci95 == (0.5, 0.5)
    # per-game means first: a game seen under 2 seeds weighs as much as one seen under 1
    uneven = game_estimate({"a": {0: 1.0, 1: 0.0}, "b": {0: 1.0}})
    assert uneven.mean == 0.75 and uneven.per_seed == {0: 1.0, 1: 0.0} and uneven.std_over_seeds == pytest.approx(0.7071, abs=1e-4)


def _games_run(folder: Path, model: str, outcomes: dict[str, list[int]], **kw) -> Path:
    """One record per (game, seed) from ``{game: [success under seed 0, 1, ...]}``."""
    recs = [record(g, s, bool(w), task_type=TYPES[i % 2]) for i, (g, ws) in enumerate(outcomes.items())
            for s, w in enumerate(ws)]
    return write_run(folder, model, recs, **kw)


def test_paired_tests_over_games_do_not_claim_what_pooled_mcnemar_claims(tmp_path):
    """6 games x 3 seeds. B wins games g0-g3 under every seed and g4 under seed 0; A wins nothing.
    Pooling the 18 episodes as pairs, McNemar has b = 0, c = 13: p = 2 / 2^13 = 0.00024. Over games the
    per-game differences are 1, 1, 1, 1, 1/3, 0: the sign-flip p is 2 / 2^5 = 0.0625 and per seed
    McNemar has c = 5, 4, 4 games: p = 2/32, 2/16, 2/16. Not significant at 0.05."""
    b_wins = {"g0": [1, 1, 1], "g1": [1, 1, 1], "g2": [1, 1, 1], "g3": [1, 1, 1], "g4": [1, 0, 0], "g5": [0, 0, 0]}
    a = _games_run(tmp_path / "A", "base", {g: [0, 0, 0] for g in b_wins})
    b = _games_run(tmp_path / "B", "tuned", b_wins)
    pooled = mcnemar([0] * 18, [w for ws in b_wins.values() for w in ws])
    assert (pooled.b, pooled.c) == (0, 13) and pooled.p_value == pytest.approx(2 / 2 ** 13)
    result = compare(load_run(a), load_run(b), n_resamples=4000)
    overall = result.results[0]
    assert overall.n_games == 6 and overall.seeds == [0, 1, 2]
    assert overall.success.p_value == pytest.approx(2 / 32) and overall.success.exact
    assert {s: (t.b, t.c, t.p_value) for s, t in overall.mcnemar.items()} == {
        0: (0, 5, pytest.approx(2 / 32)), 1: (0, 4, pytest.approx(2 / 16)), 2: (0, 4, pytest.approx(2 / 16))}
    assert overall.success.mean_a == 0 and overall.success.mean_b == pytest.approx((4 + 1 / 3) / 6)
    assert overall.success.diff.ci95 == pytest.approx(paired_bootstrap([0] * 6, [1, 1, 1, 1, 1 / 3, 0], 4000).ci95)
    assert overall.score.p_value == pytest.approx(2 / 32)  # score is 0/1 here: the same test on score
    # the leaderboard: mean over games with a game-bootstrap interval, std over the 3 per-seed means
    row = next(r for r in leaderboard(find_runs([tmp_path])) if r.model == "tuned")
    assert row.success_mean == pytest.approx(13 / 18) and row.games == 6
    assert row.success_std_over_seeds == pytest.approx(mean_std_ci([5 / 6, 4 / 6, 4 / 6]).std)
    assert row.success_ci95 == pytest.approx(bootstrap_ci([1, 1, 1, 1, 1 / 3, 0]))
    assert row.success_ci95[0] < mean_std_ci([5 / 6, 4 / 6, 4 / 6]).ci95[0]  # wider than the old t over seeds


# ---- leaderboard ---------------------------------------------------------------------------
def test_leaderboard_rows_from_run_folders(tmp_path):
    seeded_run(tmp_path / "runs" / "small__alfworld-unseen", "small", [0.5, 0.6, 0.7], torn_tail=True)
    seeded_run(tmp_path / "runs" / "big__alfworld-unseen", "big", [0.8, 0.9, 0.9])
    runs = find_runs([tmp_path / "runs"])
    assert sorted(r.model for r in runs) == ["big", "small"]
    rows = leaderboard(runs)
    assert [r.model for r in rows] == ["big", "small"]  # best success first
    small = rows[1]
    assert small.episodes == 30 and small.games == 10 and small.seeds == [0, 1, 2]  # the torn last line is skipped
    # per game over seeds: ep0-4 always won, ep5 under 2 seeds, ep6 under 1, ep7-9 never
    per_game_means = [1, 1, 1, 1, 1, 2 / 3, 1 / 3, 0, 0, 0]
    assert small.success_mean == pytest.approx(0.6) and small.success_std_over_seeds == pytest.approx(0.1)
    assert small.success_ci95 == pytest.approx(bootstrap_ci(per_game_means))
    assert small.invalid_rate == pytest.approx(3 / 120)  # one invalid turn per seed, 4 turns per episode
    assert small.per_task_type[TYPES[0]]["n"] == 15 and small.per_task_type[TYPES[0]]["games"] == 5
    assert small.date == "2026-11-20" and small.label == "small"
    assert find_runs([tmp_path / "runs" / "big__alfworld-unseen"])[0].model == "big"  # a run folder itself


def test_leaderboard_cli_formats(tmp_path):
    seeded_run(tmp_path / "a", "small", [0.5, 0.6, 0.7])
    runner = CliRunner()
    md = runner.invoke(app, ["leaderboard", str(tmp_path), "--format", "markdown"])
    assert md.exit_code == 0, md.output
    lo, hi = bootstrap_ci([1, 1, 1, 1, 1, 2 / 3, 1 / 3, 0, 0, 0])
    assert f"| small | alfworld-unseen | 60.0 | [{100 * lo:.1f}, {100 * hi:.1f}] | 10.0 | 60.0 | 10 |" in md.output
    assert "std over seeds" in md.output.splitlines()[0]
    rows = list(csv.DictReader(io.StringIO(runner.invoke(app, ["leaderboard", str(tmp_path), "--format", "csv"]).output)))
    assert len(rows) == 1 and float(rows[0]["success_mean"]) == pytest.approx(0.6) and rows[0]["seeds"] == "0 1 2"
    assert float(rows[0]["success_std_over_seeds"]) == pytest.approx(0.1)
    table = runner.invoke(app, ["leaderboard", str(tmp_path)], env={"COLUMNS": "250"})
    assert table.exit_code == 0 and "small" in table.output and "bootstrap" in table.output
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
    """A and B on 20 games, one seed each (seed i % 2): 1 game only A wins, 9 only B, 6 both, 4 neither;
    B has 2 extra episodes."""
    outcomes = [(1, 0)] + [(0, 1)] * 9 + [(1, 1)] * 6 + [(0, 0)] * 4
    ra = [record(f"ep{i}", i % 2, bool(a), task_type=TYPES[i % 2]) for i, (a, _) in enumerate(outcomes)]
    rb = [record(f"ep{i}", i % 2, bool(b), task_type=TYPES[i % 2]) for i, (_, b) in enumerate(outcomes)]
    rb += [record("extra0", 0, True), record("extra1", 1, True)]
    return write_run(tmp_path / "A", "base", ra), write_run(tmp_path / "B", "tuned", rb)


def test_compare_pairs_games_with_sign_flip_mcnemar_per_seed_and_bootstrap(tmp_path):
    a, b = _pair_runs(tmp_path)
    result = compare(load_run(a), load_run(b), n_resamples=2000)
    overall = result.results[0]
    assert (result.only_a, result.only_b) == (0, 2) and result.warnings == ["panel differs (22 vs 20 games)"]
    assert overall.n_games == 20 and overall.seeds == [0, 1]
    # one seed per game: the per-game differences are -1 once and +1 nine times; the sign-flip test is
    # then McNemar's exact test: P(|sum| >= 8) = (1 + 10 + 10 + 1) / 2^10
    assert overall.success.p_value == pytest.approx(22 / 1024)
    # per seed (games of even index have seed 0): seed 0 b = 1, c = 4; seed 1 b = 0, c = 5
    assert {s: (t.b, t.c) for s, t in overall.mcnemar.items()} == {0: (1, 4), 1: (0, 5)}
    assert overall.mcnemar[0].p_value == pytest.approx(12 / 32) and overall.mcnemar[1].p_value == pytest.approx(2 / 32)
    assert overall.success.mean_a == pytest.approx(7 / 20) and overall.success.mean_b == pytest.approx(15 / 20)
    assert overall.score.diff.diff == pytest.approx(8 / 20)
    assert 0 < overall.score.diff.ci95[0] < 0.4 < overall.score.diff.ci95[1]
    per_type = {r.group: r for r in result.results[1:]}
    assert set(per_type) == set(TYPES) and sum(r.n_games for r in per_type.values()) == 20
    assert sum(t.c for r in per_type.values() for t in r.mcnemar.values()) == 9


def test_compare_refuses_unpaired_or_different_env_runs_and_flags_other_settings(tmp_path):
    a = write_run(tmp_path / "A", "m", [record("ep0", 0, True)])
    other_seed = write_run(tmp_path / "B", "m", [record("ep0", 1, True)])
    other_env = write_run(tmp_path / "C", "m", [record("ep0", 0, True)], env_id="alfworld-seen")
    with pytest.raises(SageError, match="share no"):
        compare(load_run(a), load_run(other_seed))
    with pytest.raises(SageError, match="different envs"):
        compare(load_run(a), load_run(other_env))
    out = subprocess.run([SAGE, "compare", str(a), str(other_env)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "different envs" in out.stdout + out.stderr and "Traceback" not in out.stderr
    greedy = write_run(tmp_path / "D", "m", [record("ep0", 0, False)], max_turns=4,
                       decoding={"temperature": 0.0, "top_p": 1.0, "top_k": None, "max_new_tokens": 4096})
    assert compare(load_run(a), load_run(greedy)).warnings == ["turn cap 4 vs 30", "decoding T=0.0, top_p=1.0, "
                                                               "max_new=4096 vs T=0.4, top_p=1.0, max_new=4096"]
    expert = write_run(tmp_path / "E", "expert", [record("ep0", 0, True)], model_kind="expert")
    assert compare(load_run(a), load_run(expert)).warnings == []  # scripted: decoding does not apply


def test_compare_cli_json_and_table(tmp_path):
    a, b = _pair_runs(tmp_path)
    out = CliRunner().invoke(app, ["compare", str(a), str(b), "--format", "json", "--resamples", "500"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    overall = data["results"][0]
    assert overall["group"] == "overall" and overall["mcnemar_per_seed"]["1"]["c"] == 5
    assert overall["success"]["p_value"] == pytest.approx(22 / 1024) and overall["success"]["p_exact"]
    table = CliRunner().invoke(app, ["compare", str(a), str(b)], env={"COLUMNS": "300"})
    assert "0.0215" in table.output and "2 only in B" in table.output and "s1: 0.0625 (0/5)" in table.output


# ---- report -------------------------------------------------------------------------------
def _report_runs(tmp_path: Path) -> Path:
    """Two hf runs and the expert on one panel (6 games), and a run with another turn cap."""
    root = tmp_path / "runs"
    recs = [record(f"ep{i}", s, i % 3 == 0, task_type=TYPES[i % 2], turns=2 + i) for s in range(2) for i in range(6)]
    recs[1]["steps"][0].update(response="</script><script>alert(1)</script> <action>x</action>", action_valid=False,
                               invalid_reason="schema_violation", action=None)
    recs[1]["invalid_turns"]["schema_violation"] = 1
    recs[2]["steps"][0].update(finish_reason="length", action_valid=False, invalid_reason="unparseable", action=None)
    recs[2].update(finish_reasons={"length": 1, "stop": 3}, cut_invalid_turns={"unparseable": 1})
    recs[2]["invalid_turns"]["unparseable"] = 1
    write_run(root / "big__alfworld-unseen", "big", recs)
    write_run(root / "small__alfworld-unseen", "small",
              [record(f"ep{i}", s, i == 0 and s == 0, task_type=TYPES[i % 2]) for s in range(2) for i in range(6)])
    write_run(root / "expert__alfworld-unseen", "expert", [record(f"ep{i}", s, True, task_type=TYPES[i % 2])
                                                           for s in range(2) for i in range(6)], model_kind="expert")
    write_run(root / "big-cap4__alfworld-unseen", "big", [record(f"ep{i}", 0, False, task_type=TYPES[i % 2])
                                                          for i in range(6)], max_turns=4)
    return root


def test_report_plots_runs_whose_interval_ends_round_past_the_mean(tmp_path):
    """`sage report` on an expert run (4 of 4) and a random run (0 of 6), one seed each: no matplotlib crash,
    also when an interval end lies past the mean by float rounding."""
    from sage_evals.plots import Series, bars

    a = write_run(tmp_path / "A", "expert", [record(f"e{i}", 0, True) for i in range(4)])
    b = write_run(tmp_path / "B", "random", [record(f"e{i}", 0, False) for i in range(6)])
    result = CliRunner().invoke(app, ["report", str(a), str(b), "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    assert "<svg" in (tmp_path / "r.html").read_text()
    assert "<svg" in bars("t", ["all"], [Series("m", [0.5], [0.5 + 1e-12], [0.9])])


def test_legend_labels_name_model_and_settings_and_use_folders_only_to_break_ties(tmp_path):
    from sage_evals.leaderboard import run_labels

    recs = [record("ep0", 0, True)]
    write_run(tmp_path / "step-2" / "seen", "student @ step 2", recs, env_id="alfworld-seen")
    write_run(tmp_path / "step-2" / "unseen", "student @ step 2", recs)
    write_run(tmp_path / "greedy", "smol", recs, decoding={"temperature": 0.0, "top_p": 1.0, "top_k": None,
                                                           "max_new_tokens": 96})
    write_run(tmp_path / "hot", "smol", recs)
    write_run(tmp_path / "hot-again", "smol", recs)
    assert run_labels(find_runs([tmp_path])) == {
        "step-2/seen": "student @ step 2", "step-2/unseen": "student @ step 2",  # one per env: no tie
        "greedy": "smol (T=0.0, top_p=1.0, max_new=96)",
        "hot": "smol (T=0.4, top_p=1.0, max_new=4096) [hot]", "hot-again": "smol (T=0.4, top_p=1.0, max_new=4096) [hot-again]"}


def test_run_folders_given_one_by_one_keep_apart_when_their_names_clash(tmp_path):
    """Two run folders both named ``run`` (or two steps' ``seen``): each keeps its own numbers and label."""
    from sage_evals.leaderboard import run_labels

    write_run(tmp_path / "g1" / "run", "expert", [record("ep0", 0, True), record("ep1", 0, True)])
    write_run(tmp_path / "g2" / "run", "random", [record("ep0", 0, False), record("ep1", 0, False)])
    write_run(tmp_path / "t" / "step-1" / "seen", "student @ step 1", [record("ep0", 0, False)], env_id="alfworld-seen")
    write_run(tmp_path / "t" / "step-2" / "seen", "student @ step 2", [record("ep0", 0, True)], env_id="alfworld-seen")
    runs = find_runs([tmp_path / "g1" / "run", tmp_path / "g2" / "run", tmp_path / "t" / "step-1" / "seen",
                      tmp_path / "t" / "step-2" / "seen"])
    assert [r.name for r in runs] == ["g1/run", "g2/run", "step-1/seen", "step-2/seen"]
    rows = {r.model: r.success_mean for r in leaderboard(runs)}
    assert rows == {"expert": 1.0, "random": 0.0, "student @ step 1": 0.0, "student @ step 2": 1.0}
    assert sorted(run_labels(runs).values()) == ["expert", "random", "student @ step 1", "student @ step 2"]


def _value_labels(svg: str) -> list[str]:
    return re.findall(r'<g id="value-label-[^"]*">\s*<text[^>]*>([^<]*)</text>', svg)


def test_report_groups_compares_and_embeds_capped_trajectories(tmp_path):
    runs = find_runs([_report_runs(tmp_path)])
    page = render_report(runs, max_trajectories=5, baseline="small__alfworld-unseen")
    assert not EXTERNAL_URL.search(page), EXTERNAL_URL.search(page)
    assert page.count("</script>") == 2  # model text cannot close the data element
    groups = re.findall(r'<section class="group"><h3>(.*?)</h3>', page)
    assert groups == ["alfworld-unseen · 6 games · turn cap 30 · panel " + runs[0].settings["panel_sha256"][:8],
                      "alfworld-unseen · 6 games · turn cap 4 · panel " + runs[0].settings["panel_sha256"][:8]]
    first, second = page.split('<section class="group">')[1:3]
    # legend names: model plus the setting that tells the two "big" runs apart; no folder names needed
    assert "big (turn cap 30)" in first and "big (turn cap 4)" in second and "expert" in first
    assert "Paired comparison: each run (B) against the baseline small (A)" in first
    compare_rows = re.findall(r'<table class="compare">.*?</table>', first, re.S)[0]
    assert compare_rows.count("<tr") == 3 and "big (turn cap 30)" in compare_rows  # header + big + expert
    assert "Not comparable with the baseline small: big (turn cap 4): turn cap 4 vs 30" in second
    assert first.count("<svg") == 4 and second.count("<svg") == 4  # task types, seeds, invalid causes, turns
    # success per task type: "small" wins nothing on look_at_obj_in_light: its 0 is labelled and drawn
    by_type = re.findall(r"<svg.*?</svg>", first, re.S)[0]
    assert "success per task type (95% interval over games)" in by_type and "0" in _value_labels(by_type)
    assert "100" in _value_labels(by_type)  # the expert
    invalid = re.findall(r"<svg.*?</svg>", first, re.S)[2]
    assert "cut at the token limit" in invalid and "unparseable (no action)" in invalid
    settings = page.split("<h2>Runs</h2>")[1].split("<h2>Trajectories</h2>")[0]
    assert "– (scripted agent)" in settings and "temperature=0.4" in settings
    data = json.loads(re.search(r'<script type="application/json" id="sage-data">(.*?)</script>', page, re.S).group(1))
    assert {d["name"]: (len(d["episodes"]), d["total"]) for d in data}["big__alfworld-unseen"] == (5, 12)
    big = next(d for d in data if d["name"] == "big__alfworld-unseen")
    assert big["episodes"][1]["steps"][0]["response"].startswith("</script>") and big["label"] == "big (turn cap 30)"
    with pytest.raises(SageError, match="--baseline 'nope' is none of the runs"):
        render_report(runs, baseline="nope")


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
    assert page.count('class="step invalid"') == 1 and page.count('class="step valid"') == 2
    assert "invalid: schema_violation" in page and "&lt;/script&gt;&lt;script&gt;alert(1)" in page
    assert "12 of 12 episodes embedded" in page and "invalid turns: schema_violation 1" in page
    assert "ended by turn cap" not in page and "ended by truncated" in page  # records of older runs: no end_reason
    cut = _chrome(binary, tmp_path, "--dump-dom", out.resolve().as_uri() + "#run=big__alfworld-unseen&episode=ep2&seed=0")
    assert "generation ended by length (cut at the token limit)" in cut.stdout
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
    assert c.results[0].n_games == 2
    assert c.results[0].mcnemar[0].b == sum(not r["success"] for r in load_run(runs["sloppy-expert"]).episodes)
    page = render_report(find_runs([tmp_path / "runs"]))
    assert "Nothing happened" in page  # the real invalid-turn feedback is embedded
