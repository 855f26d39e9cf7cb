"""The one chat rendering of the project, and token-in-token-out prompts for multi-turn episodes.

``chat_text`` renders a chat with the tokenizer's template (thinking disabled, SPEC section 2) for
generation, scoring and training alike. ``TokenHistory`` keeps the exact ids of each conversation a
policy continued: the next turn's prompt is those ids (the model's own sampled tokens included)
plus the tokens of what the template adds after the response, never a re-tokenisation of the whole
history, which can split the model's own response differently from how it was sampled. Each turn's
prompt then extends the previous turn's prompt and response, so the trainer scores an episode as
one sequence and a backend can reuse the key/value cache of the previous turn.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


def chat_text(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """A chat rendered with the tokenizer's chat template, thinking disabled (SPEC section 2)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         enable_thinking=False)


def chat_ids(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of the rendered chat (the template's own special tokens, nothing added)."""
    # verbose=False: a prompt longer than the window is the caller's to handle, not to warn about
    return tokenizer(chat_text(tokenizer, messages, add_generation_prompt), add_special_tokens=False,
                     verbose=False)["input_ids"]


def _last_assistant(messages: list[dict[str, str]]) -> int | None:
    return max((k for k, m in enumerate(messages) if m["role"] == "assistant"), default=None)


def _key(messages: list[dict[str, str]]) -> str:
    return hashlib.sha256(json.dumps([[m["role"], m["content"]] for m in messages]).encode()).hexdigest()


@dataclass
class _Entry:
    ids: array  # prompt + response ids
    response: str
    state: Any = None  # a backend's cache of the entry's ids (the hf key/value cache), or None
    owner: Any = None  # which model computed ``state``: another model never reuses it


class TokenHistory:
    """Token in, token out: the ids each recorded conversation ended with, continued turn by turn.

    ``record(messages, response, ids)`` stores the ids of ``messages`` followed by the assistant's
    ``response`` (prompt ids + the sampled ids). ``prompt_ids(messages)`` for a chat that is a
    recorded one plus new messages after it (the env's feedback) returns the recorded ids plus
    the tokens the template renders after the response, ending with the generation prompt; any
    other chat (the first turn, a history window, a response the env rewrote) is rendered whole.
    The new text is found by rendering the chat with and without the new messages: templates
    that re-render earlier turns differently (Qwen3 drops their empty think block) fall back to
    the whole rendering (``rendered`` counts those, ``continued`` the others).

    A backend may attach a ``state`` to an entry (its key/value cache of those ids, with ``nbytes``)
    and get it back with the continued prompt (``continuation``), for the ``owner`` that made it
    only. States must not outlive the weights that computed them: make a new history (a new
    policy) after a weight update. An entry is dropped when its continuation is recorded, the
    oldest beyond ``max_entries``, and the oldest states beyond ``max_state_bytes``.
    """

    def __init__(self, tokenizer, max_entries: int = 1024, max_state_bytes: int = 2 << 30):
        self.tokenizer, self.max_entries, self.max_state_bytes = tokenizer, max_entries, max_state_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._state_bytes = 0
        self.continued = self.rendered = 0
        end = getattr(tokenizer, "eos_token", None)
        self._eos = {tokenizer.convert_tokens_to_ids(end): end} if end else {}

    def record(self, messages: list[dict[str, str]], response: str, ids: list[int], state: Any = None,
               owner: Any = None) -> None:
        """``messages`` (a prompt) answered with ``response``, whose full ids (prompt + response) are ``ids``."""
        cut = _last_assistant(messages)
        if cut is not None:
            self._drop(_key(messages[:cut + 1]))  # the chain moved on
        key = _key([*messages, {"role": "assistant", "content": response}])
        self._drop(key)
        self._entries[key] = _Entry(array("l", ids), response, state, owner)
        self._state_bytes += state.nbytes if state is not None else 0
        while len(self._entries) > self.max_entries:
            self._drop(next(iter(self._entries)))
        for entry in self._entries.values():  # oldest first
            if self._state_bytes <= self.max_state_bytes:
                break
            if entry.state is not None:
                self._state_bytes -= entry.state.nbytes
                entry.state = None

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None and entry.state is not None:
            self._state_bytes -= entry.state.nbytes

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return self.continuation(messages)[0]

    def continuation(self, messages: list[dict[str, str]], owner: Any = None) -> tuple[list[int], Any]:
        """The prompt ids of ``messages`` and the state recorded with the conversation they continue (None when
        there is none, or another ``owner`` made it)."""
        found = self._continue(messages)
        if found is None:
            self.rendered += 1
            return chat_ids(self.tokenizer, messages), None
        self.continued += 1
        ids, entry = found
        return ids, entry.state if entry.owner is owner else None

    def _continue(self, messages: list[dict[str, str]]) -> tuple[list[int], _Entry] | None:
        cut = _last_assistant(messages)
        if cut is None or cut == len(messages) - 1:
            return None
        entry = self._entries.get(_key(messages[:cut + 1]))
        if entry is None or not entry.response:
            return None
        before = chat_text(self.tokenizer, messages[:cut + 1], add_generation_prompt=False)
        after = chat_text(self.tokenizer, messages, add_generation_prompt=True)
        at = before.rfind(entry.response)
        if at < 0 or not after.startswith(before):
            return None
        ids, suffix = list(entry.ids), after[at + len(entry.response):]
        last = self._eos.get(ids[-1]) if ids else None
        if last and suffix.startswith(last):  # the model ended its turn itself
            suffix = suffix[len(last):]
        return ids + self.tokenizer(suffix, add_special_tokens=False, verbose=False)["input_ids"], entry
