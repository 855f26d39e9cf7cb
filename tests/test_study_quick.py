"""The learning loop end to end: `sage study --profile quick` (the regression test of the trainer).

It builds the tiny teacher and student from the real ALFWorld expert, distils the student with
opd and sage_opd on real rollouts, evaluates every model on the fixed panel through sage_evals
and writes the report. It asserts a learning signal that a broken rollout, loss, trainer or
model layer loses: the distilled students keep writing valid actions and move towards the teacher,
the OPD student wins more games than the warm start, and the judge judges real student turns.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAGE = str(Path(sys.executable).with_name("sage"))


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("study") / "quick"
    env = {**os.environ, "SAGE_CACHE": os.environ.get("SAGE_CACHE", str(Path.home() / ".cache" / "sage"))}
    run = subprocess.run([SAGE, "study", "--config", str(ROOT / "configs/study/alfworld_cpu.yaml"), "--profile", "quick",
                          f"out_dir={out}"], capture_output=True, text=True, env=env, timeout=1500)
    assert run.returncode == 0, run.stderr[-3000:]
    return {"out": out, "results": json.loads((out / "results.json").read_text())}


def _row(results: dict, model: str) -> dict:
    (row,) = [r["summary"] for r in results["table"] if r["model"] == model and r["panel"] == "pool"]
    return row


def test_the_teacher_plays_the_panel_far_better_than_the_warm_student(quick):
    results = quick["results"]
    warm, teacher = _row(results, "student-warm"), _row(results, "teacher")
    assert teacher["success"] >= 0.7 and teacher["success"] > warm["success"] + 0.2, (teacher, warm)
    for method in ("opd", "sage_opd"):  # distillation does not collapse into invalid turns (lr 3e-3 once gave 100%)
        row = _row(results, method)
        assert row["invalid_rate"] <= warm["invalid_rate"] + 0.1, (method, row, warm)


@pytest.mark.parametrize("method", ["opd", "sage_opd"])
def test_distillation_pulls_the_student_towards_the_teacher(quick, method):
    """The per-token reverse KL to the teacher on the turns each method trains on falls over training (measured
    on 2026-12-04 in 14 quick runs of 20 or 30 steps and 16 full-profile runs: the last 3 steps sum to 0.09-0.31
    of the first 3); a broken loss, sign, selection mask or optimiser step does not."""
    lines = (quick["out"] / "runs" / f"{method}-seed0" / "metrics.jsonl").read_text().splitlines()
    kl = [json.loads(line)["kl"] for line in lines]
    assert len(kl) >= 6 and sum(kl[-3:]) < 0.8 * sum(kl[:3]), kl


def test_opd_wins_more_games_than_the_warm_start(quick):
    """The issue's learning signal: after OPD the student wins more of the fixed panel (6 pool games x 6 evaluation
    seeds) than the warm start, and more of its own training rollouts (120 episodes a half) late in training than
    early. On one machine the study repeats bit for bit (its data sets are read in one order), but a change of data,
    seed, model or CPU kernels draws another teacher and student, so both must hold across draws. Measured on
    2026-12-04 with the profile's 30 steps at lr 5e-4, draws by teacher and student seed (`teacher.sft.seed=N
    student.sft.seed=N`), panel warm -> opd and rollout success first -> second half:
    seed 0: 30.6% -> 63.9%, 30% -> 52%; seed 1: 33.3% -> 72.2%, 39% -> 65%; seed 2: 44.4% -> 77.8%, 26% -> 53%.
    With 20 steps seed 2 won only 47.2%, one episode in 36 over its warm start; so the profile distils for 30
    and the test asks for 15 points, half the smallest margin measured (33.3).
    A loss, rollout, teacher-scoring or optimiser change that stops the student from learning fails here (an update
    that changes nothing leaves the panel's episodes identical); so does an OPD learning rate that breaks the warm
    student (3e-4 without warmup: 0%).

    ``sage_opd``'s success is a result of the study, not a property to assert: with a judge that agrees with the
    expert on 73-90% of real turns, it trains only on the turns the student gets wrong, and it won 50.0%, 55.6%
    and 19.4% of the panel in those three draws (the full profile: 35.2% against a warm 44.4%;
    docs/results/alfworld-cpu-study.md). Its learning is asserted through the KL test above and the judge test
    below."""
    results = quick["results"]
    warm, opd = _row(results, "student-warm"), _row(results, "opd")
    assert opd["success"] > warm["success"] + 0.15, (opd, warm)
    lines = (quick["out"] / "runs" / "opd-seed0" / "metrics.jsonl").read_text().splitlines()
    success = [json.loads(line)["rollout_success"] for line in lines]
    half = len(success) // 2
    assert sum(success[half:]) > sum(success[:half]), success


def test_the_judge_judges_real_student_turns(quick):
    """The teacher's judge tells the student's turns apart on real rollouts. Measured on 2026-12-04 in the three
    draws above: AUROC 0.80, 0.95 and 0.86 against the expert's labels, Yes to 59-73% of turns. A judge trained on
    Yes answers alone (a bug until then) said Yes to every turn, AUROC 0.42-0.49. A judge trained on 32 judgment
    examples (judge_share 0.5) judged another host's draw at AUROC 0.54; with every balanced labelled turn (178,
    the profile's judge_share null) the same draw's judge reached 0.92 (another draw, 14 teacher epochs: 0.96)."""
    rollouts = quick["results"]["judge"]["rollouts"]
    assert 0.0 < rollouts["judge_yes_rate"] < 1.0 and rollouts["auroc"] > 0.6, rollouts
    training = quick["results"]["training"]
    assert training["sage_opd"]["judge_calls"] > 0 and training["opd"]["judge_calls"] == 0
    judged = [json.loads(line) for line in (quick["out"] / "runs" / "sage_opd-seed0" / "judge_turns.jsonl")
              .read_text().splitlines()]
    assert judged and all(0.0 <= j["p_yes"] <= 1.0 and j["action"] for j in judged)
    assert sum(j["expert_action"] is not None for j in judged) == len(judged)


def test_every_stage_is_recorded_and_a_rerun_resumes_nothing(quick):
    out = quick["out"]
    stages = json.loads((out / "results.json").read_text())["stage_seconds"]
    assert {"expert", "teacher", "student_warm", "train/opd/0", "train/sage_opd/0", "eval/sage_opd/0"} <= set(stages)
    assert (out / "report.md").read_text().count("| sage_opd |") >= 1 and (out / "plots" / "learning-curves.png").is_file()
    assert f"| total | {sum(stages.values()):.1f} |" in (out / "report.md").read_text()
    assert f"Written by `sage study --config {ROOT / 'configs/study/alfworld_cpu.yaml'} --profile quick" in \
        (out / "report.md").read_text()  # the exact command, for whoever reads the report
    again = subprocess.run([SAGE, "study", "--config", str(ROOT / "configs/study/alfworld_cpu.yaml"), "--profile",
                            "quick", f"out_dir={out}"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "stage" not in again.stderr.replace("stages done", "")
