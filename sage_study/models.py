"""The study's tiny models: a tokenizer trained on the env's own text and Llama models sized by config."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sage_gym.formatting import INVALID_REASONS, ReActFormatter


@dataclass
class Arch:
    """A Llama architecture (sizes only: the vocabulary comes from the tokenizer)."""

    hidden_size: int = 256
    intermediate_size: int = 1024
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    max_position_embeddings: int = 4096


GRADED_REPEATS = 64  # copies of each graded answer in the tokenizer's training text (see prompt_texts)


def prompt_texts(graded: bool = False) -> list[str]:
    """The project's own fixed texts that models read: invalid-turn feedback and the judgment prompt (graded: the
    Skip/Weak/Strong prompt too)."""
    from sage_opd.judge import GRADED_TEMPLATE, GRADES, JUDGE_SYSTEM, JUDGE_TEMPLATE

    formatter = ReActFormatter()
    texts = [formatter.invalid_feedback(r) for r in INVALID_REASONS] + [JUDGE_SYSTEM, JUDGE_TEMPLATE, "Yes", "No"]
    # the graded answers are rare words in ALFWorld's text: repeated (as answers are, after the prompt's
    # newline or a space) so that BPE gives each one its own first token and the judge can tell them apart
    return texts + ([GRADED_TEMPLATE] + [f"{s}{g}" for g in GRADES for s in ("", " ", "\n")] * GRADED_REPEATS
                    if graded else [])


def train_tokenizer(texts: Iterable[str], vocab_size: int, graded: bool = False):
    """A byte-level BPE tokenizer with the ChatML template, trained on ``texts`` plus the prompt texts.
    ``</action>`` stays ordinary text (it is the stop string, not a special token)."""
    from sage_models.tiny import build_tokenizer

    def corpus():
        yield from texts
        yield from prompt_texts(graded)

    return build_tokenizer(vocab_size, corpus())


def new_model(tokenizer, arch: Arch, seed: int):
    """A randomly initialised Llama of ``arch`` over ``tokenizer``'s vocabulary."""
    from sage_models.tiny import build_model

    return build_model(tokenizer, "student", seed=seed, **vars(arch))


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
