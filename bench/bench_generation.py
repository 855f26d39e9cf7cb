"""Generation over whole multi-turn episodes: key/value cache reuse and batching, side by side in one run.

Episodes are real ALFWorld unseen games played for ``--turns`` turns by a small random Llama
(built on the spot over the tiny offline tokenizer; its responses are invalid, so every episode
runs to the turn cap and its prompt grows every turn, as a weak model's does). For each setting
the same games are played with the same seeded decoding and the hf backend:

  * reuse / no reuse: each turn starts from the conversation's cached keys (only the feedback is
    prefilled) or prefills the whole history again; prefill tokens and generation seconds per
    episode, and a check that both generate the same ids;
  * batched / one at a time: ``--live`` episodes with one ``generate`` call per turn for all of them,
    or one call per episode (``batch_size=1``); episodes per minute of generation time.

    .venv/bin/python bench/bench_generation.py                  # 8 live episodes, 30 turns, 32 new tokens
    .venv/bin/python bench/bench_generation.py --hidden 256 --layers 6 --live 4

Env steps are played once up front and replayed (the gym's feedback for invalid turns does not
depend on the response text), so the numbers time generation alone.
"""

from __future__ import annotations

import argparse
import time

import torch

from sage_models import HFPolicy
from sage_models.policy import Decoding


def model(hidden: int, layers: int):
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
    """``turns`` turns of every chat; returns generation seconds, prefill tokens and the generated ids."""
    from sage_gym.formatting import ReActFormatter

    feedback = ReActFormatter().invalid_feedback("unparseable")
    embed, fed = policy.model.get_input_embeddings(), [0]
    hook = embed.register_forward_hook(lambda _m, args, _o: fed.__setitem__(0, fed[0] + args[0].numel()))
    chats, ids, seconds, generated = [list(c) for c in chats], [], 0.0, 0
    try:
        for turn in range(turns):
            seeds = [1000 * turn + k for k in range(len(chats))]
            t0 = time.perf_counter()
            if one_at_a_time:
                gens = [policy.generate([c], decoding, stop, seeds=[s])[0] for c, s in zip(chats, seeds)]
            else:
                gens = policy.generate(chats, decoding, stop, seeds=seeds)
            seconds += time.perf_counter() - t0
            generated += sum(len(g.token_ids) for g in gens)
            ids.append([g.token_ids for g in gens])
            chats = [c + [{"role": "assistant", "content": g.text}, {"role": "user", "content": feedback}]
                     for c, g in zip(chats, gens)]
    finally:
        hook.remove()
    return {"seconds": seconds, "fed": fed[0] - generated, "generated": generated, "ids": ids,
            "prompt_tokens": len(gens[0].prompt_ids)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--live", type=int, default=8, help="episodes played at once")
    p.add_argument("--turns", type=int, default=30)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    net, tokenizer = model(args.hidden, args.layers)
    params = sum(q.numel() for q in net.parameters())
    chats, stop = starts(args.live)
    decoding = Decoding(temperature=1.0, max_new_tokens=args.max_new_tokens)
    print(f"{args.live} ALFWorld unseen games x {args.turns} turns, random Llama {params / 1e6:.1f}M params "
          f"(hidden {args.hidden}, {args.layers} layers), {args.max_new_tokens} new tokens, {args.threads} threads")
    play(HFPolicy(model=net, tokenizer=tokenizer), chats, stop, 2, decoding, False)  # warm-up
    runs = {}
    for name, reuse, single in (("batched, kv reuse", True, False), ("batched, no reuse", False, False),
                                ("one at a time, kv reuse", True, True), ("one at a time, no reuse", False, True)):
        policy = HFPolicy(model=net, tokenizer=tokenizer, kv_reuse=reuse)
        runs[name] = r = play(policy, chats, stop, args.turns, decoding, single)
        per_episode = r["seconds"] / args.live
        print(f"{name:<26} {per_episode:8.2f} s/episode  {60 * args.live / r['seconds']:7.2f} episodes/min  "
              f"prefill {r['fed'] / args.live:9.0f} tokens/episode  ({r['generated']} generated, last prompt "
              f"{r['prompt_tokens']} tokens)")
    same = all(runs[a]["ids"] == runs[b]["ids"] for a, b in (("batched, kv reuse", "batched, no reuse"),
                                                             ("one at a time, kv reuse", "one at a time, no reuse")))
    b, n = runs["batched, kv reuse"], runs["batched, no reuse"]
    s = runs["one at a time, kv reuse"]
    print(f"\nkv reuse vs full prefill (batched): generation time {n['seconds'] / b['seconds']:.2f}x lower, "
          f"prefill tokens {n['fed'] / b['fed']:.1f}x fewer; same ids: {same}")
    print(f"batched vs one at a time (kv reuse, {args.live} live): {s['seconds'] / b['seconds']:.2f}x episodes/min")


if __name__ == "__main__":
    main()
