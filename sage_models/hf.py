"""The transformers backend: batched generation with left padding, per-row seeded sampling, stop
strings, the context window respected, and token-in-token-out prompts (``TokenHistory``).

``HFPolicy(path)`` loads a model folder; ``HFPolicy(model=..., tokenizer=...)`` wraps a live model
(the trainer's student), so generation always reads the current weights.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sage_models.chat import TokenHistory
from sage_models.errors import SPEC_FORMS, ChatTemplateError, ModelNotFoundError, UnknownModelError
from sage_models.policy import EOS, PROMPT_TOO_LONG, STOP, Decoding, Generation, new_token_budget

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
    Prompts are token in, token out (``history``, a ``TokenHistory``; policies that take turns in
    one episode, such as Guided-OPD's student and teacher, share one), and with ``kv_reuse`` a turn
    that continues this model's previous turn of a conversation starts from that turn's key/value
    cache, so only the new tokens (the env's feedback) are prefilled instead of the whole history.
    A policy over a live model must not outlive a weight update (its caches would be stale).
    """

    kind = "hf"

    def __init__(self, path: str | os.PathLike | None = None, *, model=None, tokenizer=None,
                 device: str | None = None, dtype: str | None = None, batch_size: int | None = None,
                 name: str | None = None, max_context: int | None = None, history: TokenHistory | None = None,
                 kv_reuse: bool = True):
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
        self.history = history or TokenHistory(tokenizer)
        self.kv_reuse = kv_reuse
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
        """The prompt's ids: a recorded conversation continued (token in, token out), else the chat template
        applied with a generation prompt and thinking disabled."""
        return self.history.prompt_ids(conversation)

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

        from sage_models.kv_cache import CACHE_STEP, batch_cache, cache_layers

        found = [self.history.continuation(c, owner=self.model) for c in conversations]
        all_prompts = [ids for ids, _ in found]
        limits = [new_token_budget(len(p), decoding.max_new_tokens, self.max_context) for p in all_prompts]
        rows = [i for i, (budget, _) in enumerate(limits) if budget >= 1]  # prompts that fit the context
        results = [Generation(text="", prompt_ids=p, token_ids=[], finish_reason=PROMPT_TOO_LONG) for p in all_prompts]
        if not rows:
            return results
        prompts = [all_prompts[i] for i in rows]
        caches = [found[i][1] if self.kv_reuse else None for i in rows]
        # each row: [pad][cached prefix][pad][new tokens]; the attention mask's holes are the pads, and the
        # positions (its cumulative sum) continue those of the cached keys
        cached = [c.length if c is not None else 0 for c in caches]
        fresh = [p[c:] for p, c in zip(prompts, cached)]
        big_c, big_m = max(cached), max(len(f) for f in fresh)
        width, pad = big_c + big_m, self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (big_c - c) + p[:c] + [pad] * (big_m - len(f)) + f
                                  for p, c, f in zip(prompts, cached, fresh)], device=self.model.device)
        attention = torch.tensor([[0] * (big_c - c) + [1] * c + [0] * (big_m - len(f)) + [1] * len(f)
                                  for c, f in zip(cached, fresh)], device=self.model.device)
        budgets, caps = [limits[i][0] for i in rows], [limits[i][1] for i in rows]
        stopper = _StopOnText(self.tokenizer, width, stop, self.eos_ids, budgets, caps, on_tokens)
        processors = LogitsProcessorList()
        if decoding.temperature > 0:
            generators = [torch.Generator(device=self.model.device).manual_seed(int(seeds[i])) for i in rows]
            processors.append(_RowSampler(decoding, generators))
        config = GenerationConfig(max_new_tokens=max(budgets), do_sample=False, pad_token_id=pad,
                                  eos_token_id=sorted(self.eos_ids) or None, return_dict_in_generate=True,
                                  disable_compile=True)  # the growing cache changes shape (sage_models.kv_cache)
        cache = batch_cache(caches, big_c, self.model.config, room=min(max(budgets), CACHE_STEP))
        extra = {_cache_kwarg(self.model): cache} if cache is not None else {}
        was_training = self.model.training  # a trainer's live model: sample without dropout, then restore
        self.model.eval()
        try:
            with torch.no_grad(), _padding_is_not_length():
                output = self.model.generate(input_ids=input_ids, attention_mask=attention, generation_config=config,
                                             logits_processor=processors,
                                             stopping_criteria=StoppingCriteriaList([stopper]), **extra)
        finally:
            self.model.train(was_training)
        layers = cache_layers(output, output.sequences.shape[1] - 1) if self.kv_reuse else None
        for j, (i, prompt) in enumerate(zip(rows, prompts)):
            generated = output.sequences[j, width:].tolist()
            end, reason = stopper.ends.get(j, (len(generated), caps[j]))
            ids = generated[:end]
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if reason == STOP:
                cut = min((text.find(s) + len(s) for s in stop if s in text), default=len(text))
                text = text[:cut]
            results[i] = Generation(text=text, prompt_ids=prompt, token_ids=ids, finish_reason=reason)
            state = None
            if layers is not None:  # the keys of every token fed: the row's prompt and its response but the last id
                keep = torch.cat([torch.arange(big_c - cached[j], big_c), torch.arange(width - len(fresh[j]), width),
                                  torch.arange(width, width + end - 1)]).to(self.model.device)
                state = _RowCache(len(prompt) + end - 1, [(k[j].index_select(1, keep), v[j].index_select(1, keep))
                                                          for k, v in layers])
            self.history.record(conversations[i], text, prompt + ids, state, owner=self.model)
        return results

    def close(self) -> None:
        self.model = None


@contextmanager
def _padding_is_not_length():
    """Silence transformers' "exceeded the model's predefined maximum length" reminder for this call: it compares the
    batch width (padding included) with the window, while each row's positions stay within its own budget."""
    logger = logging.getLogger("transformers.generation.stopping_criteria")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@dataclass
class _RowCache:
    """One conversation's key/value cache: per layer (keys, values) [kv_heads, length, head_dim]."""

    length: int
    layers: list[tuple[Any, Any]]

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.layers)


def _cache_kwarg(model) -> str:
    """What ``generate`` calls the cache: ``cache`` (transformers 5) or ``past_key_values`` (4.x)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


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
