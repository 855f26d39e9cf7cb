"""Errors of the model layer: each says what was wrong and what is accepted."""

from __future__ import annotations

from sage_gym.errors import SageError

SMOLLM2 = "smollm2-135m"  # the embedded default model
SPEC_FORMS = (f"a built-in name ({SMOLLM2}, expert, handcoded, random), a local transformers model folder (or "
              "hf:PATH), openai:NAME (with --base-url), or vllm:PATH")

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


