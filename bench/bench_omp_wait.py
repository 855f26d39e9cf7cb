"""Speed on CPU by OpenMP wait policy, on a quiet CPU and on one shared with busy processes.

OMP_WAIT_POLICY is read when torch loads, so each setting runs in a fresh process. Policies:
``default`` (unset: libgomp spins a short while, then sleeps), ``PASSIVE`` (sleep at once) and
``ACTIVE`` (spin). Workloads: ``generate`` (the embedded SmolLM2-135M, batch 2, a ~300-token
prompt, 128 new tokens: tokens/s) and ``sft`` (training steps of a 1.1M-parameter Llama like the
quick study's teacher, two 512-token rows a step: tokens/s). ``--busy N`` runs N processes that
spin on a core during every measurement (another job on the machine). The `sage` command keeps
the default unless OMP_WAIT_POLICY is set.

    .venv/bin/python bench/bench_omp_wait.py [--busy 0 2] [--threads 2] [--new-tokens 128] [--sft-steps 40]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

GENERATE = """
import sys, time, torch
from sage_models import load_policy
from sage_models.policy import Decoding
torch.set_num_threads(int(sys.argv[1]))
policy = load_policy("smollm2-135m")
chat = [{"role": "user", "content": "Describe a kitchen in great detail. " * 40}]
policy.generate([chat], Decoding(max_new_tokens=4), [])  # warm up
t = time.perf_counter()
out = policy.generate([chat, chat], Decoding(temperature=1.0, max_new_tokens=int(sys.argv[2])), [], seeds=[1, 2])
print(sum(len(g.token_ids) for g in out) / (time.perf_counter() - t))
"""

SFT = """
import sys, time, torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
def step():
    for _ in range(2):  # the study's SFT: rows one at a time, gradients accumulated
        ids = torch.randint(0, 1024, (1, 512))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        F.cross_entropy(logits.reshape(-1, 1024).float(), ids[:, 1:].reshape(-1)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
for _ in range(3):
    step()  # warm up
t = time.perf_counter()
for _ in range(int(sys.argv[2])):
    step()
print(int(sys.argv[2]) * 2 * 512 / (time.perf_counter() - t))
"""

BUSY = "while True: pass"


def measure(workload: str, policy: str, threads: int, amount: int) -> float:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    probe = GENERATE if workload == "generate" else SFT
    out = subprocess.run([sys.executable, "-c", probe, str(threads), str(amount)], env=env,
                         capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 2], help="competing busy processes (each setting)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--sft-steps", type=int, default=40)
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} before; {args.threads} torch threads; "
          "tokens/s, and the ratio to the default policy in the same conditions")
    for busy in args.busy:
        spinners = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(busy)]
        try:
            for workload, amount in (("generate", args.new_tokens), ("sft", args.sft_steps)):
                rates = {p: measure(workload, p, args.threads, amount) for p in ("default", "PASSIVE", "ACTIVE")}
                cells = "  ".join(f"{p} {r:8.1f} ({r / rates['default']:.2f}x)" for p, r in rates.items())
                print(f"  busy {busy}  {workload:<8}  {cells}", flush=True)
        finally:
            for p in spinners:
                p.kill()


if __name__ == "__main__":
    main()
