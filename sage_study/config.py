"""Typed study configs: one YAML file with named profiles (``quick``, ``full``) that override its base.

>>> cfg = load_study_config("configs/study/alfworld_cpu.yaml", profile="quick", overrides=["eval.seeds=[0]"])
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sage_opd.config import ConfigError, build, parse_overrides, set_dotted
from sage_study.models import Arch
from sage_study.sft import SftConfig


@dataclass
class EnvsConfig:
    """The train split the data and rollouts come from, and the evaluation panels."""

    train: str = "alfworld-train"
    seen: str = "alfworld-seen"
    unseen: str = "alfworld-unseen"
    max_turns: int = 30


@dataclass
class DataConfig:
    """Disjoint, seeded samples of train games for each data set (numbers of games)."""

    expert: int = 600  # the hand-coded expert: the teacher's imitation data
    noisy: int = 200  # the expert with epsilon-random mistakes: its recoveries (imitation) and judge examples
    epsilon: float = 0.25
    warm: int = 8  # expert episodes the student is warm-started on (so that it writes valid actions)
    judge: int = 150  # warm-student rollouts labelled by the expert: judge examples
    heldout: int = 60  # games whose noisy and student turns measure the judge (never trained on)
    pool: int = 200  # the games the distillation runs sample their rollouts from
    pool_source: Literal["fresh", "expert"] = "fresh"  # fresh: games in no SFT data; expert: the first expert games the expert won
    warm_from_pool: bool = False  # pool_source expert: the warm start's games begin with the pool's (it saw them once)
    noisy_pool: int = 0  # pool_source expert: noisy plays of each pool game (the teacher's recoveries on its games)
    pool_max_turns: int | None = None  # pool_source expert: only games the expert won within this many turns
    dagger_plays: int = 0  # warm-student plays of each pool game (train rollout temperature) whose mistakes the expert
    dagger_turns: int = 3  # corrects, at most this many per episode: the teacher's DAgger data (data.correction_examples)
    seed: int = 0
    workers: int = 2


@dataclass
class ModelConfig:
    """A model: an existing folder (``path``; nothing is built), or one built from scratch with ``arch``
    and trained with ``sft`` (the teacher on the expert data, the student on ``data.warm`` games)."""

    path: str | None = None
    arch: Arch = field(default_factory=Arch)
    sft: SftConfig = field(default_factory=SftConfig)
    swaps: int = 3  # object-renamed copies of each imitation episode (data.swap_object): they teach copying the task
    judge_share: float | None = 0.5  # teacher only: judgment examples per imitation example (None: every balanced turn)
    graded_judge: bool = False  # teacher only: also Skip/Weak/Strong answers on the same turns (loss.judge_mode=graded)


@dataclass
class MethodConfig:
    """One trained variant: an algorithm plus dotted overrides of the shared ``train`` config."""

    name: str = "sage_opd"
    algorithm: str = "sage_opd"
    overrides: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])


@dataclass
class EvalConfig:
    """How each model is evaluated (``sage_evals`` on fixed panel prefixes; None: the whole panel)."""

    seen_limit: int | None = None  # 0: skip the panel
    unseen_limit: int | None = None
    pool_limit: int = 0  # > 0: also the first games of the rollout pool (train split), a check that training works
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    temperature: float = 0.4
    max_new_tokens: int = 64
    workers: int = 4


@dataclass
class StudyConfig:
    out_dir: str = "runs/study/alfworld-cpu"
    profile: str = "full"
    envs: EnvsConfig = field(default_factory=EnvsConfig)
    tokenizer_vocab: int = 1024
    data: DataConfig = field(default_factory=DataConfig)
    teacher: ModelConfig = field(default_factory=ModelConfig)
    student: ModelConfig = field(default_factory=lambda: ModelConfig(arch=Arch(hidden_size=128, intermediate_size=512,
                                                                                num_hidden_layers=4)))
    train: dict[str, Any] = field(default_factory=dict)  # a `sage train` config shared by every run
    methods: list[MethodConfig] = field(default_factory=list)
    baseline: str = "opd"
    eval: EvalConfig = field(default_factory=EvalConfig)
    torch_threads: int = 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_study_config(path: str | Path, profile: str | None = None, overrides: list[str] | None = None) -> StudyConfig:
    """Read a study YAML: its base settings, then ``profiles[profile]`` merged over them, then overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Study config {str(path)!r} does not exist (see configs/study/)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"Study config {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Study config {str(path)!r} must hold a mapping, got {type(data).__name__}")
    profiles = data.pop("profiles", {}) or {}
    profile = profile or data.get("profile") or "full"
    if profile not in profiles and profile != data.get("profile", "full"):
        raise ConfigError(f"Unknown profile {profile!r} in {path}; its profiles: {', '.join(profiles) or 'none'}")
    data = _merge(data, profiles.get(profile, {}))
    data["profile"] = profile
    for key, value in parse_overrides(overrides or []):
        set_dotted(data, key, value, StudyConfig)
    cfg = build(StudyConfig, data)
    from sage_opd.config import TrainConfig

    build(TrainConfig, cfg.train, "train")  # the shared train config must be valid on its own
    names = [m.name for m in cfg.methods]
    if len(set(names)) != len(names):
        raise ConfigError(f"method names must be distinct, got {names}")
    if cfg.methods and cfg.baseline not in names:
        raise ConfigError(f"baseline {cfg.baseline!r} is not one of the methods: {', '.join(names)}")
    graded = [m.name for m in cfg.methods if _judge_mode(cfg.train, m).startswith("graded")]
    if graded and cfg.teacher.path is None and not cfg.teacher.graded_judge:
        raise ConfigError(f"methods {', '.join(graded)} use a graded judge, but the study's teacher is not trained to "
                          "answer Skip/Weak/Strong: set teacher.graded_judge: true")
    if cfg.teacher.path and not cfg.student.path:
        raise ConfigError("teacher.path is set (a given teacher) but student.path is not: the study builds its "
                          "student from the data it makes for its own teacher; give both models or neither")
    return cfg


def _judge_mode(train: dict[str, Any], method: MethodConfig) -> str:
    """The method's loss.judge_mode: its own override, else the shared train config's, else the default."""
    modes = [str(v) for k, v in parse_overrides(method.overrides) if k == "loss.judge_mode"]
    return modes[-1] if modes else str((train.get("loss") or {}).get("judge_mode", "hard"))
