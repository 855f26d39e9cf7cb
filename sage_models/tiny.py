"""Tiny real transformers models built offline, for tests, benchmarks and smoke runs.

A byte-level BPE tokenizer is trained with ``tokenizers`` on text the project writes
itself, with a ChatML chat template; a student and a larger teacher (random Llama
weights) share it. Nothing is downloaded.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SIZES = {
    "student": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2),
    "teacher": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
}
_WORDS = (
    "go to take put open close toggle clean heat cool use examine look inventory from in on with the a "
    "desk drawer cabinet countertop fridge microwave sinkbasin shelf bed sofa armchair garbagecan "
    "apple bowl mug cup plate knife pan pot book cd pen pencil alarmclock desklamp lettuce potato tomato "
    "you arrive at see nothing happens your task is to think first then act search answer question "
    "which who what when where is was are water boil temperature thermometer focus on move to kitchen "
    "yes no correct should be corrected response history environment feedback action valid invalid skip weak strong"
).split()


def _corpus(n_lines: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        words = [rng.choice(_WORDS) + (str(rng.randint(1, 9)) if rng.random() < 0.15 else "") for _ in range(rng.randint(4, 18))]
        text = " ".join(words)
        if i % 3 == 0:
            text = f"Think: {text}.\n<action>{' '.join(words[:3])}</action>"
        lines.append(text)
    return lines


def build_tokenizer(vocab_size: int = 512, corpus: Iterable[str] | None = None):
    """A byte-level BPE tokenizer with ChatML special tokens, as a transformers fast tokenizer, trained on
    ``corpus`` (texts; default: a small synthetic corpus of agent-like text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus() if corpus is None else corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None, chat_template=CHATML)


def build_model(tokenizer, size: str = "student", seed: int = 0, **overrides):
    """A randomly initialised Llama causal LM sized ``student`` (~40k params) or ``teacher``; ``overrides``
    set any ``LlamaConfig`` field (e.g. ``hidden_size``, ``num_hidden_layers``)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{"vocab_size": len(tokenizer), "max_position_embeddings": 8192, "tie_word_embeddings": True,
                            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
                            "bos_token_id": None, **SIZES[size], **overrides})
    return LlamaForCausalLM(config).eval()


def build_tiny_models(out_dir: str | Path, vocab_size: int = 512) -> dict[str, Path]:
    """Write ``student`` and ``teacher`` model folders (with the shared tokenizer) under ``out_dir``.

    Reuses folders already built with the same settings, so repeated calls are cheap.
    """
    out_dir = Path(out_dir)
    stamp = {"vocab_size": vocab_size, "sizes": SIZES, "version": 2}  # 2: the graded judge's answer words
    paths = {name: out_dir / name for name in SIZES}
    stamp_file = out_dir / "tiny-models.json"
    if stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp and all((p / "config.json").exists() for p in paths.values()):
        return paths
    tokenizer = build_tokenizer(vocab_size)
    for i, (name, path) in enumerate(paths.items()):
        model = build_model(tokenizer, name, seed=i)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    stamp_file.write_text(json.dumps(stamp))
    return paths
