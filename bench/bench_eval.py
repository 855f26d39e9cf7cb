"""Evaluation throughput: episodes per minute and the share of wall time spent waiting on envs.

Runs side by side in one process (same model, same episodes, seeded decoding):
  * the expert (no model: pure env cost) with 1 and N workers;
  * smollm2-135m with 1 worker, N workers batched (one generate call for all live episodes),
    and N workers one episode at a time (batch_size=1).

    .venv/bin/python bench/bench_eval.py                     # 4 episodes, 32 new tokens, 3 turns
    .venv/bin/python bench/bench_eval.py --episodes 4 --max-new-tokens 64 --max-turns 5 --workers 2

torch runs on one thread by default: on a busy shared CPU two OpenMP threads were 15x slower.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from sage_models import HFPolicy, smollm2_path
from sage_models.policy import Decoding
from sage_evals.runner import evaluate


def run(name: str, policy, workers: int, args, out: Path, decoding: Decoding | None = None) -> dict:
    t = time.perf_counter()
    s = evaluate(policy, args.env, limit=args.episodes, workers=workers, out_dir=out / name, progress=False,
                 decoding=decoding, env_kwargs={"max_turns": args.max_turns})
    timing = s["timing"]
    print(f"{name:<28} {workers:>3} {timing['episodes_per_minute']:>8.2f} {timing['env_wait_share']:>9.1%} "
          f"{timing.get('gen_share', 0):>9.1%} {s['tokens']['completion']:>7} {time.perf_counter() - t:>8.1f}")
    return timing


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env", default="alfworld-unseen")
    p.add_argument("--episodes", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-turns", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    decoding = Decoding(max_new_tokens=args.max_new_tokens, seed=0)
    n = args.workers
    print(f"env {args.env}, {args.episodes} episodes, max_turns {args.max_turns}, max_new_tokens "
          f"{args.max_new_tokens}, torch threads {args.threads}")
    print(f"{'run':<28} {'wk':>3} {'ep/min':>8} {'env wait':>9} {'generate':>9} {'tokens':>7} {'wall s':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        e1 = run("expert", "expert", 1, args, out)
        en = run("expert", "expert", n, args, out / "n")
        batched_policy = HFPolicy(smollm2_path(), name="smollm2-135m")
        single_policy = HFPolicy(model=batched_policy.model, tokenizer=batched_policy.tokenizer, batch_size=1,
                                 name="smollm2-135m")
        m1 = run("smollm2 batched", batched_policy, 1, args, out / "m1", decoding)
        mb = run("smollm2 batched", batched_policy, n, args, out / "mb", decoding)
        ms = run("smollm2 one-at-a-time", single_policy, n, args, out / "ms", decoding)
    print(f"\nratios: expert {n} workers / 1 worker: {en['episodes_per_minute'] / e1['episodes_per_minute']:.2f}x; "
          f"smollm2 {n} workers / 1 worker: {mb['episodes_per_minute'] / m1['episodes_per_minute']:.2f}x; "
          f"batched / one-at-a-time ({n} workers): {mb['episodes_per_minute'] / ms['episodes_per_minute']:.2f}x")


if __name__ == "__main__":
    main()
