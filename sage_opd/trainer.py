"""The SAGE-OPD trainer: rollout -> judge -> teacher scoring + loss -> optimiser step, every step.

>>> from sage_opd.config import load_config
>>> from sage_opd.trainer import Trainer
>>> Trainer(load_config("configs/tiny_sage_opd_alfworld.yaml")).train()

Each phase is a method that can be called alone (``collect``, ``judge_turns``, ``accumulate``,
``optimizer_step``). Data parallel: under ``torchrun`` every rank collects its share of the
step's episodes; gradients of sum(w * l) are summed over micro-batches and ranks, then divided
by the batch-wide sum(w), so the update does not depend on how the batch was split.
Everything random is seeded from (seed, step): a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import copy
import math
import pickle
import random
import shutil
import time
import warnings
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from sage_models.policy import Decoding
from sage_gym.durable import FolderLock, append_jsonl, read_jsonl, replace_dir, restore_aside, write_jsonl
from sage_gym.errors import SageError, install_hint
from sage_gym.formatting import INVALID_REASONS
from sage_opd.algorithms import MicroResult, imitated, micro_batch_loss, reverse_kl_sum
from sage_opd.config import ConfigError, TrainConfig, save_config
from sage_opd.losses import DenseTeacher
from sage_opd.parallel import all_reduce_gradients, full_state_dict, init_distributed, shard_fsdp, to_float
from sage_models import derive_seed
from sage_opd.rollout import RolloutBatch, RolloutCollector, TurnRecord, check_train_split, guided_beta
from sage_opd.teacher import TurnIds, check_same_tokenizer, lm_hidden_states, make_batch

CHECKPOINT_PREFIX = "step-"
# rollout.check_sync: the chats whose greedy generations the engine and the trained weights must agree on
SYNC_PROBE = [[{"role": "system", "content": "You are an agent in a household."},
               {"role": "user", "content": f"Your task is to: find the mug {k}."}] for k in range(3)]


class OutputExistsError(SageError):
    """``log.out_dir`` already holds a training run and ``--resume`` was not given."""


class ModelTooLargeError(SageError, MemoryError):
    """The student/teacher (with gradients and optimiser state) does not fit in the device's memory."""


# ---- setup helpers -------------------------------------------------------------------------------
def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on GPU, fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def resolve_model_path(path: str) -> str:
    """``tiny:student`` / ``tiny:teacher``: the tiny offline models of ``sage_models.tiny`` (built once
    under $SAGE_CACHE/models/tiny); anything else is a model folder or a hub id in the local cache."""
    if path.startswith("tiny:"):
        from sage_models import models_cache
        from sage_models.tiny import build_tiny_models

        paths = build_tiny_models(models_cache() / "tiny")
        name = path.removeprefix("tiny:")
        if name not in paths:
            raise ConfigError(f"unknown tiny model {path!r}; use tiny:student or tiny:teacher")
        return str(paths[name])
    if Path(path).expanduser().exists():  # a local folder: a clear error unless it holds a model
        from sage_models import check_model_folder

        check_model_folder(Path(path).expanduser())
    return path


def count_parameters(path: str) -> int:
    """Parameters of a model folder, counted on the meta device (nothing is allocated)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def check_fits(student_params: int, teacher_params: int, trainable: int, dtype: torch.dtype, device: torch.device,
               available: int | None = None) -> None:
    """Refuse clearly when weights + gradients + AdamW state obviously exceed the free memory."""
    width = torch.finfo(dtype).bits // 8
    need = (student_params + teacher_params) * width + trainable * (width + 8)  # grads + two fp32 moments
    free = available_memory(device) if available is None else available
    if need > free:
        gib = 1 << 30
        raise ModelTooLargeError(
            f"the student ({student_params / 1e9:.2f}B params, {trainable / 1e9:.2f}B trainable) and teacher "
            f"({teacher_params / 1e9:.2f}B) need about {need / gib:.1f} GiB for weights, gradients and AdamW state "
            f"in {dtype}, but {device} has {free / gib:.1f} GiB free. Use student.lora.enabled=true, a smaller "
            "teacher or a teacher server, more GPUs (torchrun + dist.strategy=ddp), or bf16 (optim.dtype=bf16).")


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain values, so that state.pt loads with ``weights_only=True``."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class PhaseTimer:
    """Seconds per phase of a step (``with timer("rollout"): ...``)."""

    def __init__(self):
        self.seconds: Counter[str] = Counter()

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start


def micro_batches(turns: list, n: int) -> list[list]:
    """Split a list of turns into at most ``n`` contiguous, nearly equal micro-batches."""
    n = max(1, min(n, len(turns)))
    size = math.ceil(len(turns) / n) if turns else 0
    return [turns[i:i + size] for i in range(0, len(turns), size)] if turns else []


# ---- the trainer ---------------------------------------------------------------------------------
class Trainer:
    """Trains a student with ``opd``, ``sage_opd``, ``guided_opd`` or ``sft`` (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, resume: bool = False):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.loss_cfg = cfg.effective_loss()
        self.dist = init_distributed(cfg.dist.strategy)
        self.device = self.dist.device
        self.dtype = resolve_dtype(cfg.optim.dtype, self.device)
        self.out_dir = Path(cfg.log.out_dir)
        self.step = 0
        if not resume:
            self._refuse_existing_run()
        if cfg.rollout.env_id and not cfg.rollout.from_file:
            check_train_split(cfg.rollout.env_id)
        set_seed(cfg.optim.seed)

        needs_teacher = cfg.algorithm != "sft" or cfg.sft.source == "teacher"
        remote = needs_teacher and cfg.teacher.server_url is not None
        if remote and (cfg.algorithm == "guided_opd" or cfg.algorithm == "sft"):
            raise ConfigError(f"{cfg.algorithm} needs the teacher to generate turns with token ids; a teacher server "
                              "(teacher.server_url) only scores them: use an in-process teacher (teacher.path)")
        self.student_path = resolve_model_path(cfg.student.path)
        self.teacher_path = resolve_model_path(cfg.teacher.path) if needs_teacher and not remote else None
        self.tokenizer = AutoTokenizer.from_pretrained(self.student_path)
        teacher_tok = AutoTokenizer.from_pretrained(self.teacher_path) if self.teacher_path else None
        if teacher_tok is not None:
            check_same_tokenizer(self.tokenizer, teacher_tok)
        self.vocab = len(self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else \
            self.tokenizer.eos_token_id

        student_params = count_parameters(self.student_path)
        teacher_params = count_parameters(self.teacher_path) if self.teacher_path else 0
        trainable_guess = student_params // 100 if cfg.student.lora.enabled else student_params
        if self.dist.strategy == "fsdp":
            if cfg.student.lora.enabled:
                raise ConfigError("dist.strategy=fsdp with student.lora is not supported: LoRA states are small, "
                                  "use dist.strategy=ddp")
            trainable_guess //= self.dist.world  # sharded gradients and AdamW state (plus a full rollout copy)
        check_fits(student_params, teacher_params, trainable_guess, self.dtype, self.device)

        self._lock = FolderLock(self.out_dir, "sage train").acquire() if self.dist.main else None
        resume_dir = self.latest_checkpoint() if resume else None
        self.resumed_from = resume_dir  # the checkpoint this run continues (None: from the start)
        if resume and resume_dir is None and self.dist.main:
            print(f"--resume: no checkpoint under {self.out_dir / 'checkpoints'}; starting from step 0")
        self.model = self._load_student(resume_dir)
        self.rollout_model = None  # fsdp: a full copy for generation, refreshed from the shards each step
        if self.dist.strategy == "fsdp":
            self.rollout_model = copy.deepcopy(self.model).eval().requires_grad_(False)
            shard_fsdp(self.model)
        self.teacher = None
        if remote:
            from sage_opd.teacher import RemoteTeacher

            self.teacher = RemoteTeacher(cfg.teacher.server_url, cfg.teacher.server_model or cfg.teacher.path or "",
                                         top_k=cfg.teacher.top_k)
            self.teacher.check_tokenizer(self.tokenizer)
        elif needs_teacher:
            from sage_opd.teacher import HFTeacher

            self.teacher = HFTeacher(AutoModelForCausalLM.from_pretrained(self.teacher_path, dtype=self.dtype),
                                     device=self.device, tokenizer=teacher_tok)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                           weight_decay=cfg.optim.weight_decay)
        warmup = cfg.optim.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        self._broadcast_parameters()

        self.judge = None
        if cfg.algorithm == "sage_opd" and self.loss_cfg.intervention != "all":
            from sage_opd.judge import JudgeConfig, TurnJudge

            self.judge = TurnJudge(self.teacher, self.tokenizer, JudgeConfig(
                mode=self.loss_cfg.intervention, decision=self.loss_cfg.judge_mode, tau=self.loss_cfg.tau,
                history_messages=2 * self.loss_cfg.judge_history_turns, seed=cfg.optim.seed))
        self.collector: RolloutCollector | None = None
        self.engine = None  # rollout.backend vllm/server: the generation engine, synced with the trained weights
        self.synced_at: int | None = None  # the step whose weights the engine holds (None: not synced yet)
        self.sync_seconds, self.sync_checks = 0.0, 0
        self.fixed_batch = RolloutBatch.load(cfg.rollout.from_file) if cfg.rollout.from_file else None
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.writer = None
        self.wandb = None
        if resume_dir is not None:
            self._load_state(resume_dir)
        if self.dist.main:
            save_config(cfg, self.out_dir / "config.yaml")
            self._truncate_metrics()

    def _refuse_existing_run(self) -> None:
        """Never overwrite a run's metrics and checkpoints silently: say how to resume it or go elsewhere."""
        last = self.latest_checkpoint()
        logged = self.out_dir / "metrics.jsonl"
        if last is None and not (logged.is_file() and logged.stat().st_size):
            return
        where = f"checkpoints up to {last.name}" if last else "metrics.jsonl but no checkpoint"
        raise OutputExistsError(
            f"{self.out_dir} already holds a training run ({where}). Add --resume to continue it"
            + (f" from {last.name}" if last else " (from step 0: nothing was saved)")
            + f", or write elsewhere with log.out_dir=OTHER_FOLDER (or delete {self.out_dir}).")

    # ---- models ----------------------------------------------------------------------------------
    def _load_student(self, checkpoint: Path | None):
        from transformers import AutoModelForCausalLM

        lora = self.cfg.student.lora
        source = checkpoint / "model" if checkpoint is not None and not lora.enabled else self.student_path
        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=self.dtype)
        except torch.OutOfMemoryError as err:
            raise ModelTooLargeError(f"loading the student {source} ran out of memory: {err}") from err
        if lora.enabled:
            from peft import LoraConfig, PeftModel, get_peft_model

            if checkpoint is not None:
                model = PeftModel.from_pretrained(model, checkpoint / "model", is_trainable=True)
            else:
                torch.manual_seed(self.cfg.optim.seed)
                model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                         target_modules=lora.target_modules, task_type="CAUSAL_LM"))
        if self.cfg.student.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            if lora.enabled:
                model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need grad inputs
        return model.to(self.device).train()

    def _broadcast_parameters(self) -> None:
        """Every rank starts from rank 0's weights (LoRA init, any nondeterminism in loading)."""
        if self.dist.world > 1 and self.dist.strategy == "ddp":
            for p in self.model.parameters():
                dist.broadcast(p.data, 0)

    def student_policy(self, name: str = "student", history=None):
        """The live student as a policy (generation reads the current weights; a new one after every update, so
        that no key/value cache of older weights is reused)."""
        from sage_models import HFPolicy

        return HFPolicy(model=self.rollout_model or self.model, tokenizer=self.tokenizer, name=name, history=history)

    def sync_rollout_model(self) -> None:
        """fsdp: gather the trained shards into the full generation copy (a collective: every rank calls it)."""
        if self.rollout_model is not None:
            self.rollout_model.load_state_dict(full_state_dict(self.model))

    def student_hidden(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Final hidden states and lm_head weight of the student (through the root module under FSDP)."""
        if self.dist.strategy != "fsdp":
            return lm_hidden_states(self.model, batch)
        out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True,
                         logits_to_keep=1, use_cache=False)
        return out.hidden_states[-1], self.model.get_output_embeddings().weight

    def teacher_policy(self, history=None):
        from sage_models import HFPolicy

        return HFPolicy(model=self.teacher.model, tokenizer=self.teacher.tokenizer, name="teacher", history=history)

    # ---- phases ----------------------------------------------------------------------------------
    def collect(self, step: int) -> RolloutBatch:
        """This rank's share of the step's episodes (or of the fixed batch ``rollout.from_file``)."""
        cfg, r = self.cfg, self.dist
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

        history = TokenHistory(self.tokenizer)  # student and teacher turns of one episode continue one another
        kwargs: dict[str, Any] = {}
        if cfg.algorithm == "guided_opd":
            kwargs = dict(teacher=self.teacher_policy(history), teacher_prob=self.beta(step))
        elif cfg.algorithm == "sft":
            kwargs = dict(expert=True) if cfg.sft.source == "expert" else dict(teacher=self.teacher_policy(history),
                                                                               teacher_prob=1.0)
        if not kwargs.get("expert"):
            self.sync_rollout_model()
        self.model.eval()
        try:
            student = None if kwargs.get("expert") else self.rollout_policy(history)
            return self.collector.collect([ids[i] for i in share], student, decoding, seed, indices=list(share),
                                          **kwargs)
        finally:
            self.model.train()

    # ---- the rollout engine (rollout.backend) -----------------------------------------------------------
    def rollout_policy(self, history):
        """The policy that writes student turns: the live model (hf), or a vLLM engine (vllm, server) given the
        trained weights every ``rollout.sync_every`` optimiser steps."""
        backend = self.cfg.rollout.backend
        if backend == "hf":
            return self.student_policy(history=history)
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
            return VLLMServerPolicy(r.server_url, self.tokenizer)
        return VLLMPolicy(self.student_path, tokenizer=self.tokenizer, **r.vllm)

    def sync_engine(self) -> None:
        """Push the current weights to the engine (rank 0 for a shared server; each rank's own engine in process)."""
        r, start = self.cfg.rollout, time.perf_counter()
        model = self.rollout_model or self.model
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

        greedy = Decoding(temperature=0.0, max_new_tokens=max_new_tokens)
        saved, self.engine.history = self.engine.history, TokenHistory(self.tokenizer)
        try:
            got = [g.token_ids for g in self.engine.generate(SYNC_PROBE, greedy, [])]
        finally:
            self.engine.history = saved
        want = [g.token_ids for g in HFPolicy(model=self.rollout_model or self.model, tokenizer=self.tokenizer,
                                              kv_reuse=False).generate(SYNC_PROBE, greedy, [])]
        if got != want:
            raise SageError(f"rollout.check_sync: after the sync at step {self.step} the {self.cfg.rollout.backend} "
                            f"engine generates {got[0][:12]}... where the trained weights give {want[0][:12]}...")
        self.sync_checks += 1

    def beta(self, step: int) -> float:
        return guided_beta(step, self.cfg.optim.steps, self.cfg.guided.rho)

    def tokenize(self, turns: list[TurnRecord]) -> None:
        """Fill the ids of scripted (expert) turns with the student's chat template; model turns keep theirs."""
        for t in turns:
            if t.prompt_ids and (t.token_ids or not t.text):
                continue
            text = self.tokenizer.apply_chat_template(t.messages, tokenize=False, add_generation_prompt=True,
                                                      enable_thinking=False)
            t.prompt_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            t.token_ids = self.tokenizer(t.text, add_special_tokens=False)["input_ids"]

    def judge_turns(self, turns: list[TurnRecord], step: int) -> tuple[list[float], dict[str, Any]]:
        """i_t for every turn: the judge for ``sage_opd`` (short-circuiting invalid turns), else 1."""
        distilled = [t for t in turns if not imitated(t, self.cfg.algorithm)]
        # invalid turns by reason, for every algorithm: they get i = 1 with no teacher call (short circuit)
        stats: dict[str, Any] = {"judge_calls": 0, **{f"short_circuit/{r}": sum(t.invalid_reason == r for t in distilled)
                                                      for r in INVALID_REASONS}}
        if self.judge is None or not distilled:
            return [1.0] * len(turns), stats
        from sage_opd.judge import JudgeTurn

        self.judge.rng.seed(derive_seed(self.cfg.optim.seed, step, self.dist.rank, 31))
        result = self.judge([JudgeTurn(t.task, t.messages, t.text, t.feedback, t.invalid_reason) for t in distilled])
        decided = iter(result.interventions)
        interventions = [1.0 if imitated(t, self.cfg.algorithm) else next(decided) for t in turns]
        if self.cfg.log.judge_turns and self.dist.main:
            self._log_judged(step, distilled, result)
        stats["judge_calls"] = result.stats.judge_calls
        return interventions, stats

    def _log_judged(self, step: int, turns: list[TurnRecord], result) -> None:
        """Append each judged turn (p_yes, i, the action and the env expert's move when known) to judge_turns.jsonl
        (rank 0's turns), for analysing the judge on real rollouts."""
        rows = [{"step": step + 1, "episode": t.episode, "turn": t.turn, "p_yes": p, "intervention": i,
                 "action": t.action, "expert_action": t.expert_action}
                for t, p, i in zip(turns, result.p_yes, result.interventions) if p is not None]
        append_jsonl(self.out_dir / "judge_turns.jsonl", *rows)

    def accumulate(self, turns: list[TurnRecord], interventions: list[float], timer: PhaseTimer) -> dict[str, float]:
        """Backpropagate sum(w * l) over this rank's turns in ``optim.grad_accum`` micro-batches; return sums."""
        cfg = self.cfg
        sums = Counter(tokens=sum(len(t.token_ids) for t in turns))
        kept = [(t, i) for t, i in zip(turns, interventions) if (i > 0 or imitated(t, cfg.algorithm)) and t.token_ids]
        parts: list = micro_batches(kept, cfg.optim.grad_accum)
        if self.dist.strategy == "fsdp":  # FSDP collectives: every rank runs as many passes as the busiest
            most = torch.tensor(len(parts))
            dist.all_reduce(most, op=dist.ReduceOp.MAX)
            parts += [None] * (int(most) - len(parts))
        for part in parts:
            if part is None:
                self._empty_pass()
                continue
            batch = make_batch([t for t, _ in part], self.pad_id, self.device)
            is_imitated = torch.tensor([imitated(t, cfg.algorithm) for t, _ in part], device=self.device)
            weights = torch.tensor([i for _, i in part], dtype=torch.float32, device=self.device)
            scores = None
            if not bool(is_imitated.all()):
                with timer("teacher"):
                    scores = self.teacher.score(batch)
                    if isinstance(scores, DenseTeacher):
                        scores = DenseTeacher(scores.hidden, scores.weight[: self.vocab])
            with timer("loss"):
                s_hidden, s_weight = self.student_hidden(batch)
                res: MicroResult = micro_batch_loss(s_hidden, s_weight[: self.vocab], scores, batch.turn_index,
                                                    batch.target_ids, weights, is_imitated, self.loss_cfg)
                res.weighted_loss.backward()
                if self.loss_cfg.token_loss != "reverse_kl" and isinstance(scores, DenseTeacher):
                    res.kl_sum = reverse_kl_sum(s_hidden.detach(), s_weight[: self.vocab].detach(), scores.hidden,
                                                scores.weight, batch.turn_index, is_imitated, weights,
                                                self.loss_cfg.chunk_tokens)
                elif self.loss_cfg.token_loss != "reverse_kl":
                    res.kl_sum = float("nan")  # a server teacher gives top-k only: no full-vocabulary KL
            sums.update(weighted_loss=float(res.weighted_loss.detach()), weight_sum=res.weight_sum,
                        opd_tokens=res.opd_tokens, ce_tokens=res.ce_tokens, kl_sum=res.kl_sum,
                        confidence_sum=res.confidence_sum, ce_sum=res.ce_sum)
        return dict(sums)

    def _empty_pass(self) -> None:
        """A forward/backward with zero loss, so an idle FSDP rank joins its peers' collectives."""
        hidden, weight = self.student_hidden(make_batch([TurnIds([self.pad_id], [])], self.pad_id, self.device))
        (hidden.sum() * 0.0 + weight.sum() * 0.0).backward()

    def optimizer_step(self, sums: dict[str, float]) -> dict[str, float]:
        """Sum gradients and statistics over ranks, normalise by sum(w) (or N), clip and step."""
        keys = ["tokens", "weighted_loss", "weight_sum", "opd_tokens", "ce_tokens", "kl_sum", "confidence_sum",
                "ce_sum"]
        totals = torch.tensor([float(sums.get(k, 0.0)) for k in keys], dtype=torch.float64)
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.dist.world > 1:
            dist.all_reduce(totals)
            if self.dist.strategy == "ddp":
                all_reduce_gradients(params)
        t = dict(zip(keys, totals.tolist()))
        norm_mode = self.loss_cfg.normalization
        denom = t["tokens"] if norm_mode == "none" else t["weight_sum"]
        no_update = denom <= 1e-8
        out = {"loss": t["weighted_loss"] / denom if not no_update else 0.0, "no_update": int(no_update),
               "response_tokens": int(t["tokens"]), "weight_sum": t["weight_sum"],
               "kl": t["kl_sum"] / t["opd_tokens"] if t["opd_tokens"] else None,
               "confidence_mean": t["confidence_sum"] / t["opd_tokens"] if t["opd_tokens"] else None,
               "ce": t["ce_sum"] / t["ce_tokens"] if t["ce_tokens"] else None,
               "lr": self.scheduler.get_last_lr()[0], "grad_norm": 0.0}
        if no_update:
            if self.dist.main:
                print(f"step {self.step + 1}: sum of weights is ~0 (no turn selected): no update this step")
        else:
            # fsdp's reduce-scatter averages over ranks; ddp (above) summed
            scale = (self.dist.world if self.dist.strategy == "fsdp" else 1) / denom
            for p in params:
                p.grad.mul_(scale)
            out["grad_norm"] = to_float(torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.max_grad_norm))
            self.optimizer.step()
        with warnings.catch_warnings():  # a skipped step still advances the schedule (it counts steps)
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return out

    def train_step(self, step: int) -> dict[str, Any]:
        """One full step; returns the metrics logged for it (identical on every rank)."""
        timer, start = PhaseTimer(), time.perf_counter()
        set_seed(derive_seed(self.cfg.optim.seed, step, self.dist.rank))
        with timer("rollout"):
            batch = self.collect(step)
        turns = batch.turns
        self.tokenize(turns)
        with timer("judge"):
            interventions, judge_stats = self.judge_turns(turns, step)
        try:
            sums = self.accumulate(turns, interventions, timer)
        except torch.OutOfMemoryError as err:
            raise ModelTooLargeError(f"out of memory in the training step ({err}). Lower optim.grad_accum's "
                                     "micro-batch size (raise optim.grad_accum), rollout.max_new_tokens, use "
                                     "student.lora.enabled=true or student.gradient_checkpointing=true.") from err
        distilled = [i for t, i in zip(turns, interventions) if not imitated(t, self.cfg.algorithm)]
        local = torch.tensor([sum(distilled), len(distilled), len(turns), sum(t.source == "teacher" for t in turns),
                              sum(ep.won for ep in batch.episodes), len(batch.episodes),
                              judge_stats["judge_calls"], *[judge_stats[f"short_circuit/{r}"] for r in INVALID_REASONS]],
                             dtype=torch.float64)
        with timer("optim"):
            metrics = self.optimizer_step(sums)
            if self.dist.world > 1:
                dist.all_reduce(local)
        (i_sum, n_distilled, n_turns, n_teacher, wins, n_eps, calls, *short) = local.tolist()
        metrics.update({
            "step": step + 1,  # steps done, as in checkpoints/step-N and evals/step-N
            "intervention_rate": i_sum / n_distilled if n_distilled else None,
            "judge_calls": int(calls),
            **{f"short_circuit/{r}": int(n) for r, n in zip(INVALID_REASONS, short)},
            "turns": int(n_turns), "teacher_turns": int(n_teacher), "episodes": int(n_eps),
            "rollout_success": wins / n_eps if n_eps else None,
        })
        if self.cfg.algorithm == "guided_opd":
            metrics["beta"] = self.beta(step)
        if self.cfg.rollout.backend != "hf" and self.synced_at is not None:
            # steps of training the rollouts' weights lack (0: synced right before this step's rollouts)
            metrics["rollout/policy_lag"] = step - self.synced_at
            metrics["rollout/sync_seconds"] = round(self.sync_seconds if self.synced_at == step else 0.0, 4)
            metrics["rollout/sync_checks"] = self.sync_checks
        metrics.update({f"time/{k}": round(v, 4) for k, v in timer.seconds.items()})
        metrics["time/step"] = round(time.perf_counter() - start, 4)
        return metrics

    @torch.no_grad()
    def token_kl(self, turns: list[TurnRecord], batch_size: int = 8) -> float:
        """Mean reverse KL(student || teacher) per response token over ``turns`` (e.g. held-out turns)."""
        total, count = 0.0, 0
        turns = [t for t in turns if t.token_ids]
        for lo in range(0, len(turns), batch_size):
            batch = make_batch(turns[lo:lo + batch_size], self.pad_id, self.device)
            teacher = self.teacher.score(batch)
            if not isinstance(teacher, DenseTeacher):
                raise SageError("token_kl needs an in-process teacher (full vocabulary)")
            s_hidden, s_weight = self.student_hidden(batch)
            n = len(turns[lo:lo + batch_size])
            total += reverse_kl_sum(s_hidden, s_weight[: self.vocab], teacher.hidden, teacher.weight[: self.vocab],
                                    batch.turn_index, torch.zeros(n, dtype=torch.bool, device=self.device),
                                    torch.ones(n, device=self.device), self.loss_cfg.chunk_tokens)
            count += batch.num_response_tokens
        return total / max(count, 1)

    # ---- evaluation --------------------------------------------------------------------------------
    def evaluate(self, step: int) -> dict[str, float]:
        """Success rate of the current student on the seen/unseen panels (rank 0, in-memory policy)."""
        from sage_evals.runner import evaluate

        out: dict[str, float] = {}
        ecfg = self.cfg.eval
        decoding = Decoding(temperature=ecfg.temperature, max_new_tokens=ecfg.max_new_tokens)
        self.model.eval()
        try:
            for name, env_id in (("seen", ecfg.seen), ("unseen", ecfg.unseen)):
                if not env_id:
                    continue
                # the model name says which step it is, in every leaderboard and report
                summary = evaluate(self.student_policy(f"{self.cfg.student.path} @ step {step}"), env_id, seeds=ecfg.seeds, workers=ecfg.workers,
                                   limit=ecfg.limit, decoding=decoding, progress=False,
                                   env_kwargs={"max_turns": ecfg.max_turns},
                                   out_dir=self.out_dir / "evals" / f"step-{step:06d}" / name)
                out[f"eval/{name}/success"] = summary["success"]["mean"]
                out[f"eval/{name}/score"] = summary["score"]["mean"]
                out[f"eval/{name}/turns"] = summary["turns_mean"]
                out[f"eval/{name}/invalid_rate"] = sum(summary["invalid_rate"].values())
        finally:
            self.model.train()
        return out

    # ---- checkpoints -------------------------------------------------------------------------------
    def latest_checkpoint(self) -> Path | None:
        folder = self.out_dir / "checkpoints"
        if folder.is_dir() and self.dist.main:
            restore_aside(folder)  # a checkpoint set aside by a save that crashed goes back first
        if self.dist.world > 1:
            dist.barrier()
        found = sorted(folder.glob(f"{CHECKPOINT_PREFIX}*[0-9]")) if folder.is_dir() else []
        return found[-1] if found else None

    def save_checkpoint(self, step: int) -> Path | None:
        """Write model, optimiser, scheduler, RNG and judge state into a temporary folder, then swap it in
        durably (``replace_dir``: the previous folder of that step goes only once the new one is in place)."""
        model, optimizer_state = self.model, None
        if self.dist.strategy == "fsdp":  # gather the shards (collectives on every rank), save the full copy
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            self.sync_rollout_model()
            model = self.rollout_model
            optimizer_state = get_optimizer_state_dict(self.model, self.optimizer,
                                                       options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.dist.world > 1:
            dist.barrier()
        if not self.dist.main:
            return None
        folder = self.out_dir / "checkpoints"
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"{CHECKPOINT_PREFIX}{step:06d}"
        tmp = folder / f".tmp-{CHECKPOINT_PREFIX}{step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp / "model")
        self.tokenizer.save_pretrained(tmp / "model")
        judge = [self.judge.judged_total, self.judge.judged_sum] if self.judge is not None else None
        torch.save({"step": step, "optimizer": optimizer_state or self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "rng": rng_state(), "judge": judge, "config": self.cfg.to_dict()}, tmp / "state.pt")
        replace_dir(tmp, final)
        for old in sorted(folder.glob(f"{CHECKPOINT_PREFIX}*[0-9]"))[: -self.cfg.log.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _load_state(self, checkpoint: Path) -> None:
        try:  # weights_only: a checkpoint folder is data, never code to run
            state = torch.load(checkpoint / "state.pt", weights_only=True)
        except pickle.UnpicklingError as err:
            raise SageError(f"{checkpoint / 'state.pt'} holds pickled objects other than tensors and plain values, "
                            "which sage does not load (unpickling can run code); it was not written by this version "
                            f"of sage: {str(err).splitlines()[0]}") from None
        changed = [k for k, v in _flatten(self.cfg.to_dict()).items()
                   if _flatten(state["config"]).get(k) != v and not k.startswith(("log.", "eval."))]
        if changed and self.dist.main:
            print(f"--resume: these settings differ from the checkpoint's, the run will not match an "
                  f"uninterrupted one: {', '.join(changed)}")
        if self.dist.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.model, self.optimizer, optim_state_dict=state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        if self.judge is not None and state["judge"] is not None:
            self.judge.judged_total, self.judge.judged_sum = state["judge"]
        self.step = state["step"]

    def _truncate_metrics(self) -> None:
        """Cut a torn last line (a kill mid-write) and, on resume, drop logged steps past the checkpoint (step N:
        N steps done, as in checkpoints/step-N) so the logs read like one run (rewritten atomically, only when there is something to drop)."""
        for path in (self.metrics_path, self.out_dir / "judge_turns.jsonl"):
            rows = read_jsonl(path)
            kept = [r for r in rows if r.get("step", -1) <= self.step]
            if len(kept) < len(rows):
                write_jsonl(path, kept)

    # ---- logging and the loop -------------------------------------------------------------------------
    def log(self, metrics: dict[str, Any]) -> None:
        if not self.dist.main:
            return
        append_jsonl(self.metrics_path, metrics)
        if self.cfg.log.tensorboard:
            if self.writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.out_dir / "tensorboard"))
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(key, value, metrics["step"])
            self.writer.flush()
        if self.cfg.log.wandb:
            if self.wandb is None:
                try:
                    import wandb
                except ImportError as err:
                    raise SageError(f"log.wandb=true needs the wandb package: {install_hint('wandb')}") from err
                self.wandb = wandb.init(project=self.cfg.log.wandb_project, config=self.cfg.to_dict(),
                                        dir=str(self.out_dir), resume="allow")
            self.wandb.log({k: v for k, v in metrics.items() if v is not None}, step=metrics["step"])

    def train(self, on_step: Callable[[dict[str, Any]], None] | None = None,
              until: int | None = None) -> list[dict[str, Any]]:
        """Run from ``self.step`` to ``optim.steps`` (or stop after step ``until``, like a pre-empted job);
        checkpoint every ``log.save_every`` steps and at the end."""
        cfg, history = self.cfg, []
        last = min(cfg.optim.steps, until) if until is not None else cfg.optim.steps
        try:
            while self.step < last:
                step = self.step
                metrics = self.train_step(step)
                self.step = step + 1
                if cfg.eval.every and self.step % cfg.eval.every == 0:
                    self.sync_rollout_model()  # fsdp: every rank gathers; rank 0 evaluates the full copy
                if cfg.eval.every and self.step % cfg.eval.every == 0 and self.dist.main:
                    start = time.perf_counter()
                    metrics.update(self.evaluate(self.step))
                    metrics["time/eval"] = round(time.perf_counter() - start, 4)
                self.log(metrics)
                history.append(metrics)
                if on_step is not None:
                    on_step(metrics)
                if self.step == last or (cfg.log.save_every and self.step % cfg.log.save_every == 0):
                    self.save_checkpoint(self.step)
        finally:
            self.close()
        return history

    def close(self) -> None:
        if self.collector is not None:
            self.collector.close()
            self.collector = None
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None


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


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
