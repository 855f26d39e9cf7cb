"""Typed training configs: YAML files plus ``key=value`` overrides on dotted paths.

>>> cfg = load_config("configs/sage_opd_alfworld.yaml", ["optim.lr=1e-5", "loss.judge_mode=soft"])

Unknown keys and wrong types raise ``ConfigError`` naming the valid keys (with close matches).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from sage_gym.durable import atomic_write
from sage_gym.envargs import parse_key_value
from sage_gym.errors import SageError
from sage_opd.algorithm import algorithm_for


class ConfigError(SageError, ValueError):
    """A config file or override that names an unknown key or holds a value of the wrong type."""


@dataclass
class LoraConfig:
    """LoRA adapters (peft) on the student; ``enabled: false`` trains the full model."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class StudentConfig:
    """The trained model: a local folder or hub id already in the local cache."""

    path: str = "Qwen/Qwen3-1.7B"
    lora: LoraConfig = field(default_factory=LoraConfig)
    gradient_checkpointing: bool = False


@dataclass
class TeacherConfig:
    """The frozen teacher, in process (``path``) or behind a vLLM server (``server_url``); it shares the student's
    tokenizer, or (in process, with ``loss.cross_tokenizer``) has its own. ``null`` path and no server: no teacher
    (sft on expert trajectories)."""

    path: str | None = "Qwen/Qwen3-8B"
    server_url: str | None = None  # an OpenAI-compatible vLLM server (e.g. http://host:8000/v1) scoring top-k
    server_model: str | None = None  # the served model name (default: path)
    top_k: int = 20  # prompt log-probs per position read from the server


@dataclass
class LossConfig:
    """SPEC section 4 options. Only ``sage_opd`` reads intervention, confidence and normalization (preserve or
    none); the other algorithms train with i = 1, c = 1 and sum(l) / N (``Algorithm.loss_options``)."""

    token_loss: Literal["reverse_kl", "sampled", "forward_kl", "jsd"] = "reverse_kl"
    jsd_beta: float = 0.5
    intervention: Literal["judge", "all", "random", "inverted"] = "judge"
    # hard: i = 1[p_yes >= tau]; soft: i = p_yes; graded: Skip/Weak/Strong, i = judge_weak_weight * p_weak + p_strong;
    # graded_hard: i = (0, judge_weak_weight, 1) of the most probable answer
    judge_mode: Literal["hard", "soft", "graded", "graded_hard"] = "hard"
    tau: float = 0.5
    judge_weak_weight: float = 0.5
    judge_floor: float = 0.0  # the least i of a judged turn: 0 is SPEC's objective, f > 0 keeps OPD at f on skipped turns
    judge_history_turns: int = 4
    confidence: Literal["entropy", "maxprob", "none"] = "entropy"
    normalization: Literal["preserve", "none", "standard"] = "preserve"
    chunk_tokens: int = 1024  # tokens per chunk of the full-vocabulary loss
    # a teacher whose tokenizer differs from the student's: token losses on aligned text spans, each option an
    # approximation (docs/sage-opd-losses.md); null refuses such a teacher. One tokenizer: always the exact loss.
    cross_tokenizer: Literal["sequence", "shared_vocab", "uld"] | None = None
    uld_top_k: int = 20  # uld: the largest probabilities outside the shared vocabulary, matched by sorting


@dataclass
class RolloutConfig:
    """Which env and how many episodes a step collects (the global batch, split over ranks)."""

    env_id: str = "alfworld-train"
    episodes_per_step: int = 16
    max_turns: int | None = None  # None: the env's cap (30 ALFWorld / ScienceWorld, 16 SearchQA)
    history_window: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    max_new_tokens: int = 512
    from_file: str | None = None  # train on a saved RolloutBatch (JSON) every step instead of collecting
    env_processes: bool = False  # one worker process per env: resets and steps of the batch run in parallel
    episode_ids: list[str] | None = None  # sample episodes from these ids of env_id only (a fixed game pool)
    env_kwargs: dict[str, Any] = field(default_factory=dict)  # more env options, e.g. {expert_labels: true}
    # the generation engine of student turns: hf (the trained model itself), vllm (vLLM's engine in this process),
    # server (a running vLLM server; see docs/training.md "Training at scale")
    backend: Literal["hf", "vllm", "server"] = "hf"
    server_url: str | None = None  # server: e.g. http://127.0.0.1:8000
    sync: Literal["folder", "lora"] = "folder"  # server: full weights reloaded from a folder, or LoRA adapters
    sync_dir: str | None = None  # server: a folder the server can read (default: log.out_dir/sync)
    sync_every: int = 1  # optimiser steps between weight syncs; rollout/policy_lag says how stale the engine is
    check_sync: bool = False  # after each sync, greedy engine generations must equal the trained weights' (hf)
    # vllm: engine arguments (gpu_memory_utilization, dtype, ...; enable_sleep_mode: it sleeps between rollouts, CUDA)
    vllm: dict[str, Any] = field(default_factory=dict)


@dataclass
class GuidedConfig:
    """Guided-OPD: teacher turn probability beta_s = 0.5 (1 + cos(pi min(s / (rho S), 1)))."""

    rho: float = 0.8


@dataclass
class SftConfig:
    """SFT data source: the env's ``expert`` agent or ``teacher`` rollouts."""

    source: Literal["expert", "teacher"] = "expert"


@dataclass
class OptimConfig:
    lr: float = 1e-6
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    grad_accum: int = 1  # micro-batches per step (the rollout batch is split into this many)
    max_grad_norm: float = 1.0
    steps: int = 200
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine"] = "constant"  # after the warm-up; cosine decays to 0 at optim.steps
    seed: int = 0
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU


@dataclass
class EvalConfig:
    """Periodic evaluation on the seen/unseen panels (``every: 0`` disables it)."""

    every: int = 50
    seen: str | None = "alfworld-seen"
    unseen: str | None = "alfworld-unseen"
    limit: int | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    temperature: float = 0.4
    max_new_tokens: int = 4096
    max_turns: int | None = None  # None: the env's cap
    workers: int = 4  # env worker processes of the evaluation service


@dataclass
class LogConfig:
    out_dir: str = "runs/sage_opd"
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "sage-opd"
    save_every: int = 50
    keep_checkpoints: int = 2
    judge_turns: bool = False  # write judge_turns.jsonl: every judged turn's p_yes and i (and expert label, if any)
    # log kl/kept, kl/skipped (turns the loss keeps or the judge skips) and kl/expert_same, kl/expert_other (the
    # student's action is the expert's move or not): one more teacher and student forward pass per step
    kl_by_turn: bool = False


@dataclass
class DistConfig:
    """``none``, or ``ddp`` (replicated student) / ``fsdp`` (FSDP2-sharded student) under torchrun
    (gloo on CPU, nccl on GPU)."""

    strategy: Literal["none", "ddp", "fsdp"] = "none"


@dataclass
class TrainConfig:
    algorithm: Literal["opd", "sage_opd", "guided_opd", "sft"] = "sage_opd"
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    guided: GuidedConfig = field(default_factory=GuidedConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- building from dicts ------------------------------------------------------------------
def _fields(cls) -> dict[str, Any]:
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown(key: str, path: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=3)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    where = f"{path}.{key}" if path else key
    return ConfigError(f"Unknown config key {where!r}.{hint} Valid keys{' under ' + repr(path) if path else ''}: "
                       f"{', '.join(valid)}")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check/convert ``value`` to type ``tp``; a clear error otherwise."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where} must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {type(value).__name__} {value!r}")
        (item,) = get_args(tp)
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {type(value).__name__} {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping of {', '.join(_fields(tp))}; got {value!r}")
        return build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be an integer, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # yaml reads 1e-5 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where} must be a number, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where} must be a string, got {type(value).__name__} {value!r}")
    return value


def build(cls, data: dict[str, Any], path: str = ""):
    """Build dataclass ``cls`` from a nested dict, refusing unknown keys and wrong types."""
    fields = _fields(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown(key, path, list(fields))
        kwargs[key] = _convert(value, fields[key], f"{path}.{key}" if path else key)
    return cls(**kwargs)


def set_dotted(data: dict[str, Any], dotted: str, value: Any, root: type | None = None) -> None:
    """Set ``a.b.c`` in a nested dict, checking every part against the fields of dataclass ``root``
    (default ``TrainConfig``); below a free-form mapping field the keys are set as given."""
    cls, node, path = root or TrainConfig, data, ""
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        fields = _fields(cls) if cls is not None else None
        if fields is not None and part not in fields:
            raise _unknown(part, path, list(fields))
        path = f"{path}.{part}" if path else part
        if i == len(parts) - 1:
            node[part] = value
            return
        tp = fields[part] if fields is not None else dict
        if not (dataclasses.is_dataclass(tp) or tp is dict or get_origin(tp) is dict):
            raise ConfigError(f"{path!r} is a value ({tp}), not a section: cannot set {dotted!r}")
        node = node.setdefault(part, {})
        cls = tp if dataclasses.is_dataclass(tp) else None


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["optim.lr=1e-5", "lora.enabled=true"]`` -> ``[(key, yaml-parsed value), ...]``."""
    return [parse_key_value(item, "Override", "optim.lr=1e-5 (a dotted key)", ConfigError) for item in overrides]


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (or the defaults when ``path`` is None) and apply ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file {str(path)!r} does not exist (see configs/ for examples)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            where = getattr(err, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"Config file {str(path)!r} is not valid YAML{at}: {problem}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"Config file {str(path)!r} must hold a mapping of sections, got {type(data).__name__}")
    for key, value in parse_overrides(overrides or []):
        set_dotted(data, key, value)
    cfg = build(TrainConfig, data)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Checks across fields that types alone cannot express."""
    if cfg.rollout.episodes_per_step < 1:
        raise ConfigError(f"rollout.episodes_per_step must be >= 1, got {cfg.rollout.episodes_per_step}")
    if cfg.optim.grad_accum < 1 or cfg.optim.steps < 1:
        raise ConfigError("optim.grad_accum and optim.steps must be >= 1")
    if not 0.0 < cfg.guided.rho <= 1.0:
        raise ConfigError(f"guided.rho must be in (0, 1], got {cfg.guided.rho}")
    if not 0.0 <= cfg.loss.tau <= 1.0:
        raise ConfigError(f"loss.tau must be in [0, 1], got {cfg.loss.tau}")
    if not 0.0 <= cfg.loss.judge_weak_weight <= 1.0:
        raise ConfigError(f"loss.judge_weak_weight must be in [0, 1], got {cfg.loss.judge_weak_weight}")
    if not 0.0 <= cfg.loss.judge_floor <= 1.0:
        raise ConfigError(f"loss.judge_floor must be in [0, 1], got {cfg.loss.judge_floor}")
    if cfg.loss.uld_top_k < 1:
        raise ConfigError(f"loss.uld_top_k must be >= 1, got {cfg.loss.uld_top_k}")
    algorithm = algorithm_for(cfg.algorithm, cfg.sft.source)
    if algorithm.needs_teacher and not (cfg.teacher.path or cfg.teacher.server_url):
        raise ConfigError(f"algorithm {cfg.algorithm!r} needs teacher.path (or teacher.server_url)")
    if algorithm.teacher_writes and cfg.teacher.server_url is not None:
        raise ConfigError(f"{cfg.algorithm} needs the teacher to generate turns with token ids; a teacher server "
                          "(teacher.server_url) only scores them: use an in-process teacher (teacher.path)")
    if algorithm.selective and cfg.loss.normalization == "standard":
        raise ConfigError("loss.normalization=standard (sum(l) / N, no turn selection) is what algorithm=opd uses; "
                          "sage_opd accepts preserve (sum(w l) / sum(w)) or none (sum(w l) / N)")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas must hold two numbers, got {cfg.optim.betas}")
    if cfg.log.kl_by_turn and (not algorithm.needs_teacher or cfg.teacher.server_url is not None):
        raise ConfigError("log.kl_by_turn needs an in-process teacher (teacher.path): it scores every turn with the "
                          f"full vocabulary; algorithm {cfg.algorithm!r} with "
                          f"{'a teacher server' if cfg.teacher.server_url else 'no teacher'} has none")
    r = cfg.rollout
    if r.sync_every < 1:
        raise ConfigError(f"rollout.sync_every must be >= 1 optimiser step, got {r.sync_every}")
    if r.backend == "server" and not r.server_url:
        raise ConfigError("rollout.backend=server needs rollout.server_url (a vLLM server started with the sage weight-"
                          "sync extension, see docs/training.md)")
    if r.backend != "server" and r.server_url:
        raise ConfigError(f"rollout.server_url is set but rollout.backend is {r.backend!r}; use rollout.backend=server")
    if r.sync == "lora" and not cfg.student.lora.enabled:
        raise ConfigError("rollout.sync=lora pushes LoRA adapters: it needs student.lora.enabled=true")


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    atomic_write(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
