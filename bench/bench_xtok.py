"""Seconds per training micro-batch of the cross-tokenizer path against the same-tokenizer path, side by side.

    .venv/bin/python bench/bench_xtok.py [--episodes 2] [--turns 4] [--repeats 5] [--threads 1]

What a training step does with its rollouts, on the same fixed turns (episodes of several turns,
token in, token out, packed one episode per row as the trainer packs them), student and teacher
being random Llama models over SmolLM2's 49k vocabulary (so that the head matmuls weigh what
they weigh in practice):

- ``same``: make_batch -> HFTeacher.score -> student hidden states -> opd_loss (reverse KL,
  entropy confidence) -> backward: the exact path;
- ``cross/<mode>``: CrossTokenizer.teacher_turns (the teacher's chat template, alignment) ->
  make_batch of the teacher's ids -> HFTeacher.score -> student hidden states -> xtok_loss ->
  backward, for each option. The teacher's tokenizer is SmolLM2's under another chat template,
  so both models cost the same and every response span is one-to-one (a full-vocabulary loss
  at every token, and ULD's sorted matching over nothing);
- ``vocab<N>/<mode>``: the same with a teacher over another vocabulary, a byte-level BPE of
  ``--other-vocab`` tokens trained here on Python's standard library sources: spans of several
  tokens, large sets outside the shared vocabulary (its head is smaller: compare the loss column).

Paths run interleaved, one warm-up round first; each cell is the median over ``--repeats``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections import Counter

OTHER_TEMPLATE = ("{% for message in messages %}<|turn|>{{ message['role'] }}: {{ message['content'] }}<|eot|>\n"
                  "{% endfor %}{% if add_generation_prompt %}<|turn|>assistant: {% endif %}")
WORDS = ("go to take put open close the desk drawer fridge mug apple cabinet heat cool look you see nothing happens "
         "arrive at on in with a countertop microwave sinkbasin shelf").split()


class Turn:
    def __init__(self, messages, text, prompt_ids, token_ids):
        self.messages, self.text, self.prompt_ids, self.token_ids = messages, text, prompt_ids, token_ids


def episodes(tok, n_episodes: int, n_turns: int, seed: int = 0) -> list[Turn]:
    """Student turns of ``n_episodes`` episodes recorded token in, token out (``TokenHistory``)."""
    from sage_models import TokenHistory

    rng, turns = random.Random(seed), []
    for e in range(n_episodes):
        history = TokenHistory(tok)
        messages = [{"role": "system", "content": "You are an agent in a household. " * 8},
                    {"role": "user", "content": f"Your task is to: put a {rng.choice(WORDS)} in {rng.choice(WORDS)}."}]
        for _ in range(n_turns):
            text = (f"Think: {' '.join(rng.choice(WORDS) for _ in range(rng.randint(20, 40)))}.\n"
                    f"<action>{rng.choice(WORDS)} {rng.choice(WORDS)} {rng.randint(1, 9)}</action>")
            prompt = history.prompt_ids(messages)
            ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            history.record(messages, text, prompt + ids)
            turns.append(Turn(list(messages), text, prompt, ids))
            feedback = f"You arrive at {rng.choice(WORDS)} {e}. Nothing happens."
            messages = messages + [{"role": "assistant", "content": text}, {"role": "user", "content": feedback}]
    return turns


def other_vocabulary(size: int):
    """A byte-level BPE of ``size`` tokens (ChatML) trained on Python's standard library sources: another vocabulary."""
    import sysconfig
    from pathlib import Path

    from sage_models.tiny import build_tokenizer

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:300]
    return build_tokenizer(size, (f.read_text(errors="ignore") for f in files))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--episodes", type=int, default=2)
    parser.add_argument("--turns", type=int, default=4, help="turns per episode")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--student-hidden", type=int, default=256)
    parser.add_argument("--teacher-hidden", type=int, default=512)
    parser.add_argument("--other-vocab", type=int, default=16000)
    args = parser.parse_args()

    import torch
    from rich.console import Console
    from rich.table import Table
    from transformers import AutoTokenizer

    from sage_models import smollm2_path
    from sage_models.tiny import build_model
    from sage_opd.losses import opd_loss
    from sage_opd.teacher import HFTeacher, lm_hidden_states, make_batch
    from sage_opd.xtok import CrossTokenizer, span_ids
    from sage_opd.xtok_losses import MODES, AlignedTeacher, xtok_loss

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(smollm2_path())
    other = AutoTokenizer.from_pretrained(smollm2_path())
    other.add_special_tokens({"additional_special_tokens": ["<|turn|>", "<|eot|>"]})
    other.eos_token, other.chat_template = "<|eot|>", OTHER_TEMPLATE
    layers = dict(num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4)
    student = build_model(tok, "student", seed=0, hidden_size=args.student_hidden,
                          intermediate_size=4 * args.student_hidden, **layers).train()
    vocab_name = f"vocab{args.other_vocab // 1000}k"
    teacher_toks = {"same": tok, "cross": other, vocab_name: other_vocabulary(args.other_vocab)}
    teachers = {name: HFTeacher(build_model(t, "teacher", seed=1, hidden_size=args.teacher_hidden,
                                            intermediate_size=4 * args.teacher_hidden, **layers), batch_size=8)
                for name, t in teacher_toks.items()}
    xtoks = {name: CrossTokenizer(tok, t) for name, t in teacher_toks.items() if name != "same"}
    turns = episodes(tok, args.episodes, args.turns)
    vocab = len(tok)
    n_tokens = sum(len(t.token_ids) for t in turns)

    def same() -> dict[str, float]:
        times, start = {}, time.perf_counter()
        batch = make_batch(turns, tok.pad_token_id)
        scores = teachers["same"].score(batch)
        times["teacher"] = time.perf_counter() - start
        hidden, weight = lm_hidden_states(student, batch)
        out = opd_loss(hidden, weight[:vocab], scores, mask=batch.response_mask, target_ids=batch.target_ids)
        out.loss.backward()
        times["loss"] = time.perf_counter() - start - times["teacher"]
        return times

    def cross(name: str, mode: str) -> dict[str, float]:
        times, start, xtok = {}, time.perf_counter(), xtoks[name]
        aligned = xtok.teacher_turns(turns)
        s_span, t_span = span_ids(aligned)
        times["align"] = time.perf_counter() - start
        t_batch = make_batch([a.teacher for a in aligned], xtok.teacher_tok.pad_token_id)
        scores = teachers[name].score(t_batch)
        t_mask = t_batch.response_mask
        teacher = AlignedTeacher(scores.hidden[t_mask], scores.weight[:len(xtok.teacher_tok)],
                                 t_batch.target_ids[t_mask], t_span, xtok.shared)
        times["teacher"] = time.perf_counter() - start - times["align"]
        batch = make_batch(turns, tok.pad_token_id)
        hidden, weight = lm_hidden_states(student, batch)
        mask = batch.response_mask
        out = xtok_loss(hidden[mask], weight[:vocab], batch.target_ids[mask], s_span, teacher, mode=mode)
        out.loss.backward()
        times["loss"] = time.perf_counter() - start - times["align"] - times["teacher"]
        return times

    paths = {"same": same, **{f"{name}/{m}": (lambda name=name, m=m: cross(name, m)) for name in xtoks for m in MODES}}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in paths}
    for r in range(args.repeats + 1):
        for name, fn in paths.items():
            student.zero_grad(set_to_none=True)
            times = fn()
            if r:  # round 0 warms up
                runs[name].append({**times, "total": sum(times.values())})
    med = {name: {k: statistics.median(t[k] for t in rows) for k in rows[0]} for name, rows in runs.items()}
    def one_to_one(xtok) -> float:
        """The share of response tokens in one-to-one spans."""
        alone = 0
        for a in xtok.teacher_turns(turns):
            s_count, t_count = Counter(a.alignment.student_span), Counter(a.alignment.teacher_span)
            alone += sum(s_count[j] == 1 == t_count[j] for j in a.alignment.student_span)
        return alone / n_tokens

    share = {name: one_to_one(x) for name, x in xtoks.items()}
    table = Table(title=f"one micro-batch: {len(turns)} turns, {n_tokens} response tokens, vocab {vocab} (teachers: "
                        f"{', '.join(f'{n} {len(t)}' for n, t in teacher_toks.items())}), "
                        f"student H={args.student_hidden}, teacher H={args.teacher_hidden}, fp32, "
                        f"{args.threads} thread(s); median of {args.repeats}")
    for col in ("path", "1:1 tokens", "align s", "teacher s", "student + loss + backward s", "total s", "vs same"):
        table.add_column(col, justify="right")
    for name, m in med.items():
        table.add_row(name, f"{share.get(name.split('/')[0], 1.0):.2f}", f"{m.get('align', 0.0):.3f}",
                      f"{m['teacher']:.3f}", f"{m['loss']:.3f}", f"{m['total']:.3f}",
                      f"{m['total'] / med['same']['total']:.2f}")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
