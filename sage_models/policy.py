"""The policy interface shared by the evaluation service and the trainer.

A policy maps a batch of chat conversations to one response each. Backends (``hf``,
``openai``, ``vllm``) live in ``sage_models`` (hf, openai_api, vllm_engine); scripted agents (``expert``,
``random``) act on the env directly and are handled by the episode runner.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Protocol

# Why a generation ended. STOP: a stop string; EOS: the model's end-of-sequence token; LENGTH: the
# max_new_tokens limit; CONTEXT: the model's context window filled up; PROMPT_TOO_LONG: the prompt
# alone leaves no room in the context, so nothing was generated.
STOP, EOS, LENGTH, CONTEXT, PROMPT_TOO_LONG = "stop", "eos", "length", "context", "prompt_too_long"
FINISH_REASONS = (STOP, EOS, LENGTH, CONTEXT)
CUT = (LENGTH, CONTEXT)  # the response was cut by a token limit, not ended by the model


@dataclass(frozen=True)
class Decoding:
    """Sampling settings; the defaults are SPEC section 2's evaluation decoding."""

    temperature: float = 0.4
    top_p: float = 1.0
    top_k: int | None = None  # None: disabled
    max_new_tokens: int = 4096
    seed: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Generation:
    """One response. ``token_ids`` are the sampled ids exactly as generated (never re-tokenised),
    so a trainer can score them; backends that cannot return ids leave them None."""

    text: str
    prompt_ids: list[int] | None = None
    token_ids: list[int] | None = None
    finish_reason: str = STOP  # one of FINISH_REASONS, or PROMPT_TOO_LONG
    # token counts for backends without ids (an HTTP endpoint's usage); None: use the id lists
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    @property
    def n_prompt_tokens(self) -> int:
        return self.prompt_tokens if self.prompt_tokens is not None else len(self.prompt_ids or ())

    @property
    def n_completion_tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else len(self.token_ids or ())


def new_token_budget(prompt_tokens: int, max_new_tokens: int, context: int | None) -> tuple[int, str]:
    """How many tokens a generation may add and the finish reason when it uses them all: ``max_new_tokens``
    (LENGTH) unless the context window leaves fewer (CONTEXT). A budget below 1: the prompt does not fit."""
    if context is None or prompt_tokens + max_new_tokens <= context:
        return max_new_tokens, LENGTH
    return context - prompt_tokens, CONTEXT


class Policy(Protocol):
    """What the runner and the trainer need from a model backend."""

    name: str

    def generate(self, conversations: list[list[dict[str, str]]], decoding: Decoding,
                 stop: list[str], seeds: list[int] | None = None,
                 on_tokens: Callable[[int], None] | None = None) -> list[Generation]:
        """One response per conversation; generation halts at any ``stop`` string and never runs
        past the model's context window (``finish_reason`` says why each one ended).

        ``seeds`` (optional, one per conversation) seed each row's sampling on its own, so a
        response does not depend on which other conversations share the batch; without it
        ``decoding.seed`` seeds the call. ``on_tokens`` (optional) is called with the number of
        tokens just generated while the call runs, for progress displays."""
        ...

    def close(self) -> None: ...
