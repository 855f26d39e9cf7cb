"""Generation over whole multi-turn episodes: key/value cache reuse and batching, side by side in one run.

Episodes are real ALFWorld unseen games played for ``--turns`` turns by a small model: the embedded
SmolLM2-135M-Instruct by default (``--model``; ``tiny`` is a random Llama built on the spot over the
tiny offline tokenizer). Every turn gets the gym's feedback for an invalid response, so every
episode runs to the turn cap and its prompt grows every turn, as a weak model's does. The same games
are played with the same seeded decoding and the hf backend:

  * batched, kv reuse: ``--live`` episodes, one ``generate`` call per turn for all of them, each turn
    starting from the conversation's cached keys (only the new feedback is prefilled);
  * batched, full prefill: the same, with the whole history prefilled every turn (kv reuse at the
    runner's operating point: ``sage evaluate`` and ``sage train`` play episodes this way);
  * one at a time, kv reuse: one call per episode (episodes per minute against the batched run);
  * one at a time, full prefill: the first ``--full-prefill-episodes`` episodes with the whole history
    prefilled every turn (generation seconds and prefill tokens of a 30-turn episode against the same
    episodes with reuse, and a check that both generate the same ids).

    .venv/bin/python bench/bench_generation.py                     # SmolLM2-135M, 8 live, 30 turns, 32 new tokens
    .venv/bin/python bench/bench_generation.py --model tiny --hidden 256 --layers 4

Env steps are played once up front and replayed (the gym's feedback for invalid turns does not
depend on the response text), so the numbers time generation alone. It prints the OpenMP wait
policy it ran with: set ``OMP_WAIT_POLICY=PASSIVE`` on a CPU shared with other busy jobs
(``bench/bench_omp_wait.py``).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from sage_models import HFPolicy, load_policy
from sage_models.policy import Decoding


def tiny_model(hidden: int, layers: int):
    from sage_models.tiny import build_model, build_tokenizer

    tokenizer = build_tokenizer(512)
    heads = max(1, hidden // 64)
    return build_model(tokenizer, "student", seed=3, initializer_range=0.3, hidden_size=hidden,
                       intermediate_size=4 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=heads), tokenizer


def starts(n: int) -> tuple[list[list[dict]], list[str]]:
    """The first chats of ``n`` unseen games and the feedback an invalid turn gets."""
    import sage_gym

    env = sage_gym.make("alfworld-unseen")
    chats = []
    for episode_id in env.unwrapped.episode_ids[:n]:
        _, info = env.reset(options={"episode_id": episode_id})
        chats.append(info["messages"])
    env.close()
    return chats, env.unwrapped.stop


def play(policy: HFPolicy, chats: list[list[dict]], stop: list[str], turns: int, decoding: Decoding,
         one_at_a_time: bool) -> dict:
    """``turns`` turns of every chat; returns generation seconds (per episode: its own calls one at a time, an
    equal share of the batched calls), prefill tokens and the generated ids."""
    from sage_gym.formatting import ReActFormatter

    feedback = ReActFormatter().invalid_feedback("unparseable")
    embed, fed = policy.model.get_input_embeddings(), [0]
    hook = embed.register_forward_hook(lambda _m, args, _o: fed.__setitem__(0, fed[0] + args[0].numel()))
    chats, ids, seconds, generated = [list(c) for c in chats], [], [0.0] * len(chats), 0
    try:
        for turn in range(turns):
            seeds = [1000 * turn + k for k in range(len(chats))]
            if one_at_a_time:
                gens = []
                for k, (c, s) in enumerate(zip(chats, seeds)):
                    t0 = time.perf_counter()
                    gens.append(policy.generate([c], decoding, stop, seeds=[s])[0])
                    seconds[k] += time.perf_counter() - t0
            else:
                t0 = time.perf_counter()
                gens = policy.generate(chats, decoding, stop, seeds=seeds)
                seconds = [x + (time.perf_counter() - t0) / len(chats) for x in seconds]
            generated += sum(len(g.token_ids) for g in gens)
            ids.append([g.token_ids for g in gens])
            chats = [c + [{"role": "assistant", "content": g.text}, {"role": "user", "content": feedback}]
                     for c, g in zip(chats, gens)]
    finally:
        hook.remove()
    return {"seconds": sum(seconds), "episode_seconds": seconds, "fed": fed[0] - generated, "generated": generated,
            "ids": ids, "prompt_tokens": len(gens[0].prompt_ids)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m, tiny (a random Llama), or a model folder")
    p.add_argument("--live", type=int, default=8, help="episodes played at once")
    p.add_argument("--turns", type=int, default=30)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--full-prefill-episodes", type=int, default=2, help="episodes also played without kv reuse")
    p.add_argument("--hidden", type=int, default=256, help="--model tiny: hidden size")
    p.add_argument("--layers", type=int, default=4, help="--model tiny: layers")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.model == "tiny":
        net, tokenizer = tiny_model(args.hidden, args.layers)
    else:
        loaded = load_policy(args.model)
        net, tokenizer = loaded.model, loaded.tokenizer
    params = sum(q.numel() for q in net.parameters())
    chats, stop = starts(args.live)
    decoding = Decoding(temperature=1.0, max_new_tokens=args.max_new_tokens)
    print(f"{args.live} ALFWorld unseen games x {args.turns} turns, {args.model} ({params / 1e6:.1f}M params), "
          f"{args.max_new_tokens} new tokens, {args.threads} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
          f"load average {os.getloadavg()[0]:.1f}")
    play(HFPolicy(model=net, tokenizer=tokenizer), chats, stop, 2, decoding, False)  # warm-up
    k = min(args.full_prefill_episodes, args.live)
    runs = {}
    for name, reuse, single, games in (("batched, kv reuse", True, False, chats),
                                       ("batched, full prefill", False, False, chats),
                                       ("one at a time, kv reuse", True, True, chats),
                                       ("one at a time, full prefill", False, True, chats[:k])):
        policy = HFPolicy(model=net, tokenizer=tokenizer, kv_reuse=reuse)
        runs[name] = r = play(policy, games, stop, args.turns, decoding, single)
        n = len(games)
        print(f"{name:<28} {n} episodes  {r['seconds'] / n:8.2f} s/episode  {60 * n / r['seconds']:7.2f} episodes/min  "
              f"prefill {r['fed'] / n:9.0f} tokens/episode  ({r['generated']} generated, last prompt "
              f"{r['prompt_tokens']} tokens)", flush=True)
    b, bf, s, f = (runs[name] for name in ("batched, kv reuse", "batched, full prefill", "one at a time, kv reuse",
                                           "one at a time, full prefill"))
    reused = sum(s["episode_seconds"][:k])
    same = f["ids"] == [turn[:k] for turn in s["ids"]]
    print(f"\nkv reuse vs full prefill ({args.turns}-turn episodes, the same {k} one at a time): generation time "
          f"{f['seconds'] / reused:.2f}x lower ({f['seconds'] / k:.1f} s vs {reused / k:.1f} s per episode; target >= 3x); "
          f"same ids: {same}")
    print(f"kv reuse vs full prefill ({args.turns}-turn episodes, {args.live} live, batched): generation time "
          f"{bf['seconds'] / b['seconds']:.2f}x lower ({bf['seconds'] / args.live:.1f} s vs "
          f"{b['seconds'] / args.live:.1f} s per episode; target >= 3x); same ids: {bf['ids'] == b['ids']}")
    print(f"batched vs one at a time (kv reuse, {args.live} live): {s['seconds'] / b['seconds']:.2f}x episodes/min "
          "(target >= 2x)")


if __name__ == "__main__":
    main()
