"""What a training run logs: ``metrics.jsonl`` (one line per step, appended and fsynced), TensorBoard,
Weights & Biases, ``judge_turns.jsonl`` (every judged turn, with ``log.judge_turns``), and the seconds
each phase of a step took. Only rank 0 writes."""

from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sage_gym.durable import append_jsonl, read_jsonl, write_jsonl
from sage_gym.errors import SageError, install_hint
from sage_opd.config import LogConfig


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


class RunLog:
    """The run's logs under ``out_dir`` (``main``: this process writes them)."""

    def __init__(self, out_dir: Path, cfg: LogConfig, main: bool = True, config: dict[str, Any] | None = None):
        self.out_dir, self.cfg, self.main, self.config = Path(out_dir), cfg, main, config
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.judge_path = self.out_dir / "judge_turns.jsonl"
        self.writer = None
        self.wandb = None

    def truncate(self, step: int) -> None:
        """Cut a torn last line (a kill mid-write) and, on resume, drop logged steps past the checkpoint (step N:
        N steps done, as in checkpoints/step-N) so the logs read like one run (rewritten atomically, only when
        there is something to drop)."""
        for path in (self.metrics_path, self.judge_path):
            rows = read_jsonl(path)
            kept = [r for r in rows if r.get("step", -1) <= step]
            if len(kept) < len(rows):
                write_jsonl(path, kept)

    def judged(self, step: int, turns: list, result) -> None:
        """Append each judged turn (p_yes, i, each answer's probability, the action and the env expert's move when
        known) to judge_turns.jsonl (rank 0's turns), for analysing the judge on real rollouts."""
        if not (self.cfg.judge_turns and self.main):
            return
        rows = [{"step": step + 1, "episode": t.episode, "turn": t.turn, "p_yes": p, "intervention": i,
                 "answers": answers, "action": t.action, "expert_action": t.expert_action}
                for t, p, answers, i in zip(turns, result.p_yes, result.p_answers, result.interventions)
                if p is not None]
        append_jsonl(self.judge_path, *rows)

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.main:
            return
        append_jsonl(self.metrics_path, metrics)
        if self.cfg.tensorboard:
            if self.writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.out_dir / "tensorboard"))
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(key, value, metrics["step"])
            self.writer.flush()
        if self.cfg.wandb:
            if self.wandb is None:
                try:
                    import wandb
                except ImportError as err:
                    raise SageError(f"log.wandb=true needs the wandb package: {install_hint('wandb')}") from err
                self.wandb = wandb.init(project=self.cfg.wandb_project, config=self.config, dir=str(self.out_dir),
                                        resume="allow")
            self.wandb.log({k: v for k, v in metrics.items() if v is not None}, step=metrics["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
