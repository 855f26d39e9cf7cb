"""Seconds per training step of each algorithm with the tiny models on the real ALFWorld engine.

    .venv/bin/python bench/bench_train.py [--steps 3] [--episodes 2] [--max-turns 3] [--threads 1]

Two tables: (1) full steps with real rollouts (the random tiny student writes invalid turns, so
the judge short-circuits them all), also with one env worker process per episode; (2) the trainer alone on a fixed batch whose valid turns
(expert actions relabelled as student turns) make the judge run. The first step of each run is
a warm-up and is left out of the means.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_sage_opd_alfworld.yaml"
ALGORITHMS = ("opd", "sage_opd", "guided_opd", "sft")
PHASES = ("rollout", "judge", "teacher", "loss", "optim")


def run(algorithm: str, tmp: Path, paths: dict, args, extra: list[str]) -> list[dict]:
    from sage_opd.config import load_config
    from sage_opd.trainer import Trainer

    teacher = "teacher.path=null" if algorithm == "sft" else f"teacher.path={paths['teacher']}"
    cfg = load_config(TINY, [f"algorithm={algorithm}", f"student.path={paths['student']}", teacher,
                             f"log.out_dir={tmp / algorithm}", "log.tensorboard=false", "log.save_every=0",
                             f"optim.steps={args.steps + 1}", f"rollout.episodes_per_step={args.episodes}",
                             f"rollout.max_turns={args.max_turns}", f"rollout.max_new_tokens={args.max_new_tokens}",
                             *extra])
    trainer = Trainer(cfg)
    history = []
    for step in range(args.steps + 1):
        history.append(trainer.train_step(step))
    trainer.close()
    return history[1:]


def fixed_batch(paths: dict, tmp: Path, args) -> Path:
    from sage_models import HFPolicy
    from sage_models.policy import Decoding
    from sage_opd.rollout import RolloutBatch, RolloutCollector

    collector = RolloutCollector("alfworld-train", args.episodes, max_turns=args.max_turns)
    ids = collector.episode_ids[: args.episodes]
    student = collector.collect(ids, HFPolicy(paths["student"]), Decoding(temperature=1.0,
                                                                          max_new_tokens=args.max_new_tokens), seed=0)
    expert = collector.collect(ids, None, Decoding(), seed=0, expert=True)
    collector.close()
    for turn in expert.turns:
        turn.source = "student"
    path = tmp / "fixed.json"
    RolloutBatch(student.episodes + expert.episodes).save(path)
    return path


def table(title: str, rows: dict[str, list[dict]]) -> None:
    print(f"\n{title}")
    head = f"{'algorithm':<12} {'s/step':>7} " + " ".join(f"{p:>8}" for p in PHASES) + f" {'turns':>6} {'tokens':>7}"
    print(head)
    print("-" * len(head))
    for name, hist in rows.items():
        mean = lambda key: statistics.mean(m.get(key) or 0.0 for m in hist)  # noqa: E731
        print(f"{name:<12} {mean('time/step'):>7.2f} " + " ".join(f"{mean('time/' + p):>8.2f}" for p in PHASES)
              + f" {mean('turns'):>6.1f} {mean('response_tokens'):>7.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per algorithm (after one warm-up step)")
    parser.add_argument("--episodes", type=int, default=2)
    parser.add_argument("--max-turns", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from sage_models.tiny import build_tiny_models

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        paths = build_tiny_models(tmp / "models")
        print(f"tiny student/teacher, torch threads {args.threads}, {args.episodes} episodes x <= {args.max_turns} "
              f"turns x <= {args.max_new_tokens} new tokens per step, mean of {args.steps} steps", file=sys.stderr)
        full = {a: run(a, tmp, paths, args, []) for a in ALGORITHMS}
        for a in ("opd", "sft"):  # the same steps with one env worker process per episode
            full[f"{a}+procs"] = run(a, tmp, paths, args, ["rollout.env_processes=true"])
        table("(1) full steps, real ALFWorld rollouts (seconds; +procs: rollout.env_processes=true)", full)
        batch = fixed_batch(paths, tmp, args)
        fixed = {a: run(a, tmp, paths, args, [f"rollout.from_file={batch}", "loss.judge_mode=soft"])
                 for a in ALGORITHMS if a != "guided_opd"}
        table("(2) trainer only, fixed batch with valid turns (seconds)", fixed)
        calls = statistics.mean(m["judge_calls"] for m in fixed["sage_opd"])
        print(f"\nsage_opd on the fixed batch: {calls:.0f} judge calls per step; "
              f"sage_opd / opd trainer time: {statistics.mean(m['time/step'] for m in fixed['sage_opd']) / statistics.mean(m['time/step'] for m in fixed['opd']):.2f}x")


if __name__ == "__main__":
    main()
