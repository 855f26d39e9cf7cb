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


def transplant(tokenizer, source: str, layers: int):
    """A Llama made of the first ``layers`` blocks (and the final norm) of the pretrained model in folder ``source``,
    over ``tokenizer``'s vocabulary: each token's embedding starts as the mean of the source's input embeddings of
    the token's text as the source's tokenizer splits it. The output head is separate and starts at zero: the
    truncated stack's last hidden states are not the source's output space, and a tied head read them as logits of
    20-30 nats of loss whose first gradients broke the pretrained blocks; a zero head starts at the uniform
    distribution.

    Why: Llamas trained from scratch on a few million tokens of ALFWorld learnt the expert's phrasing but not to
    read their context (four teachers, docs/study.md); pretrained blocks bring attention that already copies and
    looks things up, and the study's small vocabulary keeps the model small."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    if src.config.model_type != "llama":
        raise ValueError(f"teacher.init needs a Llama model folder; {source} holds a {src.config.model_type!r} model")
    if not 1 <= layers <= src.config.num_hidden_layers:
        raise ValueError(f"init_layers={layers}: {source} has {src.config.num_hidden_layers} blocks; "
                         f"choose 1-{src.config.num_hidden_layers}")
    src_tok = AutoTokenizer.from_pretrained(source)
    fields = {k: v for k, v in src.config.to_dict().items() if k in LlamaConfig().to_dict()}
    config = LlamaConfig(**{**fields, "num_hidden_layers": layers, "vocab_size": len(tokenizer),
                            "tie_word_embeddings": False, "eos_token_id": tokenizer.eos_token_id,
                            "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None})
    model = LlamaForCausalLM(config)
    kept = {k: v for k, v in src.state_dict().items()
            if not k.startswith(("model.embed_tokens.", "lm_head.", "model.layers."))
            or (k.startswith("model.layers.") and int(k.split(".")[2]) < layers)}
    missing, unexpected = model.load_state_dict(kept, strict=False)
    if unexpected or set(missing) - {"model.embed_tokens.weight", "lm_head.weight"}:
        raise ValueError(f"{source}'s weights do not fit a Llama: missing {missing}, unexpected {unexpected}")
    table = src.get_input_embeddings().weight.detach()
    with torch.no_grad():
        for token in range(len(tokenizer)):
            ids = src_tok(tokenizer.decode([token]), add_special_tokens=False)["input_ids"]
            model.get_input_embeddings().weight[token] = table[ids].mean(0) if ids else table.mean(0)
        model.get_output_embeddings().weight.zero_()
    return model.eval()


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
