"""`sage study`: every stage of the study, each skipped when its output exists, so a killed study resumes.

Stages write into ``out_dir`` and record ``stages/<name>.json`` (what they made, their wall time)
when they finish; the episode stages (the evaluation runner) and the training runs (``--resume``)
also resume from inside. ``Study(cfg).run()`` runs what is missing and returns the results. The report
written while runs are missing (``--only report``) covers the finished ones and is not recorded, so the
study's next run rewrites it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from sage_gym.errors import SageError
from sage_study.config import MethodConfig, StudyConfig

console = Console(stderr=True)


def atomic_json(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` atomically and durably (its folder made if needed)."""
    from sage_gym.durable import atomic_write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, obj)


@dataclass
class Stage:
    name: str
    run: Callable[[], dict[str, Any]]
    needs_model: bool = False  # a stage skipped when the models are given (GPU setting)


class Study:
    """The study of one config; stages run in order, each at most once."""

    def __init__(self, cfg: StudyConfig):
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.stage_dir = self.out / "stages"

    # ---- paths -----------------------------------------------------------------------------------
    @property
    def tokenizer_path(self) -> Path:
        return self.out / "models" / "tokenizer"

    @property
    def teacher_path(self) -> str:
        return self.cfg.teacher.path or str(self.out / "models" / "teacher")

    @property
    def student_path(self) -> str:
        return self.cfg.student.path or str(self.out / "models" / "student-warm")

    def games(self) -> dict[str, list[str]]:
        return json.loads((self.out / "games.json").read_text())

    def panels(self) -> list[tuple[str, str, int | None, list[str] | None]]:
        """(name, env id, limit, episode ids) of each evaluation panel."""
        e, envs = self.cfg.eval, self.cfg.envs
        out = [(name, env, limit, None) for name, env, limit in (("seen", envs.seen, e.seen_limit),
                                                                   ("unseen", envs.unseen, e.unseen_limit))
               if limit != 0]
        if e.pool_limit:
            out.append(("pool", envs.train, None, self.games()["pool"][:e.pool_limit]))
        return out

    def run_dir(self, method: str, seed: int) -> Path:
        return self.out / "runs" / f"{method}-seed{seed}"

    def data_dir(self, name: str) -> Path:
        return self.out / "data" / name

    # ---- the stages --------------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        from sage_study import stages as s

        build = self.cfg.teacher.path is None
        out = [Stage("games", lambda: s.pick_games(self))]
        if build:
            d = self.cfg.data
            out.append(Stage("expert", lambda: s.play_expert(self, "expert", "expert", 0.0)))
            if d.pool_source == "expert":
                out.append(Stage("pool", lambda: s.pick_pool(self)))
                if d.noisy_pool:
                    out.append(Stage("noisy_pool", lambda: s.play_expert(self, "pool", "noisy-pool", d.epsilon,
                                                                         plays=d.noisy_pool)))
            out += [Stage("noisy", lambda: s.play_expert(self, "noisy", "noisy", d.epsilon)),
                    Stage("heldout_noisy", lambda: s.play_expert(self, "heldout", "heldout-noisy", d.epsilon)),
                    Stage("tokenizer", lambda: s.train_tokenizer(self))]
        if self.cfg.student.path is None:
            out.append(Stage("student_warm", lambda: s.warm_student(self)))
        if build:
            out.append(Stage("student_rollouts", lambda: s.student_rollouts(self)))
            if self.cfg.data.dagger_plays:
                out.append(Stage("student_pool", lambda: s.student_pool(self)))
            out += [Stage("teacher", lambda: s.train_teacher(self)),
                    Stage("judge_eval", lambda: s.judge_eval(self))]
        out += [Stage("eval_teacher", lambda: s.evaluate_model(self, "teacher", self.teacher_path)),
                Stage("eval_warm", lambda: s.evaluate_model(self, "student-warm", self.student_path))]
        for method in self.cfg.methods:
            for seed in method.seeds:
                out.append(Stage(f"train/{method.name}/{seed}", self._train(method, seed)))
                out.append(Stage(f"eval/{method.name}/{seed}", self._evaluate_run(method, seed)))
        out.append(Stage("report", lambda: s.report(self)))
        return out

    def _train(self, method: MethodConfig, seed: int):
        from sage_study import stages as s

        return lambda: s.train_run(self, method, seed)

    def _evaluate_run(self, method: MethodConfig, seed: int):
        from sage_study import stages as s

        return lambda: s.evaluate_run(self, method, seed)

    def record_path(self, name: str) -> Path:
        """Where stage ``name`` (e.g. ``train/opd/0``) records that it finished."""
        return self.stage_dir / f"{name.replace('/', '__')}.json"

    def done(self, name: str) -> dict[str, Any] | None:
        path = self.record_path(name)
        return json.loads(path.read_text()) if path.is_file() else None

    def run(self, only: list[str] | None = None) -> dict[str, dict[str, Any]]:
        """Run the missing stages (``only``: just those whose name starts with one of these) and return
        every stage's record."""
        import torch
        from transformers.utils import logging as hf_logging

        torch.set_num_threads(self.cfg.torch_threads)
        hf_logging.disable_progress_bar()  # the stages show their own progress
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_json(self.out / "study-config.json", self.cfg.to_dict())
        stages = self.stages()
        todo = [st for st in stages if self.done(st.name) is None
                and (only is None or any(st.name.startswith(o) for o in only))]
        records: dict[str, dict[str, Any]] = {}
        start, finished = time.perf_counter(), 0
        for k, stage in enumerate(stages, 1):
            record = self.done(stage.name)
            if record is None and stage in todo:
                left = len(todo) - finished
                elapsed = time.perf_counter() - start
                eta = f", about {elapsed / finished * left / 60:.0f} min left" if finished else ""
                console.rule(f"[bold]study {self.cfg.profile}[/] stage {k}/{len(stages)}: {stage.name}"
                             f" ({left} to run{eta})")
                t0 = time.perf_counter()
                info = stage.run() or {}
                record = {"stage": stage.name, "seconds": round(time.perf_counter() - t0, 1), **info}
                if not info.get("incomplete"):  # a stage that did part of its job (a report before every run
                    # finished) is not recorded, so the next run does it again
                    atomic_json(self.record_path(stage.name), record)
                finished += 1
            if record is not None:
                records[stage.name] = record
        return records


def check_ready(cfg: StudyConfig) -> None:
    """Clear errors before hours of work: the envs exist and their data is installed."""
    import sage_gym

    for env_id in (cfg.envs.train, cfg.envs.seen, cfg.envs.unseen):
        spec = sage_gym.spec(env_id)
        status = spec.status()
        if status not in ("ready", "-"):
            raise SageError(f"{env_id}: {status}")
