"""Generation speed of the embedded SmolLM2-135M on CPU by OpenMP wait policy and torch threads.

Each setting runs in a fresh process (OMP_WAIT_POLICY is read when torch loads): batch 2, a
~300-token prompt, 128 new tokens. On a CPU shared with other jobs, spinning (ACTIVE) threads
wait on each other; `sage` sets PASSIVE unless OMP_WAIT_POLICY is set.

    .venv/bin/python bench/bench_omp_wait.py [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

PROBE = """
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; tokens/s (batch 2):")
    for policy in ("ACTIVE", "PASSIVE"):
        for threads in (1, 2):
            env = {**os.environ, "OMP_WAIT_POLICY": policy}
            out = subprocess.run([sys.executable, "-c", PROBE, str(threads), str(args.new_tokens)], env=env,
                                 capture_output=True, text=True, check=True)
            print(f"  OMP_WAIT_POLICY={policy:<8} threads {threads}: {float(out.stdout.split()[-1]):6.1f} tok/s")


if __name__ == "__main__":
    main()
