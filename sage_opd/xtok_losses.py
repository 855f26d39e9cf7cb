"""Cross-tokenizer SAGE-OPD losses on aligned spans (SPEC section 4; the spans come from ``sage_opd.xtok``).

Plain functions of tensors. A span is the shortest run of student tokens S_j and teacher tokens T_j
that spell the same text; a one-to-one span holds one token on each side. Every student token k
gets a token loss l_k and a weight w_k = i_t * c_k, normalised as in ``sage_opd.losses``.

    xtok_loss(student_hidden [Ns, H], student_weight [Vs, H], target_ids [Ns], span [Ns], teacher: AlignedTeacher,
              *, mode="sequence", intervention [Ns] = None, token_loss="reverse_kl", confidence="entropy",
              normalization="preserve", beta=0.5, top_k=20, chunk_size=256) -> OpdLoss
    AlignedTeacher(hidden [Nt, Ht], weight [Vt, Ht], target_ids [Nt], span [Nt], shared: SharedVocab | None)
    SharedVocab(student_ids [M], teacher_ids [M], student_rest, teacher_rest)   # ids spelling the same bytes
    shared_vocab_kl(student_hidden, student_weight, span, teacher) -> (sum, count)   # the divergence (no grad)

Options (``mode``) and their approximations:

- ``sequence``: a sampled estimate per span, used like the ``sampled`` token loss. The span's
  advantage A_j = log p(S_j) - log q(T_j), the log-probabilities of the span's text under each
  model (the teacher's: of its own tokenisation of that text, given its own tokenisation of the
  context; other tokenisations of the same text are ignored). Every student token of the span
  gets the advantage A_j (value A_j / |S_j|, gradient of sg(A_j) * log p(y_k)). ``token_loss`` is
  not used. One-token spans on both sides give exactly ``sampled``.
- ``shared_vocab``: on one-to-one spans, ``token_loss`` between p and q restricted to the shared
  vocabulary (ids spelling the same bytes in both, and the two eos tokens) and renormalised over
  it; probability on tokens the other model lacks is ignored. Other spans: ``sequence``.
- ``uld``: ``shared_vocab`` plus, on one-to-one spans, ULD's sorted-probability matching of the
  rest: sum_{r < k} |p_(r) - q_(r)| over the k largest probabilities of the tokens outside the
  shared vocabulary on each side (GOLD's hybrid; it matches the shapes of the two distributions,
  not which token is which). Other spans: ``sequence``.

With ``token_loss="sampled"`` every option is ``sequence``. The confidence c_k of a student token is
the mean of the teacher's confidences (over its vocabulary) at the tokens of its span. With one
tokenizer every span is one-to-one and the shared vocabulary is the whole vocabulary, so each
option gives the exact loss of ``sage_opd.losses`` (``sequence``: its ``sampled``).

Memory and time: no [tokens x vocab] tensor of the batch is kept. One-to-one spans go through
``sage_opd.losses.opd_loss``'s chunked loop (gradients folded in the forward pass, teacher and
student logits computed once each) with the teacher seen through the shared vocabulary; the other
spans need log p(y) only, computed in chunks recomputed in the backward pass (checkpointing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sage_opd.losses import (CONFIDENCES, NORMALIZATIONS, TOKEN_LOSSES, OpdLoss, _check, _confidence, _loss_and_grad,
                             _upcast, loss_denominator, opd_loss, teacher_confidence)

MODES = ("sequence", "shared_vocab", "uld")


@dataclass
class SharedVocab:
    """Pairs of ids (student, teacher) that spell the same bytes, one-to-one, plus the two eos tokens; and the ids
    of each vocabulary (0 .. len(tokenizer) - 1) outside them (built by ``sage_opd.xtok.CrossTokenizer``)."""

    student_ids: torch.Tensor  # [M] long
    teacher_ids: torch.Tensor  # [M] long
    student_rest: torch.Tensor  # [Vs - M] long
    teacher_rest: torch.Tensor  # [Vt - M] long


@dataclass
class AlignedTeacher:
    """The teacher at its own response tokens: final hidden states at the positions predicting each of them
    [Nt, Ht], the lm_head weight [Vt, Ht], the tokens [Nt], their spans [Nt] (as the student's span ids), and the
    ids both vocabularies share (``CrossTokenizer.shared``; needed by ``shared_vocab`` and ``uld``)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    target_ids: torch.Tensor
    span: torch.Tensor
    shared: SharedVocab | None = None

    def select(self, mask: torch.Tensor) -> AlignedTeacher:
        return AlignedTeacher(self.hidden[mask], self.weight, self.target_ids[mask], self.span[mask], self.shared)


@dataclass
class _Spans:
    """Span bookkeeping: each token's span as 0..n_spans-1, token counts per span, the one-to-one pairs."""

    s_idx: torch.Tensor  # [Ns]
    t_idx: torch.Tensor  # [Nt]
    n_s: torch.Tensor  # [n_spans] float
    n_t: torch.Tensor  # [n_spans] float
    rows: torch.Tensor  # student tokens alone in their span with one teacher token
    t_rows: torch.Tensor  # that teacher token

    @classmethod
    def of(cls, student_span: torch.Tensor, teacher_span: torch.Tensor) -> _Spans:
        n, device = student_span.shape[0], student_span.device
        ids, inverse = torch.unique(torch.cat([student_span, teacher_span]), return_inverse=True)
        s_idx, t_idx = inverse[:n], inverse[n:]
        n_s = torch.bincount(s_idx, minlength=len(ids)).float()
        n_t = torch.bincount(t_idx, minlength=len(ids)).float()
        t_row = torch.full((len(ids),), -1, dtype=torch.long, device=device)
        t_row[t_idx] = torch.arange(len(t_idx), device=device)
        rows = torch.nonzero(((n_s == 1) & (n_t == 1))[s_idx]).squeeze(1)
        return cls(s_idx, t_idx, n_s, n_t, rows, t_row[s_idx[rows]])


def _token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.log_softmax((hidden @ weight.T).float(), -1).gather(1, targets[:, None]).squeeze(1)


@torch.no_grad()
def _teacher_stats(teacher: AlignedTeacher, confidence: str, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """log q(z) [Nt] and the confidence c [Nt] at every teacher token."""
    logq, conf = [], []
    for s in range(0, teacher.hidden.shape[0], chunk):
        logits = (teacher.hidden[s:s + chunk] @ teacher.weight.T).float()
        logq.append(F.log_softmax(logits, -1).gather(1, teacher.target_ids[s:s + chunk, None]).squeeze(1))
        conf.append(teacher_confidence(logits, confidence))
    empty = teacher.hidden.new_zeros(0, dtype=torch.float32)
    return (torch.cat(logq), torch.cat(conf)) if logq else (empty, empty)


def _top(p: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of p [C, V] over the columns ``ids``, zero-padded to k, and the columns they sit in."""
    if not len(ids):
        return p.new_zeros(p.shape[0], k), ids.new_zeros(p.shape[0], 0)
    values, at = p[:, ids].topk(min(k, len(ids)), -1)
    return F.pad(values, (0, k - values.shape[1])), ids[at]


def _matched_chunk(z: torch.Tensor, logq: torch.Tensor, shared: SharedVocab, kind: str, beta: float,
                   top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss l [C] and dl/dz [C, Vs] at one-to-one rows from student logits z and teacher log-probs: ``kind`` between
    p and q renormalised over the shared vocabulary; with top_k > 0, plus sum_r |p_(r) - q_(r)| over the k largest
    probabilities outside it on each side (ULD), whose gradient goes through the full softmax."""
    loss, grad_shared = _loss_and_grad(F.log_softmax(z[:, shared.student_ids], -1),
                                       F.log_softmax(logq[:, shared.teacher_ids], -1), kind, None, None, beta)
    grad = torch.zeros_like(z).index_copy_(1, shared.student_ids, grad_shared)
    if top_k:
        p = F.softmax(z, -1)
        p_top, p_at = _top(p, shared.student_rest, top_k)
        q_top, _ = _top(logq.exp(), shared.teacher_rest, top_k)
        loss = loss + (p_top - q_top).abs().sum(-1)
        g = torch.zeros_like(z).scatter_(1, p_at, torch.sign(p_top - q_top)[:, :p_at.shape[1]])
        grad += p * (g - (p * g).sum(-1, keepdim=True))
    return loss, grad


@dataclass
class _SharedVocabTeacher:
    """The teacher at one-to-one spans seen through the shared vocabulary: a teacher of ``opd_loss``'s chunked loop,
    which folds the gradients in the forward pass (teacher and student logits computed once each)."""

    hidden: torch.Tensor  # [R, Ht]
    weight: torch.Tensor  # [Vt, Ht]
    shared: SharedVocab
    top_k: int

    def num_tokens(self) -> int:
        return self.hidden.shape[0]

    def chunk_loss(self, s: int, e: int, z: torch.Tensor, kind: str, conf_kind: str, target, beta: float,
                   log_vocab: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logq = F.log_softmax(_upcast(self.hidden[s:e].detach() @ self.weight.detach().T), -1)
        loss, grad = _matched_chunk(z, logq, self.shared, kind, beta, self.top_k)
        return loss, grad, _confidence(logq, conf_kind, math.log(self.weight.shape[0]))


def _shared_on(shared: SharedVocab, device) -> SharedVocab:
    return SharedVocab(*(x.to(device) for x in (shared.student_ids, shared.teacher_ids, shared.student_rest,
                                                  shared.teacher_rest)))


def xtok_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor, target_ids: torch.Tensor,
              span: torch.Tensor, teacher: AlignedTeacher, *, mode: str = "sequence",
              intervention: torch.Tensor | None = None, token_loss: str = "reverse_kl", confidence: str = "entropy",
              normalization: str = "preserve", beta: float = 0.5, top_k: int = 20, chunk_size: int = 256,
              eps: float = 1e-8) -> OpdLoss:
    """The SAGE-OPD loss across tokenizers (see the module docstring): L = sum(w l) / sum(w) (preserve) or / N
    (``sage_opd.losses.loss_denominator``); ``weighted_sum`` is sum(w l), for callers normalising a larger batch."""
    _check("cross-tokenizer mode", mode, MODES)
    _check("token_loss", token_loss, TOKEN_LOSSES)
    _check("confidence", confidence, CONFIDENCES)
    _check("normalization", normalization, NORMALIZATIONS)
    matched = mode != "sequence" and token_loss != "sampled"
    if matched and teacher.shared is None:
        raise ValueError(f"cross-tokenizer mode {mode!r} needs the shared vocabulary (AlignedTeacher.shared)")
    if mode == "uld" and top_k < 1:
        raise ValueError(f"uld needs top_k >= 1 probabilities to sort, got {top_k}")
    n, device = target_ids.shape[0], student_hidden.device
    spans = _Spans.of(span, teacher.span)
    i = intervention.reshape(-1).detach().float() if intervention is not None else torch.ones(n, device=device)
    rows = spans.rows if matched else spans.rows[:0]
    seq = torch.ones(n, dtype=torch.bool, device=device).index_fill(0, rows, False)
    t_seq = torch.ones(len(spans.t_idx), dtype=torch.bool, device=device)
    t_seq = t_seq.index_fill(0, spans.t_rows[:len(rows)], False)

    # spans scored by their text's log-probabilities: the sampled surrogate sg(A_j) log p(y_k), value A_j / |S_j|
    logq_z, conf_t = _teacher_stats(teacher.select(t_seq), confidence, chunk_size)
    s_rows = torch.nonzero(seq).squeeze(1)
    logp_y = torch.cat([checkpoint(_token_logprobs, student_hidden[s_rows[s:s + chunk_size]], student_weight,
                                   target_ids[s_rows[s:s + chunk_size]], use_reentrant=False)
                        for s in range(0, len(s_rows), chunk_size)]) if len(s_rows) else i.new_zeros(0)
    s_idx, t_idx = spans.s_idx[seq], spans.t_idx[t_seq]
    per_span = torch.zeros(len(spans.n_s), device=device).index_add(0, s_idx, logp_y.detach())
    adv = per_span.index_add(0, t_idx, -logq_z)[s_idx]
    seq_losses = adv / spans.n_s[s_idx] + adv * (logp_y - logp_y.detach())
    conf = (torch.zeros(len(spans.n_t), device=device).index_add(0, t_idx, conf_t) / spans.n_t.clamp(min=1))[s_idx]
    total = (i[seq] * conf * seq_losses).sum() + student_hidden.sum() * 0.0  # in the graph even with no token
    weight_sum, loss_sum, conf_sum = float((i[seq] * conf).sum()), float(seq_losses.detach().sum()), float(conf.sum())
    if len(rows):  # one-to-one spans: the distribution losses, chunked
        one = opd_loss(student_hidden[rows], student_weight, _SharedVocabTeacher(
            teacher.hidden[spans.t_rows], teacher.weight, _shared_on(teacher.shared, device),
            top_k if mode == "uld" else 0), intervention=i[rows], token_loss=token_loss, confidence=confidence,
            normalization="none", beta=beta, chunk_size=chunk_size)
        total = total + one.weighted_sum
        weight_sum += one.weight_sum
        loss_sum += one.token_loss_mean * len(rows)
        conf_sum += one.confidence_mean * len(rows)
    denominator = loss_denominator(normalization, weight_sum, n, eps)
    return OpdLoss(loss=total * 0.0 if denominator is None else total / denominator, no_update=denominator is None,
                   num_tokens=n, weight_sum=weight_sum, token_loss_mean=loss_sum / n if n else 0.0,
                   confidence_mean=conf_sum / n if n else 0.0, intervention_mean=float(i.mean()) if n else 0.0,
                   weighted_sum=total)


@torch.no_grad()
def shared_vocab_kl(student_hidden: torch.Tensor, student_weight: torch.Tensor, span: torch.Tensor,
                    teacher: AlignedTeacher, chunk_size: int = 256) -> tuple[float, int]:
    """The cross-tokenizer divergence: sum and count of reverse KL(p || q) on the shared vocabulary (renormalised)
    over the student tokens of one-to-one spans (with one tokenizer: the exact token KL over every token)."""
    spans = _Spans.of(span, teacher.span)
    n = len(spans.rows)
    if not n:
        return 0.0, 0
    kl = opd_loss(student_hidden[spans.rows].detach(), student_weight.detach(), _SharedVocabTeacher(
        teacher.hidden[spans.t_rows], teacher.weight, _shared_on(teacher.shared, student_hidden.device), 0),
        confidence="none", normalization="none", chunk_size=chunk_size)
    return kl.token_loss_mean * n, n
