"""The episode runner and `sage evaluate`: real ALFWorld, tiny real models, crashing workers,
resume after kill -9, settings checks, no surviving child processes, summary statistics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

import sage_gym
from sage_models import HFPolicy
from sage_models.policy import Decoding
from sage_evals.runner import RunSettingsMismatch, evaluate
from sage_evals.stats import bootstrap_ci
from sage_evals.summary import summarize
from sage_gym.errors import SageError
from sage_gym.core import EpisodeStart, GameStep, TextEnv

ROOT = Path(__file__).resolve().parents[1]
SAGE = str(ROOT / ".venv" / "bin" / "sage")


# ---- a test-only env whose episodes crash or raise on purpose --------------------------------
class ToyEnv(TextEnv):
    """Episodes ok-*: `win` wins. crash: the process dies at the first step. flaky: dies once (a marker
    file remembers), then plays normally. raise: the env raises at reset."""

    env_id = "toy-crashy"
    rules = "Commands: look, win."

    def __init__(self, marker_dir: str, max_turns: int = 4, history_window: int | None = None):
        super().__init__(["ok-0", "crash", "flaky", "raise", "ok-1"], max_turns)
        self.marker = Path(marker_dir) / "flaky-crashed"

    def step(self, response):
        if self._episode_id == "crash" or (self._episode_id == "flaky" and not self.marker.exists()):
            self.marker.touch()
            os._exit(3)
        return super().step(response)

    def _start_episode(self, episode_id):
        if episode_id == "raise":
            raise RuntimeError("the toy game refuses to start")
        return EpisodeStart(task="win", observation=f"You are in room {episode_id}.", task_type=episode_id.split("-")[0])

    def _game_step(self, action):
        won = action == "win"
        return GameStep(observation="You won." if won else "A room.", score=float(won), done=won, won=won)

    def is_valid_action(self, action):
        return action in ("look", "win")

    def admissible_actions(self):
        return ["look", "win"]

    def expert_actions(self):
        return ["look", "win"]


sage_gym.register(sage_gym.EnvSpec("toy-crashy", "test_eval_runner:ToyEnv", family="toy", split="test", max_turns=4))


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]


def _live_children() -> list[psutil.Process]:
    """Child processes other than multiprocessing's resource tracker (started once per interpreter)."""
    kids = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" not in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                kids.append(p)
        except psutil.NoSuchProcess:
            pass
    return kids


# ---- real ALFWorld ---------------------------------------------------------------------------
def test_expert_solves_alfworld_with_two_workers(tmp_path):
    summary = evaluate("expert", "alfworld-unseen", workers=2, limit=3, out_dir=tmp_path, progress=False)
    records = _lines(tmp_path)
    panel = sage_gym.make("alfworld-unseen").unwrapped.episode_ids[:3]
    assert sorted(r["episode_id"] for r in records) == sorted(panel)
    assert all(r["success"] and r["score"] == 1.0 and r["terminated"] and r["error"] is None for r in records)
    assert summary["success"]["mean"] == 1.0 and summary["n_episodes"] == 3
    assert all(s["action_valid"] for r in records for s in r["steps"])
    settings = json.loads((tmp_path / "run.json").read_text())
    assert settings["model_kind"] == "expert" and settings["panel"] == panel and settings["max_turns"] == 30
    assert _live_children() == []


def test_tiny_model_on_alfworld_is_seeded_and_batch_independent(tiny_models, tmp_path):
    """Sampling seeds are per (episode, seed, turn): 2 workers (batched) and 1 worker give the same run."""
    policy = HFPolicy(tiny_models["student"])
    decoding = Decoding(max_new_tokens=8)
    kwargs = dict(seeds=[0, 1], limit=2, decoding=decoding, env_kwargs={"max_turns": 2}, progress=False)
    summary = evaluate(policy, "alfworld-unseen", workers=2, out_dir=tmp_path / "a", **kwargs)
    again = evaluate(policy, "alfworld-unseen", workers=1, out_dir=tmp_path / "b", **kwargs)
    a = {(r["episode_id"], r["seed"]): r for r in _lines(tmp_path / "a")}
    b = {(r["episode_id"], r["seed"]): r for r in _lines(tmp_path / "b")}
    assert len(a) == 4 and a.keys() == b.keys()
    assert all([s["response"] for s in a[k]["steps"]] == [s["response"] for s in b[k]["steps"]] for k in a)
    responses = [s["response"] for r in a.values() for s in r["steps"]]
    assert len(set(responses)) > 1  # the seeds differ per episode/turn
    for r in a.values():
        assert r["turns"] == 2 and r["truncated"] and len(r["steps"]) == 2
        assert 0 < r["completion_tokens"] <= 16 and r["prompt_tokens"] > 100
        assert len(r["messages"]) == 2 + 2 * 2
        assert sum(r["invalid_turns"].values()) == sum(not s["action_valid"] for s in r["steps"])
    assert summary["success"]["interval"] == "bootstrap over 2 games, seeds kept together"
    assert summary["tokens"]["completion"] == sum(r["completion_tokens"] for r in a.values())
    assert again["settings"]["decoding"] == {"temperature": 0.4, "top_p": 1.0, "top_k": None, "max_new_tokens": 8}
    assert again["settings"]["max_context"] == 8192 and again["settings"]["prompt"] is None
    steps = [s for r in a.values() for s in r["steps"]]
    assert {s["finish_reason"] for s in steps} <= {"stop", "eos", "length", "context"}
    assert sum(r["finish_reasons"].get("length", 0) for r in a.values()) == summary["finish_reasons"]["length"] > 0


class RecordingPolicy(HFPolicy):
    """The real tiny model; it also keeps every conversation it was asked to answer."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.asked: list[list[dict]] = []

    def generate(self, conversations, decoding, stop, seeds=None, on_tokens=None):
        self.asked += conversations
        return super().generate(conversations, decoding, stop, seeds=seeds, on_tokens=on_tokens)


def test_context_window_ends_an_episode_with_a_recorded_reason(tiny_models, tmp_path):
    """A window that holds the first prompt plus 10 tokens: turn 1 is cut where the window is full (reason
    context, an invalid turn counted as cut, not as a model that wrote no action); turn 2's prompt no
    longer fits, so the episode ends there (end_reason context_limit) instead of running to the turn cap."""
    probe = RecordingPolicy(tiny_models["student"])
    evaluate(probe, "alfworld-unseen", limit=1, workers=1, out_dir=tmp_path / "probe", progress=False,
             decoding=Decoding(max_new_tokens=1), env_kwargs={"max_turns": 1})
    first = len(probe.prompt_ids(probe.asked[0]))
    policy = HFPolicy(tiny_models["student"], max_context=first + 10)
    summary = evaluate(policy, "alfworld-unseen", limit=1, workers=1, out_dir=tmp_path / "run", progress=False,
                       decoding=Decoding(max_new_tokens=64))
    (r,) = _lines(tmp_path / "run")
    assert r["end_reason"] == "context_limit" and r["truncated"] and not r["terminated"] and r["turns"] == 1
    assert r["steps"][0]["finish_reason"] == "context" and r["completion_tokens"] == 10
    assert r["finish_reasons"] == {"context": 1} and r["invalid_turns"]["unparseable"] == 1
    assert r["cut_invalid_turns"] == {"empty": 0, "unparseable": 1, "schema_violation": 0}
    assert summary["end_reasons"] == {"context_limit": 1} and summary["settings"]["max_context"] == first + 10
    assert summary["cut_at_token_limit"] == {"turns": 1, "rate": 1.0, "invalid": 1}
    assert summary["invalid_causes"] == {"cut_at_token_limit": 1.0, "empty": 0.0, "unparseable": 0.0,
                                         "schema_violation": 0.0}
    assert summary["invalid_rate"]["unparseable"] == 1.0  # the env's own verdict is kept as it was


def test_system_prompt_and_fewshot_shape_the_prompt_and_are_checked_on_resume(tiny_models, tmp_path):
    """--system-prompt replaces the system message; --fewshot 3 puts the expert's first turns on
    alfworld-train (the env's own rendering) before the episode. Both go into run.json and a resume
    with other prompt options is refused."""
    from sage_gym.fewshot import example_episodes

    policy = RecordingPolicy(tiny_models["student"])
    kwargs = dict(limit=1, workers=1, out_dir=tmp_path / "run", progress=False, decoding=Decoding(max_new_tokens=4),
                  env_kwargs={"max_turns": 1})
    evaluate(policy, "alfworld-unseen", system_prompt="Be brief.", fewshot=3, **kwargs)
    examples, source = example_episodes("alfworld-unseen", 3)
    assert source["env_id"] == "alfworld-train" and len(source["episode_ids"]) == 1
    asked = policy.asked[0]
    assert asked[0] == {"role": "system", "content": "Be brief."}
    assert [m["role"] for m in asked] == ["system", "user", "assistant", "user", "assistant", "user", "assistant", "user"]
    assert asked[1]["content"].startswith("Worked example") and examples[0][0]["content"] in asked[1]["content"]
    assert [m["content"] for m in asked[2:7:2]] == [m["content"] for m in examples[0][1:6:2]]
    assert all(m["content"].startswith("<action>") for m in asked[2:7:2])  # the env's action format
    episode = _lines(tmp_path / "run")[0]["messages"]
    assert asked[-1]["content"].endswith(episode[1]["content"]) and "Now your own episode" in asked[-1]["content"]
    assert episode[0]["content"] != "Be brief."  # the record keeps the env's own conversation
    prompt = json.loads((tmp_path / "run" / "run.json").read_text())["prompt"]
    assert prompt["system_prompt"] == "Be brief." and prompt["fewshot"] == 3 and prompt["fewshot_source"] == source
    with pytest.raises(RunSettingsMismatch, match="prompt"):
        evaluate(policy, "alfworld-unseen", system_prompt="Be brief.", fewshot=2, **kwargs)
    with pytest.raises(SageError, match="scripted agent 'expert' reads no prompt"):
        evaluate("expert", "alfworld-unseen", fewshot=2, limit=1, out_dir=tmp_path / "x", progress=False)


def test_progress_counts_turns_tokens_and_an_eta_before_any_episode_ends():
    """The ETA comes from turns played, so it exists while episodes are in flight (none finished yet: it
    assumes the turn cap) and uses the finished episodes' mean length once there are some."""
    from sage_evals.runner import _Progress

    bar = _Progress(False, total=4, records=[], max_turns=10)
    assert bar.eta() is None
    bar.t0 -= 20.0  # 20 s into the run
    bar.in_flight(2)
    bar.turns_done(2, 40, 4.0)  # one generate call: 2 turns, 40 new tokens in 4 s
    # 2 turns in 20 s; 2 live episodes with 9 turns left each at the cap, 2 unstarted with 10: 38 turns
    assert bar.eta() == pytest.approx(38 * 10.0, rel=0.01) and bar.rate() == pytest.approx(10.0)
    text = bar._text()
    assert "turns 2" in text and "2 in flight" in text and "10.0 tok/s" in text and "ETA 0:06:" in text
    bar.finished({"success": True, "turns": 1}, played=1)  # one ends after 1 turn: episodes now look 1 turn long
    bar.in_flight(2)
    assert bar.eta() == pytest.approx((2 * 1 - 1 + 1 * 1) * 10.0, rel=0.01)  # 1 live turn left, 1 unstarted


# ---- crashes, errors, resume -----------------------------------------------------------------
@pytest.mark.parametrize("which", ["expert", "tiny"])
def test_crashing_workers_are_restarted_and_failures_recorded(which, tiny_models, tmp_path):
    policy = "expert" if which == "expert" else HFPolicy(tiny_models["student"])
    summary = evaluate(policy, "toy-crashy", workers=2, out_dir=tmp_path / "run", max_retries=1, progress=False,
                       env_kwargs={"marker_dir": str(tmp_path)}, decoding=Decoding(max_new_tokens=4))
    records = {r["episode_id"]: r for r in _lines(tmp_path / "run")}
    assert len(_lines(tmp_path / "run")) == 5 and set(records) == {"ok-0", "ok-1", "crash", "flaky", "raise"}
    assert "died" in records["crash"]["error"] and "failed 2 times" in records["crash"]["error"]
    assert "the toy game refuses to start" in records["raise"]["error"]
    assert records["flaky"]["error"] is None  # crashed once, retried, then played
    assert summary["n_errors"] == 2
    if which == "expert":
        assert records["ok-0"]["success"] and records["flaky"]["success"]
        assert summary["success"]["mean"] == pytest.approx(3 / 5)
    assert _live_children() == []


def test_resume_refuses_other_settings(tmp_path):
    kwargs = dict(out_dir=tmp_path / "run", workers=1, limit=1, progress=False)
    evaluate("expert", "toy-crashy", env_kwargs={"marker_dir": str(tmp_path)}, **kwargs)
    with pytest.raises(RunSettingsMismatch, match=r"max_turns.*run has 4, now 3"):
        evaluate("expert", "toy-crashy", env_kwargs={"marker_dir": str(tmp_path), "max_turns": 3}, **kwargs)
    with pytest.raises(RunSettingsMismatch, match="seeds"):
        evaluate("expert", "toy-crashy", env_kwargs={"marker_dir": str(tmp_path)}, seeds=[0, 1], **kwargs)
    # the same settings resume (nothing left to do) and keep the one line
    evaluate("expert", "toy-crashy", env_kwargs={"marker_dir": str(tmp_path)}, **kwargs)
    assert len(_lines(tmp_path / "run")) == 1


def _start_cli(out: Path, limit: int, workers: int) -> subprocess.Popen:
    """``sage evaluate`` as a terminal's foreground job: SIGINT at its default, whatever this process inherited. A
    shell starts background jobs (``cmd &``, nohup) with SIGINT ignored, the ignore is inherited across exec, and
    Python then installs no KeyboardInterrupt handler: Ctrl-C tests run that way saw the CLI ignore the signal."""
    return subprocess.Popen([SAGE, "evaluate", "--model", "expert", "--env", "alfworld-unseen", "--limit", str(limit),
                             "--workers", str(workers), "--out", str(out), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_lines(out: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    f = out / "episodes.jsonl"
    while time.time() < deadline:
        if f.exists() and f.read_text().count("\n") >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise AssertionError(f"no {n} lines in {timeout} s")


def _gone(pids: list[int], timeout: float = 30) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.2)
    return False


def test_resume_after_kill_9_loses_and_duplicates_nothing(tmp_path):
    out = tmp_path / "run"
    proc = _start_cli(out, limit=4, workers=1)
    _wait_lines(out, 1, proc)
    workers = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    proc.kill()  # kill -9: no cleanup code runs in the main process
    proc.wait()
    assert workers and _gone(workers), "env workers outlived a killed run"
    with open(out / "episodes.jsonl", "a") as f:
        f.write('{"episode_id": "torn mid-wri')  # what a kill during a write leaves
    done_before = len(_lines_tolerant(out))
    rerun = subprocess.run([SAGE, "evaluate", "--model", "expert", "--env", "alfworld-unseen", "--limit", "4",
                            "--workers", "1", "--out", str(out), "--no-progress"], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    records = _lines(out)
    panel = sage_gym.make("alfworld-unseen").unwrapped.episode_ids[:4]
    assert sorted(r["episode_id"] for r in records) == sorted(panel)  # all there, none twice
    assert 1 <= done_before < 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_episodes"] == 4 and summary["success"]["mean"] == 1.0
    assert summary["timing"]["episodes_this_session"] == 4 - done_before


def _lines_tolerant(out: Path) -> list[dict]:
    good = []
    for line in (out / "episodes.jsonl").read_text().splitlines():
        try:
            good.append(json.loads(line))
        except ValueError:
            pass
    return good


def test_ctrl_c_leaves_no_workers_and_says_how_to_resume(tmp_path):
    # 40 games, so that the expert (well under a second a game) is still playing when the signal arrives
    games = 40
    proc = _start_cli(tmp_path / "run", limit=games, workers=2)
    _wait_lines(tmp_path / "run", 1, proc)
    workers = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    assert len(workers) >= 2
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err
    done = len(_lines(tmp_path / "run"))
    assert f"interrupted: {done} of {games} episodes are saved in {tmp_path / 'run' / 'episodes.jsonl'}" in err
    assert (f"to resume: sage evaluate --model expert --env alfworld-unseen --limit {games} --workers 2 --out "
            f"{tmp_path / 'run'} --no-progress\n") in err  # one line, to copy
    assert _gone(workers, timeout=15)


def test_piped_progress_is_one_plain_line_per_episode(tmp_path):
    run = subprocess.run([SAGE, "evaluate", "--model", "expert", "--env", "alfworld-unseen", "--limit", "2",
                          "--workers", "1", "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    lines = [ln for ln in run.stderr.splitlines() if ln.startswith("episode ")]
    assert [ln.split(" ")[1] for ln in lines] == ["1/2", "2/2"] and all("success in" in ln for ln in lines)
    assert "━" not in run.stderr and "[red]" not in run.stderr  # no bar redrawn into a log, no markup
    assert "success" in run.stdout  # the summary table


def test_unknown_model_is_one_red_line(tmp_path):
    run = subprocess.run([SAGE, "evaluate", "--model", "gpt-nonexistent", "--env", "alfworld-unseen", "--out",
                          str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 2
    assert "error:" in run.stderr and "Unknown model 'gpt-nonexistent'" in run.stderr and "Traceback" not in run.stderr


# ---- summary statistics ----------------------------------------------------------------------
def _rec(ep: str, seed: int, success: bool, score: float, task_type: str, turns: int, invalid: dict | None = None):
    return {"episode_id": ep, "seed": seed, "task_type": task_type, "success": success, "score": score,
            "turns": turns, "invalid_turns": {"empty": 0, "unparseable": 0, "schema_violation": 0, **(invalid or {})},
            "prompt_tokens": 10, "completion_tokens": 3, "error": None}


def test_summary_statistics_on_a_constructed_example():
    wins = {0: [1, 0, 1, 1], 1: [1, 1, 0, 0], 2: [0, 0, 0, 1]}  # per-seed rates .75 .5 .25
    records = [_rec(f"e{i}", s, bool(w), float(w), "a" if i < 2 else "b", 5, {"unparseable": 1} if i == 0 else None)
               for s, ws in wins.items() for i, w in enumerate(ws)]
    s = summarize(records, {"model": "m"})
    # per game over the 3 seeds: e0 2/3, e1 1/3, e2 1/3, e3 2/3; the mean over games is 0.5
    assert s["success"]["mean"] == pytest.approx(0.5) and s["success"]["std_over_seeds"] == pytest.approx(0.25)
    assert s["success"]["ci95"] == pytest.approx(list(bootstrap_ci([2 / 3, 1 / 3, 1 / 3, 2 / 3])))
    assert s["success"]["ci95"][0] == pytest.approx(1 / 3) and s["success"]["ci95"][1] == pytest.approx(2 / 3)
    assert (s["success"]["n_games"], s["success"]["n_seeds"]) == (4, 3)
    assert s["success"]["per_seed"] == {"0": 0.75, "1": 0.5, "2": 0.25}
    assert s["per_task_type"]["a"] == {"n": 6, "games": 2, "success": pytest.approx(0.5), "score": pytest.approx(0.5),
                                       "success_ci95": pytest.approx([1 / 3, 2 / 3]),
                                       "score_ci95": pytest.approx([1 / 3, 2 / 3])}
    assert s["invalid_rate"]["unparseable"] == pytest.approx(3 / 60) and s["invalid_rate"]["empty"] == 0
    assert s["turns_mean"] == 5 and s["tokens"] == {"prompt": 120, "completion": 36}
    one_seed = summarize([r for r in records if r["seed"] == 0], {})
    assert one_seed["success"]["std_over_seeds"] is None and one_seed["success"]["mean"] == 0.75
    assert one_seed["success"]["interval"] == "bootstrap over 4 games, seeds kept together"


def test_env_server_hook_plays_remote_envs(tmp_path):
    """--env-server: each worker builds a RemoteEnv against a real `sage serve` on 127.0.0.1."""
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([SAGE, "serve", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.HTTPError:
                assert server.poll() is None, server.stderr.read()
                time.sleep(0.2)
        summary = evaluate("expert", "alfworld-unseen", workers=2, limit=2, out_dir=tmp_path, env_server=url,
                           progress=False)
    finally:
        server.terminate()
        server.wait(30)
    assert summary["n_episodes"] == 2 and summary["success"]["mean"] == 1.0 and summary["n_errors"] == 0


# ---- runs that failed must say so; bad input is one clear line -----------------------------------
def _cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([SAGE, "evaluate", *args], capture_output=True, text=True, timeout=timeout, env=env)


def _one_line_error(run: subprocess.CompletedProcess, needle: str, code: int = 2) -> None:
    assert run.returncode == code, (run.returncode, run.stderr[-2000:])
    assert run.stderr.startswith("error: ") and needle in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_a_run_whose_episodes_all_errored_exits_non_zero_and_counts_errors_by_cause(tmp_path):
    from serving import free_port

    down = f"http://127.0.0.1:{free_port()}"  # no retrieval server listens there
    out = tmp_path / "run"
    args = ["--model", "expert", "--env", "searchqa-demo", "--limit", "3", "--workers", "1", "--retries", "0",
            "--env-arg", f"retriever={down}", "--env-arg", "topk=2", "--out", str(out), "--no-progress"]
    run = _cli(*args)
    _one_line_error(run, "3 of 3 episodes failed with errors, more than the allowed share 0.1", code=3)
    assert "3 of 3 episodes errored" in run.stdout and "3 x RetrievalError: cannot reach the retrieval server" in run.stdout
    summary = json.loads((out / "summary.json").read_text())
    (cause, n), = summary["errors_by_cause"].items()
    assert n == 3 and cause.startswith(f"RetrievalError: cannot reach the retrieval server at {down}")
    settings = json.loads((out / "run.json").read_text())
    assert settings["env_kwargs"]["retriever"] == down and settings["env_kwargs"]["topk"] == 2
    tolerant = _cli(*args, "--max-error-share", "1")  # resumes (nothing left to do), allowed: exit 0, still said
    assert tolerant.returncode == 0 and "3 of 3 episodes errored" in tolerant.stdout, tolerant.stderr
    other = _cli(*args[:-5], "--env-arg", "topk=3", "--out", str(out), "--no-progress")
    _one_line_error(other, "env_kwargs")  # env options are checked on resume


def test_a_second_writer_of_a_run_folder_is_refused(tmp_path):
    out = tmp_path / "run"
    first = _start_cli(out, limit=6, workers=1)
    _wait_lines(out, 1, first)
    second = _cli("--model", "expert", "--env", "alfworld-unseen", "--limit", "6", "--workers", "1", "--out", str(out),
                  "--no-progress")
    _one_line_error(second, f"{out} is in use by another sage evaluate (pid {first.pid})")
    assert first.wait(300) == 0, first.communicate()
    records = _lines(out)
    assert len(records) == 6 and len({(r["episode_id"], r["seed"]) for r in records}) == 6
    assert json.loads((out / "summary.json").read_text())["n_episodes"] == 6


@pytest.mark.parametrize("case", ["seeds 0,0", "seeds ''", "seeds -1", "out is a file", "junk config.json",
                                  "empty run.json", "non-object line", "unknown env option", "env option type"])
def test_bad_input_is_one_clear_line(case, tmp_path):
    out = tmp_path / "run"
    args = {"--model": "expert", "--env": "alfworld-unseen", "--limit": "1", "--workers": "1", "--out": str(out)}
    extra: list[str] = []
    if case.startswith("seeds"):
        extra, needle = [f"--seeds={case.split()[1].strip(chr(39))}"], "seed"
        needle = {"0,0": "seeds must be distinct integers >= 0, e.g. 0,1,2; got [0, 0]", "": "got none",
                  "-1": "a seed must be an integer between 0 and 2**63-1, got -1"}[case.split()[1].strip("'")]
    elif case == "out is a file":
        out.write_text("not a folder")
        needle = f"the run folder {out} is a file; pass a folder"
    elif case == "junk config.json":
        (tmp_path / "model").mkdir()
        (tmp_path / "model" / "config.json").write_text("{junk")
        args["--model"], needle = str(tmp_path / "model"), "config.json' is not valid JSON"
    elif case == "empty run.json":
        out.mkdir()
        (out / "run.json").write_text("")
        needle = "run.json is empty or not valid JSON"
    elif case == "non-object line":
        evaluate("expert", "alfworld-unseen", limit=1, workers=1, out_dir=out, progress=False)
        with open(out / "episodes.jsonl", "a") as f:
            f.write("[1, 2]\n")
        needle = "episodes.jsonl:2 holds a JSON list, not an object"
    elif case == "unknown env option":
        extra, needle = ["--env-arg", "topk=3"], "alfworld-unseen has no option 'topk'; accepted: data_dir,"
    else:
        extra, needle = ["--env-arg", "max_turns=lots"], "option 'max_turns' must be an integer, got str 'lots'"
    run = _cli(*[x for kv in args.items() for x in kv], *extra, "--no-progress")
    _one_line_error(run, needle)


def test_resume_compares_effective_settings(tmp_path):
    out = tmp_path / "run"
    base = ["--model", "expert", "--env", "alfworld-unseen", "--limit", "1", "--workers", "1", "--out", str(out),
            "--no-progress"]
    assert _cli(*base).returncode == 0
    explicit = _cli(*base, "--max-turns", "30", "--env-arg", "reset_cache_size=64", "--env-arg", "render_mode=null")
    assert explicit.returncode == 0, explicit.stderr  # the defaults given explicitly: the same run, resumed
    assert len(_lines(out)) == 1
    _one_line_error(_cli(*base, "--env-arg", "max_turns=29"), "max_turns: run has 30, now 29")


def test_data_dir_registers_custom_searchqa_datasets_and_the_expert_is_an_oracle(tmp_path):
    """A FlashRAG dataset folder under --data-dir is searchqa-<name>; the expert searches the question and answers
    the gold answer (a format/scoring oracle: it needs no supporting passages)."""
    from sage_gym.envs.searchqa_demo import build_world
    from sage_gym.retrieval import build_bm25s_index

    corpus, splits = build_world()
    folder = tmp_path / "data" / "searchqa" / "mine"
    folder.mkdir(parents=True)
    questions = splits["test"][:3]
    (folder / "test.jsonl").write_text("".join(json.dumps({"id": f"m{i}", "question": q.question,
                                                           "golden_answers": q.golden_answers}) + "\n"
                                               for i, q in enumerate(questions)))
    build_bm25s_index(corpus, folder / "index")
    env = {k: v for k, v in os.environ.items() if k not in ("SAGE_DATA", "SAGE_RETRIEVER")}
    out = tmp_path / "run"
    run = _cli("--model", "expert", "--env", "searchqa-mine", "--data-dir", str(tmp_path / "data"), "--workers", "1",
               "--out", str(out), "--no-progress", env=env)
    assert run.returncode == 0, run.stderr
    records = sorted(_lines(out), key=lambda r: r["episode_id"])
    assert [r["episode_id"] for r in records] == ["m0", "m1", "m2"] and all(r["success"] for r in records)
    assert [s["action"] for s in records[1]["steps"]] == [f"search[{questions[1].question}]",
                                                          f"answer[{questions[1].golden_answers[0]}]"]
    assert "data_dir" not in json.loads((out / "run.json").read_text())["env_kwargs"]  # machine-local
    _one_line_error(_cli("--model", "expert", "--env", "searchqa-mine", "--out", str(tmp_path / "x"), env=env),
                    "Unknown env id 'searchqa-mine'")
