"""Search QA: the demo world, the episode protocol, EM/F1, data loading, a real bm25s index and a real
Search-R1-protocol server on 127.0.0.1 (uvicorn in a thread, and `sage retriever serve` in a subprocess)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from gymnasium.utils.env_checker import check_env
from typer.testing import CliRunner

import sage_gym
from sage_cli.main import app as sage_app
from sage_gym.envs import searchqa
from sage_gym.envs.searchqa import (SearchR1Formatter, exact_match, f1_score, load_questions, normalize_answer)
from sage_gym.envs.searchqa_demo import SEED, build_world
from sage_gym.errors import DataNotFoundError
from sage_gym.retrieval import BM25sRetriever, HttpRetriever, build_bm25s_index
from sage_gym.retrieval_server import ServerLimits, create_app

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_index(tmp_path_factory) -> Path:
    """The demo corpus exported as files and indexed with `sage retriever index` (the real CLI path)."""
    from sage_cli.retriever import retriever_app as app

    folder = tmp_path_factory.mktemp("searchqa")
    runner = CliRunner()
    assert runner.invoke(app, ["export-demo", "--out", str(folder / "demo")]).exit_code == 0
    result = runner.invoke(app, ["index", "--corpus", str(folder / "demo" / "corpus.jsonl"),
                                 "--out", str(folder / "index")])
    assert result.exit_code == 0, result.output
    return folder


@pytest.fixture(scope="module")
def server(demo_index):
    """A real uvicorn server on a free 127.0.0.1 port serving the on-disk index, with small limits."""
    import uvicorn

    app = create_app(BM25sRetriever.load(demo_index / "index"),
                     ServerLimits(max_queries=4, max_query_chars=200, max_topk=20, default_topk=3))
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


def _play(env, episode_id: str, responses=None):
    """Play the expert (or given responses); return the last info and every step's info."""
    _, info = env.reset(options={"episode_id": episode_id})
    fmt = env.unwrapped.formatter
    plan = responses or [fmt.format_action(a, "plan") for a in env.unwrapped.expert_actions()]
    steps = []
    for response in plan:
        _, _, terminated, truncated, info = env.step(response)
        steps.append(info)
        if terminated or truncated:
            break
    return info, steps


# ---- the demo world ----------------------------------------------------------------------------
def test_demo_panel_is_stable_and_has_real_multi_hop_questions():
    corpus, splits = build_world()
    fresh_corpus, fresh_splits = build_world.__wrapped__(SEED)  # rebuilt, not the cached object
    assert corpus == fresh_corpus and splits == fresh_splits
    env = sage_gym.make("searchqa-demo")
    assert env.unwrapped.episode_ids == [f"demo-test-{i:04d}" for i in range(80)]
    assert sage_gym.spec("searchqa-demo").num_episodes == 80 and 200 <= len(corpus) <= 400
    test = splits["test"]
    assert sum(q.type == "multi-hop" for q in test) == 40 and sum(q.type == "single-hop" for q in test) == 40
    assert [q.type for q in test[:4]] == ["single-hop", "multi-hop"] * 2  # any --limit prefix has both kinds
    assert not {q.question for q in test} & {q.question for q in splits["train"]}
    text = {row["id"]: row["contents"] for row in corpus}
    for q in test:
        assert all(pid in text for pid in q.supporting_ids)
        assert q.golden_answers[0] in text[q.supporting_ids[-1]]  # the last hop states the answer
        if q.type == "multi-hop":
            assert len(set(q.supporting_ids)) == 2
            assert q.golden_answers[0].lower() not in text[q.supporting_ids[0]].lower()  # one passage is not enough
    # the same world in a fresh interpreter with another hash seed
    digest = hashlib.sha256(json.dumps([corpus, [q.to_json() for q in test]]).encode()).hexdigest()
    code = ("import json,hashlib;from sage_gym.envs.searchqa_demo import build_world;c,s=build_world();"
            "print(hashlib.sha256(json.dumps([c,[q.to_json() for q in s['test']]]).encode()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"})
    assert out.stdout.strip() == digest


@pytest.mark.parametrize("prompt_format", ["react", "search-r1"])
def test_expert_wins_every_demo_question_by_retrieving_its_passages(prompt_format):
    env = sage_gym.make("searchqa-demo", prompt_format=prompt_format)
    _, splits = build_world()
    supports = {q.id: set(q.supporting_ids) for q in splits["test"]}
    for episode_id in env.unwrapped.episode_ids:
        info, steps = _play(env, episode_id)
        assert info["won"] and info["em"] == 1.0 and info["f1"] == 1.0 and info["score"] == 1.0
        retrieved = {pid for s in steps for pid in s.get("retrieved_ids", [])}
        assert supports[episode_id] <= retrieved, episode_id
        assert all(s["action_valid"] for s in steps)


def test_wrong_answer_scores_zero_em_and_partial_f1():
    env = sage_gym.make("searchqa-demo")
    q = next(q for q in build_world()[1]["test"] if " " in q.golden_answers[0])  # a multi-word answer
    first_word = q.golden_answers[0].split()[0]
    env.reset(options={"episode_id": q.id})
    _, reward, terminated, truncated, info = env.step(f"<action>answer[{first_word}]</action>")
    assert terminated and not truncated and reward == 0.0 and not info["won"]
    assert info["em"] == 0.0 and 0.0 < info["f1"] < 1.0
    assert info["metrics"] == {"em": info["em"], "f1": info["f1"]}
    with pytest.raises(RuntimeError):
        env.step("<action>answer[again]</action>")


# ---- the episode protocol ------------------------------------------------------------------------
@pytest.mark.parametrize("response, reason", [
    ("", "empty"), ("   \n", "empty"),
    ("I think I should search.", "unparseable"),
    ("<action>search[a]</action> <action>answer[b]</action>", "unparseable"),
    ("<action>look around</action>", "schema_violation"),
    ("<action>search[]</action>", "schema_violation"),
    ("<action>answer[   ]</action>", "schema_violation"),
    ("<action>Search[Naekrael]</action>", "schema_violation"),
])
def test_invalid_responses_are_reported_and_not_played(response, reason):
    env = sage_gym.make("searchqa-demo")
    env.reset(options={"episode_id": "demo-test-0000"})
    obs, reward, terminated, truncated, info = env.step(response)
    assert not info["action_valid"] and info["invalid_reason"] == reason and info["action"] is None
    assert info["turn"] == 1 and reward == 0.0 and not terminated and not truncated
    assert obs == env.unwrapped.formatter.invalid_feedback(reason)
    assert "retrieved_ids" not in info  # nothing was sent to the retriever
    assert info["metrics"] == {"em": 0.0, "f1": 0.0}


def test_turn_cap_16_truncates_an_episode_that_never_answers():
    env = sage_gym.make("searchqa-demo")
    assert env.unwrapped.max_turns == 16
    env.reset(options={"episode_id": "demo-test-0001"})
    for turn in range(1, 17):
        obs, reward, terminated, truncated, info = env.step("<action>search[Naekrael]</action>")
        assert info["turn"] == turn and not terminated
        assert truncated == (turn == 16)
    assert info["em"] == 0.0 and info["metrics"] == {"em": 0.0, "f1": 0.0} and not info["won"] and "Naekrael" in obs


def test_search_observation_and_unmatched_query():
    env = sage_gym.make("searchqa-demo", topk=2)
    env.reset(options={"episode_id": "demo-test-0000"})
    obs, _, _, _, info = env.step("<action>search[Naekrael]</action>")
    assert obs.startswith('Search results for "Naekrael":\nDoc 1(Title: Naekrael) ') and "Doc 3" not in obs
    assert len(info["retrieved_ids"]) == 2
    assert "answer[Naekrael]" in env.unwrapped.admissible_actions()
    obs, _, _, _, info = env.step("<action>search[zzqqxx unknownword]</action>")
    assert info["retrieved_ids"] == [] and obs == 'No passage matches "zzqqxx unknownword".'


@pytest.mark.parametrize("prompt_format", ["react", "search-r1"])
def test_check_env_passes(prompt_format):
    check_env(sage_gym.make("searchqa-demo", prompt_format=prompt_format).unwrapped, skip_render_check=True)


@pytest.mark.parametrize("formatter", [sage_gym.ReActFormatter(), SearchR1Formatter()], ids=["react", "search-r1"])
def test_invalid_feedback_copied_verbatim_is_no_action(formatter):
    """The feedback restates the format in words: echoing it (alone or after some reasoning) parses to nothing,
    where a literal tag pair in it would have been read as an action (or a search)."""
    for reason in ("empty", "unparseable", "schema_violation"):
        feedback = formatter.invalid_feedback(reason)
        for echo in (feedback, "I see. " + feedback):
            parsed = formatter.parse(echo)
            assert parsed.action is None and parsed.invalid_reason == "unparseable", (reason, echo)


def test_play_keeps_brackets_and_shows_the_gold_answer():
    """`sage play`: rich markup must not swallow `[...]` (a lower-case query reads like a style tag), and the
    end of an episode shows the gold answer."""
    env = sage_gym.make("searchqa-demo")
    episode_id = env.unwrapped.episode_ids[0]
    gold = env.unwrapped.items[episode_id].golden_answers
    env.close()
    out = CliRunner().invoke(sage_app, ["play", "--env", "searchqa-demo", "--episode", episode_id],
                             input="search[who founded the city]\nanswer[nobody knows]\n", env={"COLUMNS": "300"})
    assert out.exit_code == 0, out.output
    assert "> search[who founded the city]" in out.output and "> answer[nobody knows]" in out.output
    assert f"Gold answer{'s' if len(gold) > 1 else ''}: {' | '.join(gold)}" in out.output


def test_search_r1_format_parse_stop_and_information():
    fmt = SearchR1Formatter()
    assert fmt.stop == ["</search>", "</answer>"]
    assert fmt.parse("<think>hmm</think>\n<search>  who  founded X </search>").action == "search[who founded X]"
    assert fmt.parse("<think>ok</think><answer> Beijing </answer>").action == "answer[Beijing]"
    restored = fmt.parse("<think>x</think><search> Naekrael")  # the backend stripped the stop string
    assert restored.action == "search[Naekrael]" and restored.response.endswith("</search>")
    assert fmt.parse("<search>a</search><answer>b</answer>").invalid_reason == "unparseable"
    assert fmt.parse("<action>search[a]</action>").invalid_reason == "unparseable"
    assert fmt.parse("").invalid_reason == "empty"
    env = sage_gym.make("searchqa-demo", prompt_format="search-r1")
    _, info = env.reset(options={"episode_id": "demo-test-0000"})
    assert "<search>" in info["messages"][0]["content"] and env.unwrapped.stop == ["</search>", "</answer>"]
    obs, _, _, _, info = env.step("<think>look it up</think><search> Naekrael </search>")
    assert obs.startswith("<information>Doc 1(Title: Naekrael)") and obs.endswith("</information>")
    _, _, _, _, info = env.step("<search>  </search>")
    assert info["invalid_reason"] == "schema_violation"
    assert info["messages"][-2]["content"] == "<search>  </search>"


# ---- metrics -------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction, golds, em, f1", [
    ("The Beatles", ["beatles"], 1.0, 1.0),
    ("  New   York! ", ["new york"], 1.0, 1.0),
    ("an apple", ["Apple"], 1.0, 1.0),
    ("Theatre", ["the atre"], 0.0, 0.0),           # articles only as whole words
    ("new york city", ["New York"], 0.0, 0.8),     # P = 2/3, R = 1
    ("Paris", ["London", "paris."], 1.0, 1.0),     # max over golden answers
    ("red blue", ["blue green", "red"], 0.0, 2 / 3),
    ("", ["x"], 0.0, 0.0),
])
def test_em_f1_squad_normalisation(prediction, golds, em, f1):
    assert exact_match(prediction, golds) == em
    assert f1_score(prediction, golds) == pytest.approx(f1)


def test_normalize_answer():
    assert normalize_answer("The  Lord of the Rings: A Tale, an Epic!") == "lord of rings tale epic"


# ---- the server and the http backend -----------------------------------------------------------
def test_server_speaks_the_search_r1_protocol(server, demo_index):
    r = httpx.post(f"{server}/retrieve", json={"queries": ["Naekrael", "Quavria capital"], "topk": 2,
                                                "return_scores": True})
    assert r.status_code == 200
    body = r.json()
    assert list(body) == ["result"] and len(body["result"]) == 2
    for row in body["result"]:
        assert len(row) == 2
        for item in row:
            assert set(item) == {"document", "score"} and set(item["document"]) == {"id", "contents"}
            assert isinstance(item["score"], float) and item["score"] > 0
    top = body["result"][0][0]["document"]
    assert top["contents"].startswith('"Naekrael"\n') and top["id"].startswith("demo-")
    plain = httpx.post(f"{server}/retrieve", json={"queries": ["Naekrael"], "topk": 2, "return_scores": False}).json()
    assert plain["result"][0] == [item["document"] for item in body["result"][0]]  # bare documents, no scores
    default = httpx.post(f"{server}/retrieve", json={"queries": ["Naekrael"]}).json()
    assert len(default["result"][0]) == 3 and set(default["result"][0][0]) == {"id", "contents"}
    assert httpx.post(f"{server}/retrieve", json={"queries": []}).json() == {"result": []}


@pytest.mark.parametrize("payload, needle", [
    ({"topk": 3}, "queries"),
    ({"queries": "Naekrael"}, "queries"),
    ({"queries": [1, 2]}, "queries"),
    ({"queries": ["a"], "topk": "3"}, "topk"),
    ({"queries": ["a"], "return_scores": "yes"}, "return_scores"),
    ({"queries": ["a"] * 5}, "max_queries=4"),
    ({"queries": ["x" * 201]}, "max_query_chars=200"),
    ({"queries": ["a"], "topk": 21}, "topk must be between 1 and 20"),
    ({"queries": ["a"], "topk": -1}, "topk must be between 1 and 20"),
    ({"queries": ["a"], "topk": 0}, "topk must be between 1 and 20, got 0"),
])
def test_server_rejects_malformed_requests_with_json_4xx(server, payload, needle):
    r = httpx.post(f"{server}/retrieve", json=payload)
    assert 400 <= r.status_code < 500 and r.headers["content-type"] == "application/json"
    assert needle in json.dumps(r.json()["detail"])


def test_server_rejects_a_body_that_is_not_json(server):
    r = httpx.post(f"{server}/retrieve", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "detail" in r.json()


@pytest.mark.parametrize("body", [b'{"queries": ["a"], "topk": NaN}', b'{"queries": ["a"], "topk": 1e400}',
                                  b'{"queries": [Infinity]}', b'{"queries": ["a"], "return_scores": -Infinity}'])
def test_server_answers_non_finite_numbers_with_a_422(server, body):
    r = httpx.post(f"{server}/retrieve", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422 and "invalid request to POST /retrieve" in r.json()["detail"]


def test_http_backend_returns_the_same_passages_as_the_local_index(server, demo_index):
    local = BM25sRetriever.load(demo_index / "index")
    in_memory = build_bm25s_index(build_world()[0])
    remote = HttpRetriever(server)
    queries = [q for item in build_world()[1]["test"][:30] for q in item.expert_queries] + ["zzqqxx"]
    for start in range(0, len(queries), 4):  # the server's max_queries is 4
        batch = queries[start:start + 4]
        got, want, mem = remote.search(batch, 3), local.search(batch, 3), in_memory.search(batch, 3)
        assert [[p.id for p in row] for row in got] == [[p.id for p in row] for row in want]
        assert [[p.id for p in row] for row in mem] == [[p.id for p in row] for row in want]
        for g_row, w_row in zip(got, want):
            for g, w in zip(g_row, w_row):
                assert g.contents == w.contents and g.score == pytest.approx(w.score)
    remote.close()


def test_env_over_the_http_backend_with_both_formats(server):
    for prompt_format in ("react", "search-r1"):
        env = sage_gym.make("searchqa-demo", retriever=server, prompt_format=prompt_format)
        for episode_id in ("demo-test-0000", "demo-test-0045"):
            info, _ = _play(env, episode_id)
            assert info["won"]
        env.close()


def test_cli_serve_subprocess(demo_index):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sage_cli", "retriever", "serve", "--index",
                             str(demo_index / "index"), "--port", str(port), "--max-queries", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stderr.read()
                assert time.time() < deadline, "sage retriever serve did not start"
                time.sleep(0.2)
        ok = httpx.post(f"http://127.0.0.1:{port}/retrieve", json={"queries": ["Naekrael"], "topk": 1}).json()
        assert ok["result"][0][0]["contents"].startswith('"Naekrael"')
        assert httpx.post(f"http://127.0.0.1:{port}/retrieve", json={"queries": ["a"] * 3}).status_code == 422
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# ---- data files ----------------------------------------------------------------------------------
def test_flashrag_jsonl_and_search_r1_parquet_datasets(tmp_path, demo_index, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    questions = build_world()[1]["test"][:3]
    jsonl = tmp_path / "searchqa" / "mini" / "test.jsonl"
    jsonl.parent.mkdir(parents=True)
    jsonl.write_text("".join(json.dumps({"id": f"m{i}", "question": q.question, "golden_answers": q.golden_answers})
                             + "\n" for i, q in enumerate(questions)))
    rows = [{"id": f"nq_{i}", "question": q.question, "golden_answers": q.golden_answers, "data_source": src,
             "prompt": [{"role": "user", "content": f"Answer the question. Question: {q.question}\n"}],
             "reward_model": {"style": "rule", "ground_truth": {"target": q.golden_answers}},
             "extra_info": {"split": "test", "index": i}}
            for i, (q, src) in enumerate(zip(questions, ["nq", "nq", "hotpotqa"]))]
    parquet = tmp_path / "searchqa" / "nq" / "test.parquet"
    parquet.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    bare = tmp_path / "bare.parquet"  # Search-R1 columns only: no question, no golden_answers, no id
    pq.write_table(pa.Table.from_pylist([{k: r[k] for k in ("data_source", "prompt", "reward_model", "extra_info")}
                                         for r in rows[:2]]), bare)
    items = load_questions(bare, "nq")
    assert [it.id for it in items] == ["nq-0", "nq-1"]
    assert items[0].question == questions[0].question and items[1].golden_answers == questions[1].golden_answers

    monkeypatch.setenv("SAGE_DATA", str(tmp_path))
    assert "mini" in searchqa._installed_datasets()
    env = searchqa.SearchQAEnv(dataset="mini", retriever=str(demo_index / "index"))
    assert env.unwrapped.episode_ids == ["m0", "m1", "m2"]
    _, info = env.reset(options={"episode_id": "m1"})
    assert info["golden_answers"] == questions[1].golden_answers and info["task"] == questions[1].question
    assert env.step(f"<action>answer[{questions[1].golden_answers[0]}]</action>")[4]["won"]
    nq = searchqa.SearchQAEnv(dataset="nq", retriever=str(demo_index / "index"))
    assert nq.episode_ids == ["nq_0", "nq_1"]  # the merged parquet is filtered to data_source == nq
    with pytest.raises(DataNotFoundError, match="no retrieval index"):
        searchqa.SearchQAEnv(dataset="mini")
    monkeypatch.setenv("SAGE_RETRIEVER", str(demo_index / "index"))
    assert searchqa.SearchQAEnv(dataset="mini").retriever.name == "bm25s"
    monkeypatch.delenv("SAGE_RETRIEVER")
    (tmp_path / "searchqa" / "index").symlink_to(demo_index / "index")  # the shared index fallback
    env = searchqa.SearchQAEnv(dataset="mini")
    env.reset(options={"episode_id": "m0"})
    assert env.step(f"<action>search[{questions[0].expert_queries[0]}]</action>")[4]["retrieved_ids"][0] == \
        questions[0].supporting_ids[0]


def test_missing_dataset_error_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SAGE_DATA", str(tmp_path))
    with pytest.raises(DataNotFoundError, match=r"sage retriever fetch-qa --dataset hotpotqa --split dev"):
        sage_gym.make("searchqa-hotpotqa")
    assert sage_gym.spec("searchqa-hotpotqa").status().startswith("missing")
    (tmp_path / "searchqa" / "nq").mkdir(parents=True)
    (tmp_path / "searchqa" / "nq" / "test.jsonl").write_text("{not json\n")
    with pytest.raises(sage_gym.SageError, match="not valid jsonl"):
        sage_gym.make("searchqa-nq")
