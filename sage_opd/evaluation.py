"""The evaluate phase: the live student on the seen/unseen panels through ``sage_evals.runner.evaluate``
(rank 0), each run folder under ``evals/step-NNNNNN/<panel>`` with the model named ``<student> @ step N``."""

from __future__ import annotations

from pathlib import Path

from sage_models.policy import Decoding
from sage_opd.build import Student
from sage_opd.config import EvalConfig


def evaluate_student(student: Student, ecfg: EvalConfig, name: str, out_dir: Path, step: int) -> dict[str, float]:
    """Success, score, turns and invalid-turn rate of the current student on each configured panel."""
    from sage_evals.runner import evaluate

    out: dict[str, float] = {}
    decoding = Decoding(temperature=ecfg.temperature, max_new_tokens=ecfg.max_new_tokens)
    student.model.eval()
    try:
        for panel, env_id in (("seen", ecfg.seen), ("unseen", ecfg.unseen)):
            if not env_id:
                continue
            # the model name says which step it is, in every leaderboard and report
            summary = evaluate(student.policy(f"{name} @ step {step}"), env_id, seeds=ecfg.seeds, workers=ecfg.workers,
                               limit=ecfg.limit, decoding=decoding, progress=False,
                               env_kwargs={"max_turns": ecfg.max_turns},
                               out_dir=Path(out_dir) / "evals" / f"step-{step:06d}" / panel)
            out[f"eval/{panel}/success"] = summary["success"]["mean"]
            out[f"eval/{panel}/score"] = summary["score"]["mean"]
            out[f"eval/{panel}/turns"] = summary["turns_mean"]
            out[f"eval/{panel}/invalid_rate"] = sum(summary["invalid_rate"].values())
    finally:
        student.model.train()
    return out
