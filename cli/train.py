"""`sage train`: parse the config and overrides, run the trainer with a progress display."""

from __future__ import annotations

import sys
from pathlib import Path

import typer


def _step_text(m: dict) -> str:
    """The numbers of one step, for the progress bar and for plain log lines."""
    parts = [f"loss {m['loss']:.4f}"]
    for key, label in (("kl", "kl"), ("intervention_rate", "int"), ("rollout_success", "succ"),
                       ("eval/seen/success", "seen"), ("eval/unseen/success", "unseen")):
        if m.get(key) is not None:
            parts.append(f"{label} {m[key]:.3f}")
    return " ".join(parts)


def train(
    config: Path = typer.Option(..., "--config", "-c", help="A YAML training config (see configs/)."),
    overrides: list[str] = typer.Argument(None, help="Dotted key=value overrides, e.g. optim.lr=1e-5 loss.tau=0.6"),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in log.out_dir."),
) -> None:
    """Train a student with opd, sage_opd, guided_opd or sft (run under torchrun for data parallel)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from sage_opd.config import load_config
    from sage_opd.trainer import Trainer

    cfg = load_config(config, overrides or [])
    trainer = Trainer(cfg, resume=resume)
    console = Console(stderr=True)
    if not trainer.dist.main:
        trainer.train()
        return
    out = Path(cfg.log.out_dir)
    console.print(f"[bold]{cfg.algorithm}[/] student {cfg.student.path} teacher {cfg.teacher.path} on "
                  f"{cfg.rollout.env_id} -> {out} (world size {trainer.dist.world})", highlight=False, soft_wrap=True)
    if trainer.resumed_from is not None:
        console.print(f"resuming from {trainer.resumed_from} (step {trainer.step} of {cfg.optim.steps}); "
                      f"metrics.jsonl keeps steps 1-{trainer.step}", highlight=False, soft_wrap=True)
    if not (console.is_terminal and sys.stdout.isatty()):  # piped or redirected: one plain line per step
        def line(m: dict) -> None:
            print(f"step {m['step']}/{cfg.optim.steps} {_step_text(m)} ({m['time/step']:.1f}s)", flush=True)

        trainer.train(on_step=line)
    else:
        progress = Progress(TextColumn("[bold blue]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TimeRemainingColumn(), TextColumn("{task.fields[status]}"), console=console)
        with progress:
            task = progress.add_task("train", total=cfg.optim.steps, completed=trainer.step, status="")
            trainer.train(on_step=lambda m: progress.update(task, completed=m["step"], status=_step_text(m)))
    console.print(f"done: metrics in {out / 'metrics.jsonl'}, checkpoints in {out / 'checkpoints'}"
                  + (f", evaluations in {out / 'evals'}" if (out / "evals").is_dir() else "")
                  + f"; curves: sage report {out}", highlight=False, soft_wrap=True)
