"""The study's data: episodes played through the evaluation runner with the env's expert labels,
turned into imitation examples (the teacher's and the warm student's SFT data) and judgment
examples (the teacher's judge skill), with labels defined here once.

Labels use privileged information (the hand-coded expert's move from each state) only to build
the teacher; during distillation the judge is the teacher's forward pass alone (SPEC section 4).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sage_opd.judge import GRADED_TEMPLATE, JUDGE_TEMPLATE, JudgeTurn, judgment_messages
from sage_study.sft import ChatExample

NOTHING_HAPPENS = "Nothing happens."
JUDGE_ANSWERS = {True: "Yes", False: "No"}


def panel_ids(env_id: str, **env_kwargs: Any) -> list[str]:
    """The env's episode ids (its fixed panel order)."""
    import sage_gym

    env = sage_gym.make(env_id, **env_kwargs)
    try:
        return sage_gym.describe(env)["episode_ids"]
    finally:
        env.close()


def split_games(ids: Sequence[str], sizes: dict[str, int], seed: int) -> dict[str, list[str]]:
    """Disjoint seeded samples of ``ids``, one per name: ``{"expert": 600, "noisy": 200, ...}``."""
    if sum(sizes.values()) > len(ids):
        raise ValueError(f"asked for {sum(sizes.values())} games in all, but the split has {len(ids)}")
    shuffled = list(ids)
    random.Random(seed).shuffle(shuffled)
    out, start = {}, 0
    for name, n in sizes.items():
        out[name] = shuffled[start:start + n]
        start += n
    return out


def play(policy: str, env_id: str, episode_ids: Sequence[str], out_dir: str | Path, *, seeds: Sequence[int] = (0,),
         workers: int = 2, max_turns: int | None = None, decoding=None, model_opts: dict | None = None,
         progress: bool = True) -> list[dict]:
    """Play ``episode_ids`` once per seed with ``policy`` (a model path or a scripted agent such as ``handcoded``)
    through ``sage_evals.runner.evaluate`` with expert labels on; returns the episode records (resumable)."""
    from sage_evals.runner import check_errors, evaluate

    check_errors(evaluate(policy, env_id, seeds=list(seeds), workers=workers, episode_ids=list(episode_ids),
                          out_dir=out_dir, decoding=decoding, env_kwargs={"max_turns": max_turns, "expert_labels": True},
                          model_opts=model_opts, progress=progress))
    return episodes(out_dir)


def episodes(out_dir: str | Path) -> list[dict]:
    """The finished episode records of a run folder in one fixed order (episode id, seed). Workers append them in
    the order they finish, which varies from run to run; the SFT data built from them must not."""
    from sage_evals.runner import RunFolder

    return sorted(RunFolder(out_dir).records(), key=lambda r: (str(r["episode_id"]), int(r["seed"])))


def _turns(record: dict) -> Iterable[tuple[int, dict, list[dict]]]:
    """(index of the assistant message, step, the messages before it) for each turn of a finished episode."""
    messages = record["messages"]
    for t, step in enumerate(record["steps"]):
        k = 2 + 2 * t
        if k < len(messages) and messages[k]["role"] == "assistant":
            yield k, step, messages[:k]


def agrees(step: dict) -> bool:
    """Whether the turn played the expert's own move from that state."""
    return bool(step.get("expert")) and step["action_valid"] and step["action"] == step["expert"]["action"]


def imitation_examples(records: Iterable[dict]) -> list[ChatExample]:
    """Whole episodes, trained on the turns that agree with the expert (all of them for the expert itself;
    for noisy play, the recoveries but not the injected mistakes)."""
    out = []
    for record in records:
        if record.get("error") or not record["messages"]:
            continue
        train = [k for k, step, _ in _turns(record) if agrees(step)]
        if train:
            out.append(ChatExample(record["messages"], train))
    return out


def correction_examples(records: Iterable[dict], per_episode: int) -> list[ChatExample]:
    """DAgger data: in another agent's episodes, each state where its move (or invalid turn) was not the expert's,
    answered with the expert's move from that state (``per_episode`` at most, the first ones). A teacher trained only
    on expert play copies the student's own mistakes in the states the student reaches (measured: after a repeated
    "go to X", the teacher's KL to the repeat was 0.3 per turn), so OPD cannot correct them."""
    from sage_gym.formatting import ReActFormatter

    fmt, out = ReActFormatter(), []
    for record in records:
        if record.get("error"):
            continue
        fixes = [(step, history) for _, step, history in _turns(record)
                 if step.get("expert") and not agrees(step)][:per_episode]
        for step, history in fixes:
            answer = fmt.format_action(step["expert"]["action"], step["expert"]["thought"])
            out.append(ChatExample(history + [{"role": "assistant", "content": answer}], [len(history)]))
    return out


def with_swaps(records: Iterable[dict], swaps: int, seed: int) -> list[ChatExample]:
    """Imitation examples of ``records`` plus ``swaps`` object-renamed copies of each (``swap_object``)."""
    rng, out = random.Random(seed), []
    for record in records:
        for example in imitation_examples([record]):
            out.append(example)
            out += [s for s in (swap_object(example, record["episode_id"], rng) for _ in range(swaps)) if s]
    return out


def needs_correction(step: dict) -> bool:
    """The judge's label for a valid turn: Yes when it did not play the expert's move from that state, or when
    the game answered that nothing happened."""
    return step["action"] != step["expert"]["action"] or step["observation"].strip().startswith(NOTHING_HAPPENS)


def grade(step: dict) -> str:
    """The graded judge's label for a valid turn: Strong when the game answered that nothing happened, Weak when
    the move did something but was not the expert's, Skip for the expert's own move (Skip iff not needs_correction)."""
    if step["observation"].strip().startswith(NOTHING_HAPPENS):
        return "Strong"
    return "Weak" if step["action"] != step["expert"]["action"] else "Skip"


def judge_turns(records: Iterable[dict], graded: bool = False) -> list[tuple[JudgeTurn, Any]]:
    """Every valid, expert-labelled turn as the judge sees it, with its label (True: should be corrected; graded:
    ``grade``). Invalid turns are short-circuited by the judge and never reach it."""
    out = []
    for record in records:
        if record.get("error"):
            continue
        for _, step, history in _turns(record):
            if step["action_valid"] and step.get("expert"):
                turn = JudgeTurn(record.get("task", ""), history, step["response"], step["observation"])
                out.append((turn, grade(step) if graded else needs_correction(step)))
    return out


def judge_examples(labelled: Iterable[tuple[JudgeTurn, Any]], history_messages: int,
                   graded: bool = False) -> list[ChatExample]:
    """Judgment prompts answered Yes/No (graded: Skip/Weak/Strong), in the exact chat the trainer's judge renders."""
    template = GRADED_TEMPLATE if graded else JUDGE_TEMPLATE
    return [ChatExample(judgment_messages(turn, history_messages, template)
                        + [{"role": "assistant", "content": y if graded else JUDGE_ANSWERS[y]}])
            for turn, y in labelled]


def balance(labelled: list[tuple[JudgeTurn, Any]], seed: int, limit: int | None = None) -> list[tuple[JudgeTurn, Any]]:
    """At most ``limit`` turns, as many to correct (Yes; graded: Weak or Strong) as to leave alone (No; graded:
    Skip), sampled and shuffled with ``seed``: the majority side is downsampled, and a limit halves both sides."""
    yes = [x for x in labelled if x[1] not in (False, "Skip")]
    no = [x for x in labelled if x[1] in (False, "Skip")]
    rng = random.Random(seed)
    n = min(len(yes), len(no), len(labelled) if limit is None else limit // 2)
    kept = rng.sample(yes, n) + rng.sample(no, n)
    rng.shuffle(kept)
    return kept


def corpus(records: Iterable[dict]) -> Iterable[str]:
    """Every message text of the episodes (the tokenizer's training text)."""
    for record in records:
        for message in record["messages"]:
            yield message["content"]


def object_names() -> list[str]:
    """ALFWorld's portable object classes (lower case, one word), the names ``swap_object`` draws from."""
    import alfworld.gen.constants as constants

    receptacles = {r.lower() for r in constants.RECEPTACLES}
    return sorted({o.lower() for o in constants.OBJECTS} - receptacles)


def swap_object(example: ChatExample, episode_id: str, rng: random.Random) -> ChatExample | None:
    """The episode with its target object's name replaced everywhere by another object class that it never
    mentions: the same play, but the object can only be known by reading the task, so a model trained on
    such copies learns to copy it (tiny models otherwise fall back on which objects are likely)."""
    import re

    from sage_gym.envs.alfworld_expert import task_params

    target = task_params(episode_id)["object_target"]
    text = " ".join(m["content"] for m in example.messages)
    options = [o for o in object_names() if not re.search(rf"\b{o}\b", text)]
    if not re.search(rf"\b{target}\b", text) or not options:
        return None
    other = rng.choice(options)
    messages = [{**m, "content": re.sub(rf"\b{target}\b", other, m["content"])} for m in example.messages]
    return ChatExample(messages, example.train_turns)
