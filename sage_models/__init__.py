"""The model layer shared by evaluation and training: the ``Policy`` interface and decoding settings,
the one seed derivation, the one chat rendering (with token-in-token-out prompts), and the backends
(``hf``, ``openai``, ``vllm``, scripted agents, tiny offline models).

    from sage_models import Decoding, load_policy
    policy = load_policy("smollm2-135m")            # or a folder, openai:NAME, vllm:PATH, expert, ...
    [gen] = policy.generate([messages], Decoding(temperature=0.4), stop=["</action>"])
"""

from sage_models.chat import TokenHistory, chat_ids, chat_text
from sage_models.errors import (ChatTemplateError, MissingDependencyError, ModelError, ModelNotFoundError,
                                UnknownModelError)
from sage_models.hf import HFPolicy, check_model_folder, context_window
from sage_models.loading import BUILTINS, SMOLLM2, load_policy, models_cache, policy_kind, smollm2_path
from sage_models.openai_api import OpenAIPolicy
from sage_models.policy import Decoding, Generation, Policy
from sage_models.scripted import SCRIPTED, ScriptedAgent
from sage_models.seeds import derive_seed, turn_seed
from sage_models.vllm_engine import VLLMPolicy

__all__ = ["BUILTINS", "SCRIPTED", "SMOLLM2", "ChatTemplateError", "Decoding", "Generation", "HFPolicy",
           "MissingDependencyError", "ModelError", "ModelNotFoundError", "OpenAIPolicy", "Policy", "ScriptedAgent",
           "TokenHistory", "UnknownModelError", "VLLMPolicy", "chat_ids", "chat_text", "check_model_folder",
           "context_window", "derive_seed", "load_policy", "models_cache", "policy_kind", "smollm2_path", "turn_seed"]
