"""The rollout phase: this rank's share of the step's episodes, written as the algorithm says (the
student, the teacher with probability beta_s, the teacher, or the env's expert), or the fixed batch
of ``rollout.from_file``.

Student turns come from the live model (``rollout.backend: hf``) or from a vLLM engine (``vllm`` in
process, ``server`` over HTTP) that is given the trained weights every ``rollout.sync_every``
optimiser steps (``sync_engine``) and, with ``rollout.check_sync``, checked against them.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sage_gym.errors import SageError
from sage_models import derive_seed
from sage_models.policy import Decoding
from sage_opd.algorithm import Algorithm
from sage_opd.build import Student
from sage_opd.config import TrainConfig
from sage_opd.parallel import DistInfo
from sage_opd.records import RolloutBatch
from sage_opd.rollout import RolloutCollector

# rollout.check_sync: the chats whose greedy generations the engine and the trained weights must agree on
SYNC_PROBE = [[{"role": "system", "content": "You are an agent in a household."},
               {"role": "user", "content": f"Your task is to: find the mug {k}."}] for k in range(3)]


class RolloutPhase:
    """Collects each step's episodes; owns the env pool and the generation engine (closed by ``close``)."""

    def __init__(self, cfg: TrainConfig, algorithm: Algorithm, student: Student, teacher, dist_info: DistInfo,
                 out_dir: Path):
        self.cfg, self.algorithm, self.student, self.teacher, self.dist = cfg, algorithm, student, teacher, dist_info
        self.out_dir = out_dir
        self.fixed_batch = RolloutBatch.load(cfg.rollout.from_file) if cfg.rollout.from_file else None
        self.collector: RolloutCollector | None = None
        self.step = 0  # the step being collected (the weights the engine must hold)
        self.engine = None  # rollout.backend vllm/server: the generation engine, synced with the trained weights
        self.synced_at: int | None = None  # the step whose weights the engine holds (None: not synced yet)
        self.sync_seconds, self.sync_checks = 0.0, 0

    def collect(self, step: int) -> RolloutBatch:
        """This rank's share of the step's episodes (or of the fixed batch ``rollout.from_file``)."""
        cfg, r = self.cfg, self.dist
        self.step = step
        total = cfg.rollout.episodes_per_step
        share = range(r.rank, total, r.world)
        if self.fixed_batch is not None:
            return RolloutBatch([self.fixed_batch.episodes[i] for i in range(r.rank, len(self.fixed_batch.episodes),
                                                                             r.world)])
        if self.collector is None:
            self.collector = RolloutCollector(cfg.rollout.env_id, len(share) or 1, cfg.rollout.max_turns,
                                              cfg.rollout.history_window, processes=cfg.rollout.env_processes,
                                              episode_ids=cfg.rollout.episode_ids, env_kwargs=cfg.rollout.env_kwargs)
        ids = self.collector.sample_episode_ids(total, cfg.optim.seed, step)
        seed = derive_seed(cfg.optim.seed, step)
        decoding = Decoding(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k,
                            max_new_tokens=cfg.rollout.max_new_tokens, seed=seed)
        from sage_models import TokenHistory

        history = TokenHistory(self.student.tokenizer)  # student and teacher turns of one episode continue one another
        expert = self.algorithm.writer == "expert"
        kwargs: dict[str, Any] = dict(expert=True) if expert else {}
        if self.algorithm.teacher_writes:
            kwargs = dict(teacher=self.teacher_policy(history),
                          teacher_prob=self.algorithm.teacher_prob(step, cfg.optim.steps, cfg.guided.rho))
        if not expert:
            self.student.sync_rollout_model()
        model = self.student.model
        model.eval()
        try:
            student = None if expert else self.rollout_policy(history)
            return self.collector.collect([ids[i] for i in share], student, decoding, seed, indices=list(share),
                                          **kwargs)
        finally:
            model.train()
            if self.engine is not None:
                self.engine.release()  # vllm with enable_sleep_mode: the GPU goes back to training

    def teacher_policy(self, history=None):
        from sage_models import HFPolicy

        return HFPolicy(model=self.teacher.model, tokenizer=self.teacher.tokenizer, name="teacher", history=history)

    # ---- the rollout engine (rollout.backend) -----------------------------------------------------------
    def rollout_policy(self, history):
        """The policy that writes student turns: the live model (hf), or a vLLM engine (vllm, server) given the
        trained weights every ``rollout.sync_every`` optimiser steps."""
        backend = self.cfg.rollout.backend
        if backend == "hf":
            return self.student.policy(history=history)
        if self.engine is None:
            self.engine = self._build_engine()
        if self.synced_at is None or self.step - self.synced_at >= self.cfg.rollout.sync_every:
            self.sync_engine()
        self.engine.history = history
        return self.engine

    def _build_engine(self):
        from sage_models.vllm_engine import VLLMPolicy, VLLMServerPolicy

        r = self.cfg.rollout
        if r.backend == "server":
            return VLLMServerPolicy(r.server_url, self.student.tokenizer)
        return VLLMPolicy(self.student.path, tokenizer=self.student.tokenizer, **r.vllm)

    def sync_engine(self) -> None:
        """Push the current weights to the engine (rank 0 for a shared server; each rank's own engine in process)."""
        r, start = self.cfg.rollout, time.perf_counter()
        model = self.student.generator
        if r.backend == "vllm":
            self.engine.sync_state_dict(_plain_state_dict(model))
        elif self.dist.main:
            folder = Path(r.sync_dir or self.out_dir / "sync") / f"step-{self.step:06d}"
            shutil.rmtree(folder, ignore_errors=True)
            if r.sync == "lora":
                model.save_pretrained(folder)  # the adapter only
                self.engine.load_lora(folder, f"step-{self.step}")
            else:
                _save_full_weights(model, folder)
                self.engine.sync_folder(folder)
            for old in folder.parent.glob("step-*"):
                if old != folder:
                    shutil.rmtree(old, ignore_errors=True)
        if self.dist.world > 1:
            dist.barrier()
        self.synced_at, self.sync_seconds = self.step, time.perf_counter() - start
        if r.check_sync:
            self.check_engine()

    def check_engine(self, max_new_tokens: int = 24) -> None:
        """Greedy generations of the engine and of the trained weights (hf) on probe chats must match token for token."""
        from sage_models import HFPolicy, TokenHistory

        tokenizer = self.student.tokenizer
        greedy = Decoding(temperature=0.0, max_new_tokens=max_new_tokens)
        saved, self.engine.history = self.engine.history, TokenHistory(tokenizer)
        try:
            got = [g.token_ids for g in self.engine.generate(SYNC_PROBE, greedy, [])]
        finally:
            self.engine.history = saved
        want = [g.token_ids for g in HFPolicy(model=self.student.generator, tokenizer=tokenizer,
                                              kv_reuse=False).generate(SYNC_PROBE, greedy, [])]
        if got != want:
            raise SageError(f"rollout.check_sync: after the sync at step {self.step} the {self.cfg.rollout.backend} "
                            f"engine generates {got[0][:12]}... where the trained weights give {want[0][:12]}...")
        self.sync_checks += 1

    def metrics(self, step: int) -> dict[str, Any]:
        """The engine's staleness after ``step``'s rollouts (nothing for the hf backend)."""
        if self.cfg.rollout.backend == "hf" or self.synced_at is None:
            return {}
        # steps of training the rollouts' weights lack (0: synced right before this step's rollouts)
        return {"rollout/policy_lag": step - self.synced_at,
                "rollout/sync_seconds": round(self.sync_seconds if self.synced_at == step else 0.0, 4),
                "rollout/sync_checks": self.sync_checks}

    def close(self) -> None:
        if self.collector is not None:
            self.collector.close()
            self.collector = None
        if self.engine is not None:
            self.engine.close()
            self.engine = None


def _plain_state_dict(model) -> dict[str, torch.Tensor]:
    """The student's weights under transformers' names; a LoRA student's adapters merged into them."""
    if hasattr(model, "merge_adapter"):  # peft: merge, read the base weights under their plain names, unmerge
        model.merge_adapter()
        try:
            return {k.removeprefix("base_model.model.").replace(".base_layer.", "."): v.detach().clone()
                    for k, v in model.state_dict().items() if "lora_" not in k}
        finally:
            model.unmerge_adapter()
    return {k: v.detach() for k, v in model.state_dict().items()}


def _save_full_weights(model, folder: Path) -> None:
    """Every weight in save_pretrained's format, a LoRA student's adapters merged in: peft's own save_pretrained
    writes only the adapter, which a server's full-weight reload (rollout.sync=folder) cannot read."""
    if hasattr(model, "merge_adapter"):
        model.get_base_model().save_pretrained(folder, state_dict=_plain_state_dict(model))
    else:
        model.save_pretrained(folder)
