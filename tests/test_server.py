"""The env server: a real `sage serve` (uvicorn in a subprocess on 127.0.0.1) and RemoteEnv clients."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest

import sage_gym
from sage_gym.agents import ExpertAgent
from sage_gym.remote import RemoteEnv, RemoteEnvError
from sage_gym.server import jsonable
from serving import SAGE, sage_server

TOKEN = "s3cret-token"
ENV_ID = "alfworld-unseen"


@contextmanager
def sage_serve(*args: str):
    """`sage serve` on a free loopback port (see serving.sage_server)."""
    headers = {"Authorization": f"Bearer {TOKEN}"} if TOKEN in args else {}
    with sage_server("serve", "--log-level", "warning", *args, headers=headers) as (url, _):
        yield url


@pytest.fixture(scope="module")
def server():
    with sage_serve("--token", TOKEN, "--max-sessions", "8") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120) as c:
        yield c


def _expert_trace(env, episode_id: str) -> list:
    """Every (observation, reward, terminated, truncated, info) of an expert episode, JSON round-tripped."""
    obs, info = env.reset(seed=0, options={"episode_id": episode_id})
    agent = ExpertAgent()
    agent.reset(env, info)
    trace, done = [[obs, info]], False
    while not done:
        obs, reward, terminated, truncated, info = env.step(agent.act(env, info))
        trace.append([obs, reward, terminated, truncated, info])
        done = terminated or truncated
    return json.loads(json.dumps(jsonable(trace)))


def test_concurrent_expert_episodes_match_in_process(server):
    local = sage_gym.make(ENV_ID)
    episodes = local.unwrapped.episode_ids[:3]
    expected = {e: _expert_trace(local, e) for e in episodes}
    local.close()
    assert all(trace[-1][4]["won"] for trace in expected.values())  # the expert wins: a meaningful trace

    got, errors = {}, []

    def play(episode_id: str) -> None:
        try:
            env = RemoteEnv(server, ENV_ID, token=TOKEN)
            try:
                got[episode_id] = _expert_trace(env, episode_id)
            finally:
                env.close()
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=play, args=(e,)) for e in episodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for e in episodes:
        assert got[e] == expected[e], f"remote episode {e} differs from the in-process one"


def test_slow_env_call_does_not_block_other_requests(server, client):
    session = client.post("/sessions", json={"env_id": ENV_ID}).json()["session_id"]
    episode = client.get(f"/sessions/{session}").json()["episode_ids"][-1]  # a game this server has not loaded yet
    done = {}

    def slow_reset():
        client.post(f"/sessions/{session}/reset", json={"options": {"episode_id": episode}}).raise_for_status()
        done["reset"] = time.monotonic()

    t = threading.Thread(target=slow_reset)
    t.start()
    time.sleep(0.1)
    assert client.get("/health").status_code == 200
    done["health"] = time.monotonic()
    t.join()
    assert done["health"] < done["reset"], "GET /health waited for another session's cold reset"
    assert client.delete(f"/sessions/{session}").json()["closed"]


def test_token_is_required(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        answer = httpx.get(f"{server}/envs", headers=headers)
        assert answer.status_code == 401
        assert "token" in answer.json()["error"]
    with pytest.raises(RemoteEnvError, match="401") as err:
        RemoteEnv(server, ENV_ID, token="wrong")
    assert err.value.status == 401


def test_bad_requests_get_clear_4xx_json_and_the_server_keeps_serving(server, client):
    session = client.post("/sessions", json={"env_id": ENV_ID}).json()["session_id"]

    def error(answer: httpx.Response, status: int) -> str:
        assert answer.status_code == status, answer.text
        return answer.json()["error"]

    assert "invalid request" in error(client.post("/sessions", content=b"{not json",
                                                  headers={"content-type": "application/json"}), 422)
    assert "env_id" in error(client.post("/sessions", json={"kwargs": {}}), 422)
    assert "Did you mean alfworld-unseen" in error(client.post("/sessions", json={"env_id": "alfworld-unsen"}), 404)
    assert "split" in error(client.post("/sessions", json={"env_id": ENV_ID, "kwargs": {"split": "nope"}}), 400)
    assert "nope" in error(client.post("/sessions", json={"env_id": ENV_ID, "kwargs": {"nope": 1}}), 400)
    for kwargs, needle in (({"formatter": "x"}, "'formatter' takes a Python object"),
                           ({"max_turns": 1e308}, "'max_turns' must be an integer, got float"),
                           ({"max_turns": 5000}, "'max_turns' must be between 1 and 1000"),
                           ({"reset_cache_size": 1_000_000}, "'reset_cache_size' must be between 0 and 1024"),
                           ({"render_mode": 7}, "'render_mode' must be a string or null"),
                           ({"render_mode": "human"}, "'render_mode' must be one of ansi, None")):
        assert needle in error(client.post("/sessions", json={"env_id": ENV_ID, "kwargs": kwargs}), 400)
    for path in ("admissible_actions", "expert_actions"):
        assert "no episode yet: call POST" in error(client.get(f"/sessions/{session}/{path}"), 409)
    assert "seed" in error(client.post(f"/sessions/{session}/reset", json={"seed": -1}), 422)
    assert "episode_id" in error(client.post(f"/sessions/{session}/reset", json={"options": {"episode_id": 3}}), 422)
    assert "does not exist" in error(client.post("/sessions/abc/step", json={"response": "x"}), 404)
    assert "reset" in error(client.post(f"/sessions/{session}/step", json={"response": "<action>look</action>"}), 409)
    assert "not in the" in error(client.post(f"/sessions/{session}/reset", json={"options": {"episode_id": "x"}}), 400)
    assert "response" in error(client.post(f"/sessions/{session}/step", json={"response": 3}), 422)
    assert "65536" in error(client.post(f"/sessions/{session}/step", json={"response": "a" * 70_000}), 413)

    # the server and the session still work
    assert client.get("/health").json()["status"] == "ok"
    reset = client.post(f"/sessions/{session}/reset", json={"seed": 1}).json()
    odd = client.post(f"/sessions/{session}/step", headers={"content-type": "application/json"},
                      content=json.dumps({"response": "\ud800 <action>look</action>"}).encode())
    assert odd.status_code == 200 and odd.json()["info"]["messages"][-2]["content"].startswith("\ud800")
    step = client.post(f"/sessions/{session}/step", json={"response": "<action>look</action>"}).json()
    assert step["info"]["action_valid"] and step["info"]["turn"] == 2  # the session answers on after the surrogate
    assert step["info"]["episode_id"] == reset["info"]["episode_id"]
    assert client.delete(f"/sessions/{session}").json()["closed"]
    assert "DELETE" in error(client.post(f"/sessions/{session}/step", json={"response": "x"}), 404)


def test_remote_env_has_the_in_process_api_and_passes_check_env(server):
    from gymnasium.utils.env_checker import check_env

    local = sage_gym.make(ENV_ID)
    env = RemoteEnv(server, ENV_ID, token=TOKEN, history_window=2)
    try:
        assert env.episode_ids == local.unwrapped.episode_ids
        assert env.max_turns == 30 and env.stop == ["</action>"] and env.formatter.history_window == 2
        check_env(env, skip_render_check=True)
        obs, info = env.reset(seed=5)
        lobs, linfo = local.reset(seed=5)
        assert (obs, info["episode_id"]) == (lobs, linfo["episode_id"])
        assert env.admissible_actions() == local.unwrapped.admissible_actions()
        assert env.expert_actions() == local.unwrapped.expert_actions()
        for _ in range(3):  # the server's env honours history_window=2
            env.step("<action>look</action>")
        assert len(env.messages) == 2 + 2 * 2
    finally:
        env.close()
        local.close()
    env.close()  # twice is fine
    with pytest.raises(RemoteEnvError, match="closed"):
        env.reset()
    with pytest.raises(RemoteEnvError, match="Unknown env id"):
        RemoteEnv(server, "no-such-env", token=TOKEN)


def test_remote_env_is_constructible_in_a_worker_process(server):
    code = ("import json, sys; from sage_gym.remote import RemoteEnv; "
            "env = RemoteEnv(sys.argv[1], sys.argv[2], max_turns=4); "  # the token comes from $SAGE_SERVER_TOKEN
            "obs, info = env.reset(seed=2); env.close(); "
            "print(json.dumps({'max_turns': env.max_turns, 'episode_id': info['episode_id']}))")
    out = subprocess.run([sys.executable, "-c", code, server, ENV_ID], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "SAGE_SERVER_TOKEN": TOKEN})
    assert out.returncode == 0, out.stderr
    local = sage_gym.make(ENV_ID)
    _, info = local.reset(seed=2)
    local.close()
    assert json.loads(out.stdout) == {"max_turns": 4, "episode_id": info["episode_id"]}


def test_session_limit_and_idle_expiry():
    with sage_serve("--max-sessions", "2", "--idle-timeout", "1") as url, httpx.Client(base_url=url, timeout=120) as c:
        first = c.post("/sessions", json={"env_id": ENV_ID}).json()["session_id"]
        second = c.post("/sessions", json={"env_id": ENV_ID})
        assert second.status_code == 201
        third = c.post("/sessions", json={"env_id": ENV_ID})
        assert third.status_code == 429 and "session limit" in third.json()["error"]
        assert c.delete(f"/sessions/{first}").status_code == 200
        assert c.post("/sessions", json={"env_id": ENV_ID}).status_code == 201
        assert c.get("/health").json()["sessions"] == 2

        time.sleep(2.5)  # idle timeout 1 s; the reaper runs every 0.25 s
        assert c.get("/health").json()["sessions"] == 0
        gone = c.get(f"/sessions/{second.json()['session_id']}")
        assert gone.status_code == 404 and "expired" in gone.json()["error"]
        assert c.post("/sessions", json={"env_id": ENV_ID}).status_code == 201  # room again


def test_jsonable_turns_numpy_and_containers_into_json_types():
    value = {"a": np.int64(3), "b": np.array([1.5, 2.0]), "c": (1, {2}), "d": Path("/x"), 5: float("nan"), "e": None}
    assert jsonable(value) == {"a": 3, "b": [1.5, 2.0], "c": [1, [2]], "d": "/x", "5": "nan", "e": None}
    json.dumps(jsonable(value), allow_nan=False)


def test_sage_evaluate_runs_its_workers_on_the_server(server, tmp_path):
    """`sage evaluate --env-server` builds a RemoteEnv in each worker process (token from $SAGE_SERVER_TOKEN)."""
    out = subprocess.run([SAGE, "evaluate", "--model", "expert", "--env", ENV_ID, "--limit", "2", "--workers", "2",
                          "--env-server", server, "--out", str(tmp_path / "run")], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "SAGE_SERVER_TOKEN": TOKEN})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "episodes.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["success"] and r["steps"] for r in records)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.get(f"{server}/sessions", headers=headers).json()["sessions"] == []  # the workers closed theirs
