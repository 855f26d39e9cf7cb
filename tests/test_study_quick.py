"""The learning loop end to end: `sage study --profile quick` (the regression test of the trainer).

It builds the tiny teacher and student from the real ALFWorld expert, distils the student with
opd and sage_opd on real rollouts, evaluates every model on the fixed panel through sage_evals
and writes the report. It asserts a learning signal that a broken rollout, loss, trainer or
model layer loses: the distilled students write more valid actions and win more games than the
warm start, and the judge judges real student turns.
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


def test_distillation_beats_the_warm_start(quick):
    results = quick["results"]
    warm, teacher = _row(results, "student-warm"), _row(results, "teacher")
    assert teacher["success"] > warm["success"]  # the teacher can play the panel
    for method in ("opd", "sage_opd"):
        row = _row(results, method)
        assert row["invalid_rate"] < warm["invalid_rate"], (method, row, warm)
        assert row["success"] > warm["success"], (method, row, warm)


def test_the_judge_judges_real_student_turns(quick):
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
    again = subprocess.run([SAGE, "study", "--config", str(ROOT / "configs/study/alfworld_cpu.yaml"), "--profile",
                            "quick", f"out_dir={out}"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "stage" not in again.stderr.replace("stages done", "")
