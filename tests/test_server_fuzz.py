"""Malformed requests against both real servers (`sage serve`, `sage retriever serve`, on 127.0.0.1): every
answer is a 4xx JSON error or a 2xx, never a 5xx; the servers stay up; a session that took bad input plays
on exactly like an in-process env; bodies over the limit are refused before they are read."""

from __future__ import annotations

import json
import random
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

import sage_gym
from sage_gym.agents import ExpertAgent
from serving import SAGE, sage_server

ENV_ID = "searchqa-demo"
N_REQUESTS = 1200
TIME_BOUND = 180.0  # seconds for the whole fuzz loop on a busy 2-core machine
WEIRD = ["\ud800", "x\udfffy", "\x00", "é" * 3, "🙂", "", " ", "a" * 5000, "<action>", "]]]", "%s%n", "\\", "\u202e"]
NUMBERS = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" + "0" * 5000, "-1", "0", "1.5", "1e308",
           "9223372036854775808", "-9223372036854775809", "true", "null", '"3"', "[]", "{}"]
BAD_KWARGS = [{"formatter": "x"}, {"max_turns": 1e308}, {"max_turns": 0}, {"max_turns": -3}, {"max_turns": "30"},
              {"max_turns": True}, {"history_window": 0}, {"render_mode": 7}, {"render_mode": "human"},
              {"reset_cache_size": 1_000_000}, {"topk": 0}, {"topk": 10**6}, {"prompt_format": "x"}, {"nope": 1},
              {"split": "nope"}, {"data_dir": 5}, {"max_query_chars": -1}, {"retriever": 3}, {"dataset": ["x"]}]


def _raw(numbers_in: str) -> list[bytes]:
    """JSON texts with a non-standard or extreme number in each slot of ``numbers_in`` (a template with {})."""
    return [numbers_in.replace("{}", n).encode() for n in NUMBERS]


def _mutants(rng: random.Random, body: bytes, n: int) -> list[bytes]:
    """``n`` random corruptions of a valid body: bytes flipped, dropped, inserted or a slice repeated."""
    out = []
    for _ in range(n):
        b = bytearray(body)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(b))
            op = rng.randrange(4)
            if op == 0:
                b[i] = rng.randrange(256)
            elif op == 1:
                del b[i]
            elif op == 2:
                b.insert(i, rng.choice(b'{}[]",:\\0123456789eE.-+ntfu\xff\xed'))
            else:
                b[i:i] = b[i:i + rng.randint(1, 8)] * rng.randint(2, 50)
        out.append(bytes(b))
    return out


def env_requests(rng: random.Random, sid: str, fresh: str) -> list[tuple[str, str, bytes | None]]:
    """(method, path, body) of malformed env-server requests; ``fresh`` is a session never reset."""
    bad_json = [b"{not json", b"", b"[", b'{"env_id": }', b"\xff\xfe", b"null", b"[]", b"3", b'"s"',
                b"[" * 20000 + b"]" * 20000, json.dumps({"env_id": ENV_ID, "extra": 1}).encode()]
    out = [("POST", "/sessions", b) for b in bad_json]
    out += [("POST", "/sessions", json.dumps({"env_id": ENV_ID, "kwargs": kw}).encode()) for kw in BAD_KWARGS]
    out += [("POST", "/sessions", json.dumps({"env_id": w}).encode()) for w in WEIRD]
    out += [("POST", "/sessions", t) for t in _raw('{"env_id": "searchqa-demo", "kwargs": {"max_turns": {}}}')]
    out += [("POST", "/sessions", t) for t in _raw('{"env_id": {}}')]
    out += [("POST", f"/sessions/{sid}/reset", t) for t in _raw('{"seed": {}}')]
    out += [("POST", f"/sessions/{sid}/reset", t) for t in _raw('{"options": {"episode_id": {}}}')]
    out += [("POST", f"/sessions/{sid}/reset", json.dumps({"options": {"episode_id": w}}).encode()) for w in WEIRD]
    out += [("POST", f"/sessions/{sid}/reset", b) for b in bad_json + [b'{"options": 3}', b'{"seed": 1, "x": 2}']]
    out += [("POST", f"/sessions/{sid}/step", t) for t in _raw('{"response": {}}')]
    out += [("POST", f"/sessions/{sid}/step", b) for b in bad_json + [b'{}', b'{"response": ["a"]}']]
    out += [("POST", f"/sessions/{sid}/step", json.dumps({"response": "a" * 70_000}).encode())]
    for path in (f"/sessions/{fresh}/step", f"/sessions/{fresh}/admissible_actions", f"/sessions/{fresh}/expert_actions"):
        out.append(("GET" if "actions" in path else "POST", path, b'{"response": "<action>search[x]</action>"}'))
    for w in WEIRD[:8]:
        out.append(("GET", "/sessions/" + quote(w.encode("utf-8", "surrogatepass"), safe="") + "/step", None))
    out += [("POST", "/sessions", m) for m in _mutants(rng, b'{"env_id": "searchqa-demo", "kwargs": {"topk": 2}}', 80)]
    out += [("POST", f"/sessions/{sid}/reset", m)
            for m in _mutants(rng, b'{"seed": 3, "options": {"episode_id": "demo-test-0001"}}', 80)]
    out += [("POST", f"/sessions/{sid}/step", m)
            for m in _mutants(rng, b'{"response": "<action>search[Naekrael]</action>"}', 80)]
    out += [("DELETE", "/sessions/nope", None), ("PUT", "/sessions", b"{}"), ("GET", "/no/such/path", None),
            ("POST", "/health", b"{}"), ("PATCH", f"/sessions/{sid}", b"{}")]
    rng.shuffle(out)
    return out


def retrieval_requests(rng: random.Random) -> list[tuple[str, str, bytes | None]]:
    out = [("POST", "/retrieve", t) for t in _raw('{"queries": ["Naekrael"], "topk": {}}')]
    out += [("POST", "/retrieve", t) for t in _raw('{"queries": [{}]}')]
    out += [("POST", "/retrieve", t) for t in _raw('{"queries": {}}')]
    out += [("POST", "/retrieve", t) for t in _raw('{"queries": ["a"], "return_scores": {}}')]
    out += [("POST", "/retrieve", json.dumps({"queries": [w], "topk": 2}).encode()) for w in WEIRD]
    out += [("POST", "/retrieve", json.dumps(body).encode()) for body in (
        {"queries": ["a"], "topk": 0}, {"queries": ["a"], "topk": -1}, {"queries": ["a"], "topk": 101},
        {"queries": ["a"] * 600}, {"queries": ["x" * 5000]}, {"queries": [["a"]]}, {"topk": 3}, {})]
    out += [("POST", "/retrieve", b) for b in (b"{not json", b"", b"[" * 20000 + b"]" * 20000, b"null", b"\xff")]
    out += [("GET", "/retrieve", None), ("DELETE", "/health", None), ("GET", "/nope", None)]
    out += [("POST", "/retrieve", m)
            for m in _mutants(rng, b'{"queries": ["Naekrael", "Quavria"], "topk": 2, "return_scores": true}', 200)]
    rng.shuffle(out)
    return out


def _expert_trace(env, episode_id: str) -> list:
    obs, info = env.reset(seed=0, options={"episode_id": episode_id})
    agent = ExpertAgent()
    agent.reset(env, info)
    trace, done = [obs], False
    while not done:
        obs, reward, terminated, truncated, info = env.step(agent.act(env, info))
        trace.append([obs, reward, terminated, truncated, info["won"], info["messages"]])
        done = terminated or truncated
    return trace


def _refused_unread(url: str) -> bytes:
    """Declare a 200 MiB body, send one byte of it: the answer must come without the server reading the rest."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 209715200\r\n\r\n{")
        return s.recv(65536)


def _chunked_over_limit(url: str, limit: int) -> bytes:
    """A chunked body (no Content-Length) that passes the limit: refused once the bytes pass it."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b'{"queries": ["' + b"a" * 1000
        sent = 0
        while sent <= limit:
            s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
            chunk = b"a" * 1000
        return s.recv(65536)


@pytest.fixture(scope="module")
def demo_index(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz-index")
    subprocess.run([SAGE, "retriever", "export-demo", "--out", str(folder)], check=True, capture_output=True)
    subprocess.run([SAGE, "retriever", "index", "--corpus", str(folder / "corpus.jsonl"), "--out",
                    str(folder / "index")], check=True, capture_output=True)
    return folder / "index"


@pytest.mark.timeout(600)
def test_malformed_requests_never_get_a_5xx_and_a_session_plays_on(demo_index):
    rng = random.Random(8)
    local = sage_gym.make(ENV_ID)
    episode = local.unwrapped.episode_ids[3]
    expected = _expert_trace(local, episode)
    local.close()
    statuses: list[int] = []
    with sage_server("serve", "--log-level", "critical", "--max-sessions", "64") as (env_url, env_proc), \
            sage_server("retriever", "serve", "--index", str(demo_index), "--max-body-bytes", "20000") as (ret_url,
                                                                                                          ret_proc), \
            httpx.Client(base_url=env_url, timeout=60) as env_c, httpx.Client(base_url=ret_url, timeout=60) as ret_c:
        sid = env_c.post("/sessions", json={"env_id": ENV_ID}).json()["session_id"]
        fresh = env_c.post("/sessions", json={"env_id": ENV_ID}).json()["session_id"]
        assert env_c.post(f"/sessions/{sid}/reset", json={"seed": 1}).status_code == 200
        # a response holding lone surrogates is played, and the session's later replies still encode
        odd = env_c.post(f"/sessions/{sid}/step", headers={"content-type": "application/json"},
                         content=json.dumps({"response": "\ud800 <action>search[x\udfff]</action>"}).encode())
        assert odd.status_code == 200 and "\udfff" in odd.json()["observation"]
        assert env_c.post(f"/sessions/{sid}/step", json={"response": "<action>look</action>"}).status_code == 200

        env_pool, ret_pool = env_requests(rng, sid, fresh), retrieval_requests(rng)
        start = time.monotonic()
        for k in range(N_REQUESTS):
            client, pool = (env_c, env_pool) if k % 2 == 0 else (ret_c, ret_pool)
            method, path, body = pool[(k // 2) % len(pool)]
            answer = client.request(method, path, content=body, headers={"content-type": "application/json"})
            statuses.append(answer.status_code)
            assert answer.status_code < 500, (method, path, (body or b"")[:200], answer.text[:300])
            if answer.status_code >= 400:
                assert set(answer.json()) <= {"error", "detail"}, answer.text[:300]  # a JSON message, no echo
            if k % 100 == 0 and k:  # a valid step now and then: the session keeps serving between bad ones
                env_c.post(f"/sessions/{sid}/reset", json={"seed": k})
        seconds = time.monotonic() - start
        assert seconds < TIME_BOUND, f"{N_REQUESTS} requests took {seconds:.0f} s"

        for url in (env_url, ret_url):  # over the size limit: refused before the body is read
            assert _refused_unread(url).startswith(b"HTTP/1.1 413"), url
        assert _chunked_over_limit(ret_url, 20000).startswith(b"HTTP/1.1 413")
        statuses += [413, 413, 413]

        assert env_proc.poll() is None and ret_proc.poll() is None
        assert env_c.get("/health").json()["status"] == "ok" and ret_c.get("/health").json()["status"] == "ok"
        got = _remote_expert_trace(env_c, sid, episode)
        assert got == json.loads(json.dumps(expected)), "the fuzzed session no longer plays like an in-process env"
        good = ret_c.post("/retrieve", json={"queries": ["Naekrael"], "topk": 1}).json()
        assert good["result"][0][0]["contents"].startswith('"Naekrael"')
    assert len(statuses) >= 1000 and sum(400 <= s < 500 for s in statuses) >= 900
    assert {400, 404, 405, 409, 413, 422} <= set(statuses)


def _remote_expert_trace(client: httpx.Client, sid: str, episode: str) -> list:
    reset = client.post(f"/sessions/{sid}/reset", json={"seed": 0, "options": {"episode_id": episode}}).json()
    plan = client.get(f"/sessions/{sid}/expert_actions").json()["actions"]
    formatter = sage_gym.make(ENV_ID).unwrapped.formatter
    trace, turn = [reset["observation"]], 0
    while True:
        turn += 1
        action = plan[turn - 1] if turn <= len(plan) else "look"
        response = formatter.format_action(action, f"Step {turn} of the expert plan.")
        step = client.post(f"/sessions/{sid}/step", json={"response": response}).json()
        trace.append([step["observation"], step["reward"], step["terminated"], step["truncated"], step["info"]["won"],
                      step["info"]["messages"]])
        if step["terminated"] or step["truncated"]:
            return trace
