"""Cross-tokenizer OPD: the alignment of two real tokenisations, the losses on aligned spans, and a short training run.

Tokenizers: the tiny student's byte-level BPE (512 tokens, ChatML), another trained on the same text with 400
tokens, its own chat template and its own end-of-turn token, and SmolLM2's real 49k vocabulary."""

from __future__ import annotations

import json
import random
from itertools import accumulate

import pytest
import torch

from sage_models import TokenHistory, chat_ids
from sage_models.tiny import build_model, build_tokenizer
from sage_opd.losses import DenseTeacher, opd_loss
from sage_opd.teacher import lm_hidden_states, make_batch
from sage_opd.xtok import CrossTokenizer, TokenText, UnalignableTokenizerError, align_spans, char_ends, span_ids
from sage_opd.xtok_losses import MODES, AlignedTeacher, shared_vocab_kl, xtok_loss

OTHER_TEMPLATE = ("{% for message in messages %}<|turn|>{{ message['role'] }}: {{ message['content'] }}<|eot|>\n"
                  "{% endfor %}{% if add_generation_prompt %}<|turn|>assistant: {% endif %}")
TEXTS = ["Think: go to the desk 1.\n<action>take mug 2 from desk 1</action>", "  leading and trailing spaces  ",
         "tabs\tand\nnew\n\nlines\r\n", "üñí 東京 ¿? naïve café",
         "emoji 🙂 family 👩‍👩‍👧 flag 🇫🇷",
         "combining e\u0301 and zero\u200bwidth joiner", "שלום עולם مرحبا", "x", " ", "\n\n\n",
         "numbers 1234567890 3.14159 -7", "a literal <|im_start|> in the text", "ÿ\u00a0\u3000\u2028 odd spaces"]
WORDS = ("go to take put open close the desk drawer fridge mug apple cabinet heat cool look you see nothing happens "
         "arrive at on in with a").split()


def other_tokenizer():
    """A byte-level BPE trained on the same text as the student's, with 400 tokens, another chat template and
    another end-of-turn token."""
    tok = build_tokenizer(vocab_size=400)
    tok.add_special_tokens({"additional_special_tokens": ["<|turn|>", "<|eot|>"]})
    tok.eos_token = "<|eot|>"
    tok.chat_template = OTHER_TEMPLATE
    return tok


def byte_fallback_tokenizer():
    """A SentencePiece-style BPE (``▁`` for spaces, ``<0xNN>`` byte-fallback pieces in its vocabulary, as Gemma's),
    trained here on the tiny models' text."""
    import json as json_

    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    from sage_models.tiny import CHATML, SPECIAL, _corpus

    trained = Tokenizer(models.BPE())
    trained.normalizer = normalizers.Replace(" ", "\u2581")
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    trained.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=700, special_tokens=SPECIAL + byte_pieces,
                                                               show_progress=False))
    model = json_.loads(trained.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab=model["vocab"], merges=merges, byte_fallback=True))  # byte pieces: vocabulary
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"], chat_template=CHATML)


@pytest.fixture(scope="module")
def student_tok():
    return build_tokenizer(512)


@pytest.fixture(scope="module")
def teacher_toks():
    from transformers import AutoTokenizer

    from sage_models import smollm2_path

    return {"other": other_tokenizer(), "smollm2": AutoTokenizer.from_pretrained(smollm2_path()),
            "byte_fallback": byte_fallback_tokenizer()}


def student_id_variants(tok, text: str, rng: random.Random) -> dict[str, list[int]]:
    """The canonical encoding, one token per byte (characters split across tokens) and random sampled-like ids
    (any bytes, invalid UTF-8 included), each with and without the end-of-turn token."""
    table = TokenText(tok).table
    byte_token = {piece: i for i, piece in enumerate(table) if len(piece) == 1}
    canonical = tok(text, add_special_tokens=False)["input_ids"]
    singles = [byte_token[bytes([b])] for b in text.encode()]
    specials = set(tok.all_special_ids) | set(tok.added_tokens_decoder)
    sampled = [rng.choice([i for i in range(len(tok)) if i not in specials]) for _ in range(rng.randint(1, 24))]
    return {"canonical": canonical, "bytes": singles, "sampled": sampled,
            "canonical+eos": canonical + [tok.eos_token_id]}


def teacher_spells(xtok: CrossTokenizer, ch: str) -> bool:
    """Whether the teacher's tokenizer encodes ``ch`` (SmolLM2's has no token for 21 byte values and drops them)."""
    ids = xtok.teacher_tok(ch, add_special_tokens=False)["input_ids"]
    return b"".join(xtok.teacher.pieces(ids)).decode("utf-8", "replace") == ch


def check_alignment(xtok: CrossTokenizer, ids: list[int], valid_utf8: bool) -> None:
    al = xtok.align(ids)
    ended = ids[-1] == xtok.student_tok.eos_token_id
    s_pieces, t_pieces = xtok.student.pieces(ids), xtok.teacher.pieces(al.teacher_ids)
    assert len(al.student_span) == len(ids) and len(al.teacher_span) == len(al.teacher_ids)
    n = max(al.student_span) + 1
    for spans in (al.student_span, al.teacher_span):  # in order, no gaps, every span on both sides
        assert spans == sorted(spans) and set(spans) == set(range(n))
    same_bytes = valid_utf8 and all(teacher_spells(xtok, ch) for ch in al.text)
    spelled = []
    for j in range(n - ended):
        s = b"".join(p for p, k in zip(s_pieces, al.student_span) if k == j)
        t = b"".join(p for p, k in zip(t_pieces, al.teacher_span) if k == j)
        assert s != b""
        if same_bytes:  # the same bytes on both sides, and minimal: no boundary of both sides inside the span
            assert s == t
            inner_s = set(accumulate(len(p) for p, k in zip(s_pieces, al.student_span) if k == j))
            inner_t = set(accumulate(len(p) for p, k in zip(t_pieces, al.teacher_span) if k == j))
            assert inner_s & inner_t == {len(s)}
        else:  # the same characters, but those the teacher cannot encode
            s, t = s.decode("utf-8", "replace"), t.decode("utf-8", "replace")
            assert t == "".join(ch for ch in s if teacher_spells(xtok, ch))
        spelled.append(s)
    if same_bytes:
        spelled = [b"".join(spelled).decode("utf-8")]
    assert "".join(spelled) == al.text
    if valid_utf8:
        assert al.text == b"".join(s_pieces[:len(ids) - ended]).decode("utf-8")
    if ended:  # the student's end of turn is the teacher's eos, a span of its own
        assert al.student_span.count(n - 1) == al.teacher_span.count(n - 1) == 1
        assert al.teacher_ids[-1] == xtok.teacher_tok.eos_token_id


@pytest.mark.parametrize("teacher", ["other", "smollm2", "byte_fallback"])
def test_alignment_maps_every_student_token(student_tok, teacher_toks, teacher):
    xtok = CrossTokenizer(student_tok, teacher_toks[teacher])
    if teacher == "byte_fallback":  # a character outside its vocabulary is spelled by its byte pieces
        ids = xtok.teacher_tok("東", add_special_tokens=False)["input_ids"]
        assert xtok.teacher.pieces(ids) == [b"\xe6", b"\x9d", b"\xb1"]
    rng = random.Random(0)
    for text in TEXTS:
        for kind, ids in student_id_variants(student_tok, text, rng).items():
            check_alignment(xtok, ids, valid_utf8=kind != "sampled")
    for _ in range(200):  # sampled-like responses: arbitrary ids, partial and invalid UTF-8 included
        ids = student_id_variants(student_tok, "", rng)["sampled"]
        check_alignment(xtok, ids, valid_utf8=False)


def test_identical_tokenizers_align_one_to_one(student_tok):
    xtok = CrossTokenizer(student_tok, student_tok)
    for text in TEXTS:
        ids = student_tok(text, add_special_tokens=False)["input_ids"] + [student_tok.eos_token_id]
        al = xtok.align(ids)
        assert al.teacher_ids == ids and al.student_span == al.teacher_span == list(range(len(ids)))
    assert len(xtok.shared.student_ids) == len(student_tok)
    assert torch.equal(xtok.shared.student_ids.sort().values, xtok.shared.teacher_ids.sort().values)


def test_char_ends_and_align_spans_on_a_worked_example():
    # "ab", half of 東, its rest + "c", an invalid byte
    text, ends = char_ends([b"ab", b"\xe6", b"\x9d\xb1c", b"\xff"])
    assert text == "ab東c\ufffd" and ends == [2, None, 4, 5]
    assert align_spans([2, None, 4, 5], [1, 4, 5]) == ([0, 0, 0, 1], [0, 0, 1])
    assert align_spans([2, None, 4, 5], [1, 3, 5]) == ([0, 0, 0, 0], [0, 0, 0])
    assert align_spans([1, 2, 3], [3]) == ([0, 0, 0], [0])
    with pytest.raises(ValueError, match="same text"):
        align_spans([1, 2], [1, 3])


def test_an_unspellable_tokenizer_is_refused(student_tok):
    """A tokenizer that lower-cases its input cannot be aligned (its tokens spell another text)."""
    from tokenizers import normalizers

    lower = build_tokenizer(300)
    lower.backend_tokenizer.normalizer = normalizers.Lowercase()
    with pytest.raises(UnalignableTokenizerError, match="cannot spell the tokens"):
        CrossTokenizer(student_tok, lower)


def test_teacher_turns_use_the_teachers_chat_template(student_tok, teacher_toks):
    teacher_tok = teacher_toks["other"]
    xtok = CrossTokenizer(student_tok, teacher_tok)
    turns = episode(student_tok, ["go to desk 1", "take mug 2 from desk 1"])
    aligned = xtok.teacher_turns(turns)
    first = teacher_tok.decode(aligned[0].teacher.prompt_ids)
    assert first.startswith("<|turn|>system: rules<|eot|>") and first.endswith("<|turn|>assistant: ")
    second = aligned[1].teacher
    head = aligned[0].teacher.prompt_ids + aligned[0].teacher.token_ids
    assert second.prompt_ids[:len(head)] == head  # the episode continues: the teacher scores it as one row
    assert teacher_tok.decode(second.prompt_ids).endswith("<|turn|>user: You see a desk 1.<|eot|>\n<|turn|>assistant: ")
    assert len(make_batch([a.teacher for a in aligned], 0).rows) == 1


# ---- losses ---------------------------------------------------------------------------------------------------------
class Turn:
    def __init__(self, messages, text, prompt_ids, token_ids):
        self.messages, self.text, self.prompt_ids, self.token_ids = messages, text, prompt_ids, token_ids


def episode(tok, responses: list[str], task: str = "put a mug in the fridge") -> list[Turn]:
    """Turns of one episode as the student's backend records them (token in, token out through TokenHistory)."""
    history = TokenHistory(tok)
    messages = [{"role": "system", "content": "rules"}, {"role": "user", "content": f"Your task is to: {task}."}]
    turns = []
    for text in responses:
        prompt = history.prompt_ids(messages)
        ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        history.record(messages, text, prompt + ids)
        turns.append(Turn(list(messages), text, prompt, ids))
        messages = messages + [{"role": "assistant", "content": text}, {"role": "user", "content": "You see a desk 1."}]
    return turns


def responses(rng: random.Random, n: int) -> list[str]:
    return [f"Think: {' '.join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))}.\n"
            f"<action>{rng.choice(WORDS)} {rng.choice(WORDS)} {rng.randint(1, 9)}</action>" for _ in range(n)]


def states(model, turns, pad: int):
    """Hidden states at the positions predicting each response token [N, H], the head weight, the tokens [N]."""
    batch = make_batch(turns, pad)
    hidden, weight = lm_hidden_states(model, batch)
    mask = batch.response_mask
    return hidden[mask], weight, batch.target_ids[mask]


@pytest.fixture(scope="module")
def shared_models(tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoTokenizer.from_pretrained(tiny_models["student"]),
            AutoModelForCausalLM.from_pretrained(tiny_models["student"]),
            AutoModelForCausalLM.from_pretrained(tiny_models["teacher"]))


@pytest.mark.parametrize("mode,token_loss", [("sequence", "reverse_kl"), ("shared_vocab", "reverse_kl"),
                                             ("shared_vocab", "forward_kl"), ("shared_vocab", "jsd"),
                                             ("shared_vocab", "sampled"), ("uld", "reverse_kl"), ("uld", "jsd")])
def test_with_one_tokenizer_every_option_is_the_exact_loss(shared_models, mode, token_loss):
    tok, student, teacher = shared_models
    rng = random.Random(1)
    turns = episode(tok, responses(rng, 3)) + episode(tok, responses(rng, 2), task="heat an apple")
    xtok = CrossTokenizer(tok, tok)
    aligned = xtok.teacher_turns(turns)
    assert [(a.teacher.prompt_ids, a.teacher.token_ids) for a in aligned] == \
        [(t.prompt_ids, t.token_ids) for t in turns]
    s_span, t_span = span_ids(aligned)
    with torch.no_grad():
        s_h, s_w, y = states(student, turns, tok.pad_token_id)
        t_h, t_w, z = states(teacher, [a.teacher for a in aligned], tok.pad_token_id)
    intervention = torch.cat([torch.full((len(t.token_ids),), i) for t, i in zip(turns, [1.0, 0.0, 0.3, 1.0, 0.7])])
    kwargs = dict(intervention=intervention, confidence="entropy", normalization="preserve", beta=0.3)
    leaves = [s_h.clone().requires_grad_(), s_w.detach().clone().requires_grad_()]
    exact = opd_loss(*leaves, DenseTeacher(t_h, t_w), target_ids=y, chunk_size=7,
                     token_loss="sampled" if mode == "sequence" else token_loss, **kwargs)
    exact.loss.backward()
    cross = [s_h.clone().requires_grad_(), s_w.detach().clone().requires_grad_()]
    got = xtok_loss(*cross, y, s_span, AlignedTeacher(t_h, t_w, z, t_span, xtok.shared), mode=mode,
                    token_loss=token_loss, chunk_size=5, **kwargs)
    got.loss.backward()
    assert got.loss.item() == pytest.approx(exact.loss.item(), rel=1e-5, abs=1e-6)
    for field in ("num_tokens", "weight_sum", "token_loss_mean", "confidence_mean", "intervention_mean"):
        assert getattr(got, field) == pytest.approx(getattr(exact, field), rel=1e-5, abs=1e-6), field
    for a, b in zip(cross, leaves):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    assert leaves[0].grad.abs().sum() > 0


def naive_token_values(s_logits, t_logits, y, z, s_span, t_span, shared_pairs, mode, top_k=5):
    """Per student token values of each option from full logits, written out span by span (the definitions)."""
    logp, logq = s_logits.log_softmax(-1), t_logits.log_softmax(-1)
    out = torch.zeros(len(y))
    for j in sorted(set(s_span.tolist())):
        sk = (s_span == j).nonzero().flatten().tolist()
        tk = (t_span == j).nonzero().flatten().tolist()
        a = sum(logp[k, y[k]] for k in sk) - sum(logq[m, z[m]] for m in tk)
        if mode == "sequence" or len(sk) != 1 or len(tk) != 1:
            out[sk] = a / len(sk)
            continue
        k, m = sk[0], tk[0]
        ps, qs = [i for i, _ in shared_pairs], [i for _, i in shared_pairs]
        p = logp[k, ps].softmax(-1)
        q = logq[m, qs].softmax(-1)
        value = (p * (p.log() - q.log())).sum()
        if mode == "uld":
            p_rest = [logp[k, i].exp() for i in range(logp.shape[1]) if i not in set(ps)]
            q_rest = [logq[m, i].exp() for i in range(logq.shape[1]) if i not in set(qs)]
            p_top = sorted(p_rest, reverse=True)[:top_k] + [0.0] * top_k
            q_top = sorted(q_rest, reverse=True)[:top_k] + [0.0] * top_k
            value = value + sum(abs(a - b) for a, b in zip(p_top[:top_k], q_top[:top_k]))
        out[k] = value
    return out


@pytest.mark.parametrize("mode", MODES)
def test_options_across_tokenizers_match_their_definitions(student_tok, teacher_toks, mode):
    teacher_tok = teacher_toks["other"]
    student = build_model(student_tok, "student", seed=3)
    teacher = build_model(teacher_tok, "teacher", seed=4)
    rng = random.Random(2)
    turns = episode(student_tok, responses(rng, 2) + ["a literal üñí 東京 and emoji 🙂"])
    xtok = CrossTokenizer(student_tok, teacher_tok)
    aligned = xtok.teacher_turns(turns)
    s_span, t_span = span_ids(aligned)
    one_to_one = sum(s_span.tolist().count(j) == 1 == t_span.tolist().count(j) for j in set(s_span.tolist()))
    assert 0 < one_to_one < len(set(s_span.tolist()))  # both kinds of span occur
    with torch.no_grad():
        s_h, s_w, y = states(student, turns, student_tok.pad_token_id)
        t_h, t_w, z = states(teacher, [a.teacher for a in aligned], teacher_tok.pad_token_id)
    # shared pairs found independently: byte-level token strings are equal iff their bytes are (plus the two eos)
    t_vocab = teacher_tok.get_vocab()
    pairs = [(student_tok.eos_token_id, teacher_tok.eos_token_id)] + sorted(
        (i, t_vocab[s]) for s, i in student_tok.get_vocab().items()
        if s in t_vocab and i != student_tok.eos_token_id and t_vocab[s] != teacher_tok.eos_token_id)
    assert sorted(zip(xtok.shared.student_ids.tolist(), xtok.shared.teacher_ids.tolist())) == sorted(pairs)
    s_logits = (s_h @ s_w.T).detach().requires_grad_()
    want = naive_token_values(s_logits, t_h @ t_w.T, y, z, s_span, t_span, pairs, mode)
    leaf = s_h.clone().requires_grad_()
    got = xtok_loss(leaf, s_w, y, s_span, AlignedTeacher(t_h, t_w, z, t_span, xtok.shared), mode=mode,
                    confidence="none", normalization="none", top_k=5, chunk_size=4)
    assert got.loss.item() == pytest.approx(want.mean().item(), rel=1e-4)
    got.loss.backward()
    # the gradient: of the distribution loss on one-to-one spans, of sg(A_j) log p(y_k) elsewhere (A_j = value * |S_j|)
    logp_y = s_logits.log_softmax(-1).gather(1, y[:, None]).squeeze(1)
    size = torch.tensor([float((s_span == s_span[k]).sum()) for k in range(len(y))])
    sampled = torch.tensor([mode == "sequence" or not is_one_to_one(k, s_span, t_span) for k in range(len(y))])
    surrogate = torch.where(sampled, (want * size).detach() * logp_y, want)
    (surrogate.sum() / len(y)).backward()
    assert torch.allclose(leaf.grad, s_logits.grad @ s_w, rtol=1e-3, atol=1e-6)


def is_one_to_one(k: int, s_span: torch.Tensor, t_span: torch.Tensor) -> bool:
    j = s_span[k]
    return int((s_span == j).sum()) == 1 == int((t_span == j).sum())


def test_bad_options_are_refused(student_tok):
    h, w, y = torch.zeros(2, 4), torch.zeros(10, 4), torch.zeros(2, dtype=torch.long)
    teacher = AlignedTeacher(torch.zeros(2, 4), torch.zeros(10, 4), y, torch.arange(2))
    with pytest.raises(ValueError, match="accepted: sequence, shared_vocab, uld"):
        xtok_loss(h, w, y, torch.arange(2), teacher, mode="gold")
    with pytest.raises(ValueError, match="needs the shared vocabulary"):
        xtok_loss(h, w, y, torch.arange(2), teacher, mode="uld")


# ---- a short run ----------------------------------------------------------------------------------------------------
def lm_teacher(tok, texts: list[str], steps: int = 40):
    """A tiny teacher over ``tok`` trained here on chats answering with ``texts``: a peaked, informative teacher."""
    model = build_model(tok, "teacher", seed=5).train()
    rows = [chat_ids(tok, [{"role": "user", "content": "Your task is to: put a mug in the fridge."},
                           {"role": "assistant", "content": text}], add_generation_prompt=False) for text in texts]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    labels = torch.where(torch.arange(width)[None] < torch.tensor([len(r) for r in rows])[:, None], ids, -100)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        optim.zero_grad()
        loss.backward()
        optim.step()
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def trained_teacher(teacher_toks):
    return lm_teacher(teacher_toks["other"], responses(random.Random(8), 32))


@pytest.mark.parametrize("mode", MODES)
def test_a_short_run_lowers_the_cross_tokenizer_divergence_on_held_out_turns(student_tok, teacher_toks,
                                                                             trained_teacher, mode):
    teacher_tok, teacher = teacher_toks["other"], trained_teacher
    rng = random.Random(7)
    student = build_model(student_tok, "student", seed=6).train()
    xtok = CrossTokenizer(student_tok, teacher_tok)
    train = episode(student_tok, responses(rng, 6)) + episode(student_tok, responses(rng, 6), task="cool a pan")
    held_out = episode(student_tok, responses(rng, 6), task="look at a book")

    def prepared(turns):
        aligned = xtok.teacher_turns(turns)
        s_span, t_span = span_ids(aligned)
        with torch.no_grad():
            t_h, t_w, z = states(teacher, [a.teacher for a in aligned], teacher_tok.pad_token_id)
        return s_span, AlignedTeacher(t_h, t_w, z, t_span, xtok.shared)

    def divergence(model) -> float:
        with torch.no_grad():
            s_h, s_w, _ = states(model, held_out, student_tok.pad_token_id)
        total, count = shared_vocab_kl(s_h, s_w, *prepared(held_out))
        assert count > 0.5 * s_h.shape[0]  # most tokens sit in one-to-one spans
        return total / count

    before = divergence(student)
    s_span, aligned_teacher = prepared(train)
    optim = torch.optim.AdamW(student.parameters(), lr=1e-2)
    for _ in range(25):
        s_h, s_w, y = states(student, train, student_tok.pad_token_id)
        out = xtok_loss(s_h, s_w, y, s_span, aligned_teacher, mode=mode)
        optim.zero_grad()
        out.loss.backward()
        optim.step()
    after = divergence(student)
    assert after < 0.7 * before, (before, after)



# ---- the trainer ----------------------------------------------------------------------------------------------------
def rollout_file(tok, path, seed: int, n_episodes: int = 2):
    """A fixed rollout batch of valid student turns (token in, token out), saved as the trainer reads it."""
    from sage_opd.records import EpisodeRecord, RolloutBatch, TurnRecord

    rng, episodes = random.Random(seed), []
    for e in range(n_episodes):
        turns = episode(tok, responses(rng, 3), task=f"put a {WORDS[e]} in the fridge")
        episodes.append(EpisodeRecord(f"game-{e}", "task", "pick_and_place_simple", turns=[
            TurnRecord(episode=e, turn=k, task=f"put a {WORDS[e]} in the fridge", messages=t.messages,
                       prompt_ids=t.prompt_ids, token_ids=t.token_ids, text=t.text, action_valid=True,
                       invalid_reason=None, feedback="You see a desk 1.") for k, t in enumerate(turns)]))
    RolloutBatch(episodes).save(path)
    return path


@pytest.fixture(scope="module")
def cross_teacher(tmp_path_factory, teacher_toks, trained_teacher):
    """The trained teacher over the 400-token tokenizer (another chat template, another eos), as a model folder."""
    folder = tmp_path_factory.mktemp("cross-teacher")
    trained_teacher.save_pretrained(folder)
    teacher_toks["other"].save_pretrained(folder)
    return folder


def trainer_config(tiny_models, teacher, out, train_file, *extra):
    from sage_opd.config import load_config

    return load_config(None, [f"student.path={tiny_models['student']}", f"teacher.path={teacher}", f"log.out_dir={out}",
                              "log.tensorboard=false", "log.save_every=0", f"rollout.from_file={train_file}",
                              "rollout.episodes_per_step=2", "eval.every=0", "optim.lr=2e-2", "optim.steps=10", *extra])


def test_the_trainer_refuses_another_tokenizer_unless_asked(tiny_models, cross_teacher, tmp_path, student_tok, capsys):
    from sage_opd.config import ConfigError
    from sage_opd.teacher import TokenizerMismatchError
    from sage_opd.trainer import Trainer

    train = rollout_file(student_tok, tmp_path / "train.json", seed=0)
    with pytest.raises(TokenizerMismatchError, match="share a tokenizer.*loss.cross_tokenizer=sequence, shared_vocab"):
        Trainer(trainer_config(tiny_models, cross_teacher, tmp_path / "a", train))
    with pytest.raises(ConfigError, match="guided_opd trains on teacher-written turns"):
        Trainer(trainer_config(tiny_models, cross_teacher, tmp_path / "b", train, "algorithm=guided_opd",
                               "loss.cross_tokenizer=sequence"))
    trainer = Trainer(trainer_config(tiny_models, tiny_models["teacher"], tmp_path / "c", train,
                                     "loss.cross_tokenizer=uld"))
    assert trainer.xtok is None
    assert "teacher path: exact (teacher and student share a tokenizer)" in capsys.readouterr().out
    trainer.close()


@pytest.mark.parametrize("algorithm,mode,judge", [("opd", "sequence", "hard"), ("sage_opd", "shared_vocab", "graded"),
                                                  ("sage_opd", "uld", "soft")])
def test_the_trainer_distils_across_tokenizers(tiny_models, cross_teacher, tmp_path, student_tok, capsys,
                                               algorithm, mode, judge):
    from sage_opd.records import RolloutBatch
    from sage_opd.trainer import Trainer

    train = rollout_file(student_tok, tmp_path / "train.json", seed=0)
    held_out = RolloutBatch.load(rollout_file(student_tok, tmp_path / "held_out.json", seed=1)).turns
    trainer = Trainer(trainer_config(tiny_models, cross_teacher, tmp_path / "run", train, f"algorithm={algorithm}",
                                     f"loss.cross_tokenizer={mode}", f"loss.judge_mode={judge}",
                                     "log.judge_turns=true"))
    assert f"teacher path: cross-tokenizer (the teacher's tokenizer differs from the student's), " \
           f"loss.cross_tokenizer={mode}" in capsys.readouterr().out
    before = trainer.token_kl(held_out)
    history = trainer.train()
    after = trainer.token_kl(held_out)
    assert after < 0.8 * before, (before, after)
    assert history[-1]["kl"] < history[0]["kl"] and all(m["response_tokens"] > 0 for m in history)
    if algorithm == "sage_opd":  # the judge read every turn with the teacher's own tokenizer and chat template
        assert trainer.judge.tokenizer.chat_template == OTHER_TEMPLATE
        assert all(m["judge_calls"] == 6 for m in history)
        answers = ("Skip", "Weak", "Strong") if judge == "graded" else ("Yes", "No")
        rows = [json.loads(line) for line in (tmp_path / "run" / "judge_turns.jsonl").read_text().splitlines()]
        assert len(rows) == 6 * 10 and all(tuple(r["answers"]) == answers for r in rows)
        yes = [1 - r["answers"]["Skip"] if judge == "graded" else r["answers"]["Yes"] for r in rows]
        assert [r["p_yes"] for r in rows] == pytest.approx(yes)


def test_the_phases_across_tokenizers(tiny_models, cross_teacher, tmp_path, student_tok):
    """build takes the cross-tokenizer path and gives the judge the teacher's tokenizer; the loss phase (two
    micro-batches, a skipped turn, an imitated expert turn) gives the sums and gradients of xtok_loss and the
    cross-entropy computed turn by turn from the two models."""
    import torch.nn.functional as F

    from sage_opd.algorithm import algorithm_for
    from sage_opd.build import build, check_models
    from sage_opd.loss_phase import LossPhase
    from sage_opd.parallel import DistInfo
    from sage_opd.records import RolloutBatch
    from sage_opd.score_phase import Scores

    train = rollout_file(student_tok, tmp_path / "train.json", seed=0)
    cfg = trainer_config(tiny_models, cross_teacher, tmp_path / "run", train, "loss.cross_tokenizer=uld",
                         "loss.uld_top_k=5", "loss.judge_mode=graded")
    algorithm = algorithm_for(cfg.algorithm)
    loss = algorithm.loss_options(cfg.loss)
    plan = check_models(cfg, algorithm, DistInfo(), torch.float32)
    assert plan.xtok is not None and plan.xtok.teacher_tok is plan.teacher_tokenizer
    assert plan.route.startswith("teacher path: cross-tokenizer") and "loss.cross_tokenizer=uld" in plan.route
    parts = build(cfg, algorithm, loss, plan, DistInfo(), torch.float32)
    assert parts.judge.tokenizer is plan.teacher_tokenizer and parts.judge.answers == ("Skip", "Weak", "Strong")
    student, teacher, xtok = parts.student, parts.teacher.model, plan.xtok

    turns = RolloutBatch.load(train).turns  # 2 episodes x 3 valid student turns
    turns[4].source = "expert"
    interventions, imitated = [1.0, 0.0, 0.6, 0.3, 1.0, 0.8], [False, False, False, False, True, False]
    # the premise of a turn-by-turn reference: a turn's teacher prompt is the same whatever turns precede it
    assert [a.teacher.prompt_ids for a in xtok.teacher_turns(turns)] == \
        [xtok.teacher_turns([t])[0].teacher.prompt_ids for t in turns]
    sums = LossPhase(student, parts.teacher, loss, grad_accum=2, xtok=xtok)(turns, Scores(interventions, imitated))
    got = {n: p.grad.clone() for n, p in student.model.named_parameters()}

    student.model.zero_grad(set_to_none=True)
    total, weight_sum, opd_tokens = 0.0, 0.0, 0
    t_pad, t_vocab = xtok.teacher_tok.pad_token_id, len(xtok.teacher_tok)
    for t, i, im in zip(turns, interventions, imitated):
        hidden, weight, targets = states(student.model, [t], student.pad_id)
        if im:
            part = F.cross_entropy(hidden @ weight[:student.vocab].T, targets, reduction="sum")
            weight_sum += len(targets)
        elif i > 0:
            (aligned,) = xtok.teacher_turns([t])
            s_span, t_span = span_ids([aligned])
            with torch.no_grad():
                t_hidden, t_weight, t_targets = states(teacher, [aligned.teacher], t_pad)
            ref = xtok_loss(hidden, weight[:student.vocab], targets, s_span,
                            AlignedTeacher(t_hidden, t_weight[:t_vocab], t_targets, t_span, xtok.shared), mode="uld",
                            intervention=torch.full((len(targets),), i), confidence=loss.confidence, top_k=5)
            part, weight_sum, opd_tokens = ref.weighted_sum, weight_sum + ref.weight_sum, opd_tokens + len(targets)
        else:
            continue
        part.backward()
        total += float(part.detach())
    assert (sums["opd_tokens"], sums["ce_tokens"]) == (opd_tokens, len(turns[4].token_ids))
    assert sums["tokens"] == sum(len(t.token_ids) for t in turns) > opd_tokens + sums["ce_tokens"]  # the skipped turn
    assert sums["weighted_loss"] == pytest.approx(total, rel=1e-4)
    assert sums["weight_sum"] == pytest.approx(weight_sum, rel=1e-5)
    assert sums["kl_sum"] > 0  # the shared-vocabulary KL, not the options' values
    for n, p in student.model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-3, atol=1e-6)
