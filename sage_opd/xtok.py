"""Cross-tokenizer alignment: a student response re-rendered for a teacher with another tokenizer (SPEC section 4).

The student's response ids are spelled out as text (each id's bytes, decoded as UTF-8), the
teacher encodes that text with its own tokenizer, and the two tokenisations are cut into
aligned spans: the shortest runs of student and teacher tokens that spell the same text (a
span ends where both have a token boundary: at the same byte offset when both spell the same
bytes, at the same character offset when the student sampled invalid UTF-8). The cross-tokenizer losses
(``sage_opd.xtok_losses``) compare the two models span by span. API::

    TokenText(tokenizer).pieces(ids) -> list[bytes]        # what each id spells (sampled ids, never re-encoded)
    char_ends(pieces) -> (text, ends)                      # ends[k]: characters after token k (None: mid-character)
    align_spans(student_ends, teacher_ends) -> (student_span, teacher_span)   # span index of every token
    xtok = CrossTokenizer(student_tok, teacher_tok)
    xtok.align(student_ids) -> Alignment                   # one response: teacher ids and the spans
    xtok.teacher_turns(turns) -> list[AlignedTurn]         # turns: .messages, .text, .token_ids (student ids)
    span_ids(aligned_turns) -> (student_span [Ns], teacher_span [Nt])   # spans numbered across a batch of turns
    xtok.shared -> SharedVocab                             # ids that spell the same bytes in both vocabularies

A response that ends with a special token (the student's end of turn) ends with the teacher's
eos token instead: the two form a span of their own and count as one shared token. Characters
the teacher's tokenizer cannot encode at all (it drops them) stay in the student's span only. Each turn's
teacher prompt is its chat rendered with the teacher's chat template (``TokenHistory``: an
episode's turns continue one another, so the teacher scores an episode as one sequence).
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

import torch

from sage_gym.errors import SageError
from sage_models import TokenHistory
from sage_opd.teacher import PROBE_TEXT, TurnIds
from sage_opd.xtok_losses import SharedVocab

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class UnalignableTokenizerError(SageError, ValueError):
    """A tokenizer whose token ids cannot be spelled out as the text they encode."""


def _byte_decoder() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


class TokenText:
    """The bytes each token id spells: byte-level BPE (GPT-2 byte alphabet) or SentencePiece pieces (``▁`` for a
    space, ``<0xNN>`` byte fallback); added and special tokens spell their content. Checked on a probe text."""

    def __init__(self, tokenizer):
        decoder = json.dumps(json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder"))
        byte_level = '"ByteLevel"' in decoder
        byte_of = _byte_decoder() if byte_level else {}
        added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
        vocab = tokenizer.get_vocab()
        self.table = [b""] * (max(vocab.values()) + 1)
        for token, i in vocab.items():
            if i in added:
                self.table[i] = added[i].encode()
            elif byte_level and all(c in byte_of for c in token):
                self.table[i] = bytes(byte_of[c] for c in token)
            elif (m := _BYTE_TOKEN.fullmatch(token)) and not byte_level:
                self.table[i] = bytes([int(m[1], 16)])
            else:
                self.table[i] = token.replace("\u2581", " ").encode()
        self.special = set(tokenizer.all_special_ids)
        probe = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        spelled = b"".join(self.pieces(probe)).decode("utf-8", "replace")
        if spelled != PROBE_TEXT:
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise UnalignableTokenizerError(
                f"cannot spell the tokens of {name!r} as text ({PROBE_TEXT!r} encodes to tokens that spell "
                f"{spelled!r}); cross-tokenizer distillation supports byte-level BPE and SentencePiece "
                "byte-fallback tokenizers that encode text without adding to it")

    def pieces(self, ids: Sequence[int]) -> list[bytes]:
        return [self.table[i] for i in ids]


def char_ends(pieces: Sequence[bytes]) -> tuple[str, list[int | None]]:
    """The text the pieces spell (UTF-8, invalid bytes as U+FFFD) and, per piece, the number of characters written
    once it is read (None when it ends inside a multi-byte character: no boundary there)."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    parts: list[str] = []
    ends: list[int | None] = []
    n = 0
    for piece in pieces:
        parts.append(decoder.decode(piece))
        n += len(parts[-1])
        ends.append(None if decoder.getstate()[0] else n)
    parts.append(decoder.decode(b"", final=True))
    if ends:
        ends[-1] = n + len(parts[-1])
    return "".join(parts), ends


def align_spans(a_ends: Sequence[int | None], b_ends: Sequence[int | None]) -> tuple[list[int], list[int]]:
    """Span index of every token of two tokenisations of one text (``ends`` from ``char_ends``): each span is the
    shortest run of tokens on both sides that ends at a boundary of both; tokens that add no text after the last
    common boundary join the last span."""
    a_span: list[int] = []
    b_span: list[int] = []
    i = j = span = 0
    while i < len(a_ends) and j < len(b_ends):
        a_at, b_at = a_ends[i], b_ends[j]
        a_span.append(span)
        b_span.append(span)
        i, j = i + 1, j + 1
        while a_at is None or a_at != b_at:
            if b_at is not None and (a_at is None or a_at < b_at):
                if i == len(a_ends):
                    raise ValueError("the two tokenisations do not spell the same text")
                a_at, i = a_ends[i], i + 1
                a_span.append(span)
            else:
                if j == len(b_ends):
                    raise ValueError("the two tokenisations do not spell the same text")
                b_at, j = b_ends[j], j + 1
                b_span.append(span)
        span += 1
    last = a_ends[i - 1] if i else 0
    if any(e != last for e in a_ends[i:]) or any(e != last for e in b_ends[j:]):
        raise ValueError("the two tokenisations do not spell the same text")
    a_span += [max(span - 1, 0)] * (len(a_ends) - i)
    b_span += [max(span - 1, 0)] * (len(b_ends) - j)
    return a_span, b_span


def _onto(text: str, t_text: str, t_ends: list[int | None]) -> list[int | None]:
    """Teacher token ends as offsets in ``text`` when the teacher's tokenizer left characters out (it has no token
    for them, like SmolLM2's for 21 byte values): they join the student's span that follows them."""
    kept, j = [], 0
    for i, ch in enumerate(text):
        if j < len(t_text) and ch == t_text[j]:
            kept.append(i)
            j += 1
    if j < len(t_text):
        raise UnalignableTokenizerError(f"the teacher's tokenizer encodes {text[:80]!r} into tokens that spell "
                                        f"{t_text[:80]!r} (a normalising tokenizer cannot be aligned)")
    return [None if e is None else len(text) if e == len(t_text) else kept[e - 1] + 1 if e else 0 for e in t_ends]


@dataclass
class Alignment:
    """One response in both tokenisations: the teacher's response ids and the span of every token."""

    teacher_ids: list[int]
    student_span: list[int]
    teacher_span: list[int]
    text: str


@dataclass
class AlignedTurn:
    """A turn as the teacher scores it (its own prompt and response ids) and the response's alignment."""

    teacher: TurnIds
    alignment: Alignment


class CrossTokenizer:
    """Re-renders student turns for a teacher with another tokenizer and aligns the responses."""

    def __init__(self, student_tok, teacher_tok):
        if teacher_tok.eos_token_id is None:
            raise UnalignableTokenizerError("the teacher's tokenizer has no eos token to end its turns with")
        self.student_tok, self.teacher_tok = student_tok, teacher_tok
        self.student, self.teacher = TokenText(student_tok), TokenText(teacher_tok)
        self.shared = self._shared_vocab()

    def _shared_vocab(self) -> SharedVocab:
        teacher_eos, student_eos = self.teacher_tok.eos_token_id, self.student_tok.eos_token_id
        by_bytes: dict[bytes, int] = {}
        for i, piece in enumerate(self.teacher.table):
            if piece and i != teacher_eos:
                by_bytes.setdefault(piece, i)
        pairs = [(student_eos, teacher_eos)] if student_eos is not None else []
        for i, piece in enumerate(self.student.table):
            if i != student_eos and piece in by_bytes:
                pairs.append((i, by_bytes.pop(piece)))
        ids = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)

        def rest(size: int, taken: torch.Tensor) -> torch.Tensor:
            keep = torch.ones(size, dtype=torch.bool)
            keep[taken] = False
            return torch.nonzero(keep).squeeze(1)

        return SharedVocab(ids[:, 0].contiguous(), ids[:, 1].contiguous(), rest(len(self.student_tok), ids[:, 0]),
                           rest(len(self.teacher_tok), ids[:, 1]))

    def align(self, student_ids: Sequence[int]) -> Alignment:
        """The teacher's tokenisation of the text the student's ids spell, and the spans of both."""
        ids = list(student_ids)
        end = 1 if ids and ids[-1] in self.student.special else 0
        s_pieces = self.student.pieces(ids[:len(ids) - end])
        text, s_ends = char_ends(s_pieces)
        t_ids = self.teacher_tok(text, add_special_tokens=False, verbose=False)["input_ids"] if text else []
        t_pieces = self.teacher.pieces(t_ids)
        if b"".join(t_pieces) == b"".join(s_pieces):  # the same bytes: boundaries inside a character count too
            s_ends, t_ends = list(accumulate(map(len, s_pieces))), list(accumulate(map(len, t_pieces)))
        else:  # invalid UTF-8 sampled, or characters the teacher cannot encode: character offsets
            t_text, t_ends = char_ends(t_pieces)
            if t_text != text:
                t_ends = _onto(text, t_text, t_ends)
        if t_ids:
            s_span, t_span = align_spans(s_ends, t_ends)
        else:  # nothing the teacher can spell: one span without teacher tokens (confidence 0, so no weight)
            s_span, t_span = [0] * len(s_ends), []
        if end:
            n = max(s_span + t_span, default=-1) + 1
            s_span, t_span, t_ids = s_span + [n], t_span + [n], t_ids + [self.teacher_tok.eos_token_id]
        return Alignment(t_ids, s_span, t_span, text)

    def teacher_turns(self, turns: Sequence) -> list[AlignedTurn]:
        """Each turn (``messages`` it answered, its ``text``, the student's ``token_ids``) with the teacher's own
        prompt ids (its chat template; turns of one episode continue one another) and response ids."""
        history = TokenHistory(self.teacher_tok)
        out = []
        for t in turns:
            alignment = self.align(t.token_ids)
            prompt = history.prompt_ids(t.messages)
            history.record(t.messages, t.text, prompt + alignment.teacher_ids)
            out.append(AlignedTurn(TurnIds(prompt, alignment.teacher_ids), alignment))
        return out


def span_ids(aligned: Sequence[AlignedTurn]) -> tuple[torch.Tensor, torch.Tensor]:
    """The spans of a batch of turns numbered across it, per response token in turn order: student [Ns], teacher [Nt]
    (the order of ``make_batch``'s response positions)."""
    student: list[int] = []
    teacher: list[int] = []
    for a in aligned:
        offset = max(student + teacher, default=-1) + 1
        student += [offset + k for k in a.alignment.student_span]
        teacher += [offset + k for k in a.alignment.teacher_span]
    return torch.tensor(student, dtype=torch.long), torch.tensor(teacher, dtype=torch.long)
