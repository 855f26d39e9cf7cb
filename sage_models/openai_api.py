"""Any OpenAI-compatible chat endpoint (OpenAI, vLLM's server, ``sage serve-model``) as a ``Policy``,
with bounded concurrency, retries with backoff and timeouts. Endpoints return text, not token ids,
so this backend evaluates but does not train."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from sage_models.errors import ModelError
from sage_models.policy import EOS, LENGTH, PROMPT_TOO_LONG, STOP, Decoding, Generation

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
