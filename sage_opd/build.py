"""The build phase: from the config, the student (LoRA, gradient checkpointing, FSDP shards plus a full
copy for generation), the teacher (in process or a server), the judge, the optimiser and its schedule.

``check_models`` runs first and loads nothing but tokenizers: it resolves the model paths, decides
the teacher path (exact when teacher and student share a tokenizer; across tokenizers with
``loss.cross_tokenizer``, refused otherwise) and checks that weights, gradients and AdamW state fit
in memory (parameters counted on the meta device); ``build`` then loads everything.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sage_gym.errors import SageError
from sage_opd.algorithm import Algorithm
from sage_opd.config import ConfigError, LossConfig, TrainConfig
from sage_opd.parallel import DistInfo, full_state_dict, shard_fsdp
from sage_opd.teacher import TokenizerMismatchError, TurnIds, check_same_tokenizer, lm_hidden_states, make_batch


class ModelTooLargeError(SageError, MemoryError):
    """The student/teacher (with gradients and optimiser state) does not fit in the device's memory."""


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


@dataclass
class ModelPlan:
    """What ``build`` will load, checked: model paths, the tokenizers and the teacher path they allow."""

    student_path: str
    teacher_path: str | None  # an in-process teacher's folder (None: no teacher, or a teacher server)
    tokenizer: Any
    teacher_tokenizer: Any
    xtok: Any = None  # sage_opd.xtok.CrossTokenizer when the teacher has another tokenizer; None: the exact path
    route: str | None = None  # the start-up line saying which teacher path was taken (None: no teacher)


def teacher_route(cfg: TrainConfig, algorithm: Algorithm, tokenizer, teacher_tok):
    """(None, line) on the exact path, where teacher and student share a tokenizer; (CrossTokenizer, line) across
    tokenizers with ``loss.cross_tokenizer``, which is refused when unset or when the algorithm's teacher writes
    turns (``Algorithm.any_teacher_tokenizer``)."""
    mode = cfg.loss.cross_tokenizer
    try:
        check_same_tokenizer(tokenizer, teacher_tok)
    except TokenizerMismatchError as err:
        if mode is None:
            raise TokenizerMismatchError(f"{err} Or distil across tokenizers with loss.cross_tokenizer=sequence, "
                                         "shared_vocab or uld (approximations: docs/sage-opd-losses.md).") from None
        if not algorithm.any_teacher_tokenizer:
            raise ConfigError(f"loss.cross_tokenizer trains opd and sage_opd; {algorithm.name} trains on "
                              "teacher-written turns, which needs a teacher with the student's tokenizer") from None
        from sage_opd.xtok import CrossTokenizer

        xtok = CrossTokenizer(tokenizer, teacher_tok)
        return xtok, (f"teacher path: cross-tokenizer (the teacher's tokenizer differs from the student's), "
                      f"loss.cross_tokenizer={mode} on aligned text spans, {len(xtok.shared.student_ids)} shared ids")
    return None, "teacher path: exact (teacher and student share a tokenizer)"


def check_models(cfg: TrainConfig, algorithm: Algorithm, dist_info: DistInfo, dtype: torch.dtype) -> ModelPlan:
    """Resolve the models, load their tokenizers, decide the teacher path (``teacher_route``), refuse models that do
    not fit."""
    from transformers import AutoTokenizer

    remote = algorithm.needs_teacher and cfg.teacher.server_url is not None
    student_path = resolve_model_path(cfg.student.path)
    teacher_path = resolve_model_path(cfg.teacher.path) if algorithm.needs_teacher and not remote else None
    tokenizer = AutoTokenizer.from_pretrained(student_path)
    teacher_tok = AutoTokenizer.from_pretrained(teacher_path) if teacher_path else None
    xtok, route = teacher_route(cfg, algorithm, tokenizer, teacher_tok) if teacher_tok is not None else (None, None)
    if remote:  # load_teacher checks the server's tokenizer
        route = "teacher path: exact (the teacher server shares the student's tokenizer)"
    student_params = count_parameters(student_path)
    teacher_params = count_parameters(teacher_path) if teacher_path else 0
    trainable_guess = student_params // 100 if cfg.student.lora.enabled else student_params
    if dist_info.strategy == "fsdp":
        if cfg.student.lora.enabled:
            raise ConfigError("dist.strategy=fsdp with student.lora is not supported: LoRA states are small, "
                              "use dist.strategy=ddp")
        trainable_guess //= dist_info.world  # sharded gradients and AdamW state (plus a full rollout copy)
    check_fits(student_params, teacher_params, trainable_guess, dtype, dist_info.device)
    return ModelPlan(student_path, teacher_path, tokenizer, teacher_tok, xtok, route)


class Student:
    """The trained model and what the phases ask of it: a policy over the live weights for rollouts and
    evaluation, final hidden states for the loss, and under FSDP a full copy for generation that
    ``sync_rollout_model`` gathers from the shards."""

    def __init__(self, model, tokenizer, path: str, dist_info: DistInfo):
        self.model, self.tokenizer, self.path, self.dist = model, tokenizer, path, dist_info
        self.vocab = len(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.rollout_model = None  # fsdp: a full copy for generation, refreshed from the shards each step
        if dist_info.strategy == "fsdp":
            self.rollout_model = copy.deepcopy(model).eval().requires_grad_(False)
            shard_fsdp(model)

    @property
    def generator(self):
        """The module that generates: the model itself, or its full copy under FSDP."""
        return self.rollout_model or self.model

    def parameters(self) -> list[torch.nn.Parameter]:
        """The trained parameters (LoRA: the adapters only)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def policy(self, name: str = "student", history=None):
        """The live student as a policy (generation reads the current weights; a new one after every update, so
        that no key/value cache of older weights is reused)."""
        from sage_models import HFPolicy

        return HFPolicy(model=self.generator, tokenizer=self.tokenizer, name=name, history=history)

    def sync_rollout_model(self) -> None:
        """fsdp: gather the trained shards into the full generation copy (a collective: every rank calls it)."""
        if self.rollout_model is not None:
            self.rollout_model.load_state_dict(full_state_dict(self.model))

    def hidden(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Final hidden states and lm_head weight of the student (through the root module under FSDP)."""
        if self.dist.strategy != "fsdp":
            return lm_hidden_states(self.model, batch)
        out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True,
                         logits_to_keep=1, use_cache=False)
        return out.hidden_states[-1], self.model.get_output_embeddings().weight

    def empty_pass(self) -> None:
        """A forward/backward with zero loss, so an idle FSDP rank joins its peers' collectives."""
        hidden, weight = self.hidden(make_batch([TurnIds([self.pad_id], [])], self.pad_id, self.dist.device))
        (hidden.sum() * 0.0 + weight.sum() * 0.0).backward()


def load_student(cfg: TrainConfig, path: str, dtype: torch.dtype, device: torch.device, checkpoint: Path | None):
    """The student from ``path`` (or a checkpoint), with LoRA adapters and gradient checkpointing as configured."""
    from transformers import AutoModelForCausalLM

    lora = cfg.student.lora
    source = checkpoint / "model" if checkpoint is not None and not lora.enabled else path
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except torch.OutOfMemoryError as err:
        raise ModelTooLargeError(f"loading the student {source} ran out of memory: {err}") from err
    if lora.enabled:
        from peft import LoraConfig, PeftModel, get_peft_model

        if checkpoint is not None:
            model = PeftModel.from_pretrained(model, checkpoint / "model", is_trainable=True)
        else:
            torch.manual_seed(cfg.optim.seed)
            model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                     target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    if cfg.student.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if lora.enabled:
            model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need grad inputs
    return model.to(device).train()


def load_teacher(cfg: TrainConfig, algorithm: Algorithm, plan: ModelPlan, dtype: torch.dtype, device: torch.device,
                 tokenizer):
    """The teacher: a ``RemoteTeacher`` (its tokenizer checked) for ``teacher.server_url``, else an in-process
    ``HFTeacher``; None when the algorithm needs none."""
    if not algorithm.needs_teacher:
        return None
    if cfg.teacher.server_url is not None:
        from sage_opd.teacher import RemoteTeacher

        teacher = RemoteTeacher(cfg.teacher.server_url, cfg.teacher.server_model or cfg.teacher.path or "",
                                top_k=cfg.teacher.top_k)
        teacher.check_tokenizer(tokenizer)
        return teacher
    from transformers import AutoModelForCausalLM

    from sage_opd.teacher import HFTeacher

    return HFTeacher(AutoModelForCausalLM.from_pretrained(plan.teacher_path, dtype=dtype), device=device,
                     tokenizer=plan.teacher_tokenizer)


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """The learning-rate multiplier of optimiser step ``step`` (0-based): a linear warm-up over ``warmup`` steps,
    then 1 (``constant``) or a cosine from 1 down to 0 at step ``total`` (``cosine``)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return 1.0


def build_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]):
    """AdamW over ``params`` and its schedule (``lr_factor``: linear warm-up, then constant or cosine)."""
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  weight_decay=cfg.optim.weight_decay)
    o = cfg.optim
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, o.warmup_steps, o.steps,
                                                                                 o.lr_schedule))
    return optimizer, scheduler


def build_judge(cfg: TrainConfig, algorithm: Algorithm, loss: LossConfig, teacher, tokenizer):
    """SAGE-OPD's turn judge over the teacher (None when every i_t is 1); ``tokenizer`` is the teacher's (the judge
    renders its prompt as the teacher reads text)."""
    if not algorithm.judges(loss):
        return None
    from sage_opd.judge import JudgeConfig, TurnJudge

    return TurnJudge(teacher, tokenizer, JudgeConfig(
        mode=loss.intervention, decision=loss.judge_mode, tau=loss.tau, weak_weight=loss.judge_weak_weight,
        history_messages=2 * loss.judge_history_turns, seed=cfg.optim.seed, floor=loss.judge_floor))


@dataclass
class Built:
    """Everything the phases train with."""

    student: Student
    teacher: Any  # HFTeacher | RemoteTeacher | None
    judge: Any  # TurnJudge | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


def build(cfg: TrainConfig, algorithm: Algorithm, loss: LossConfig, plan: ModelPlan, dist_info: DistInfo,
          dtype: torch.dtype, checkpoint: Path | None = None) -> Built:
    """Load the student (from ``checkpoint`` when resuming) and the teacher, build the optimiser and the judge;
    under DDP every rank starts from rank 0's weights."""
    device = dist_info.device
    student = Student(load_student(cfg, plan.student_path, dtype, device, checkpoint), plan.tokenizer,
                      plan.student_path, dist_info)
    teacher = load_teacher(cfg, algorithm, plan, dtype, device, plan.tokenizer)
    optimizer, scheduler = build_optimizer(cfg, student.parameters())
    if dist_info.world > 1 and dist_info.strategy == "ddp":  # LoRA init, any nondeterminism in loading
        for p in student.model.parameters():
            dist.broadcast(p.data, 0)
    judge = build_judge(cfg, algorithm, loss, teacher, plan.teacher_tokenizer or plan.tokenizer)
    return Built(student, teacher, judge, optimizer, scheduler)
