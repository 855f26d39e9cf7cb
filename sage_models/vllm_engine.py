"""vLLM's offline engine as a ``Policy`` (an extra: ``pip install -e '.[vllm]'``, CUDA GPU)."""

from __future__ import annotations

from typing import Any

from sage_gym.errors import install_hint
from sage_models.errors import MissingDependencyError
from sage_models.policy import EOS, PROMPT_TOO_LONG, STOP, Decoding, Generation, new_token_budget

VLLM_HINT = install_hint("vllm")

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
