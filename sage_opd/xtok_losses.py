"""Cross-tokenizer SAGE-OPD losses on aligned spans (SPEC section 4; the spans come from ``sage_opd.xtok``).

Plain functions of tensors. A span is the shortest run of student tokens S_j and teacher tokens T_j
that spell the same text; a one-to-one span holds one token on each side. Every student token k
gets a token loss l_k and a weight w_k = i_t * c_k, normalised as in ``sage_opd.losses``.

    xtok_loss(student_hidden [Ns, H], student_weight [Vs, H], target_ids [Ns], span [Ns], teacher: AlignedTeacher,
              shared: SharedVocab, *, mode="sequence", intervention [Ns] = None, token_loss="reverse_kl",
              confidence="entropy", normalization="preserve", beta=0.5, top_k=20, chunk_size=256) -> OpdLoss
    AlignedTeacher(hidden [Nt, Ht], weight [Vt, Ht], target_ids [Nt], span [Nt])
    shared_vocab_kl(...) -> (sum, count)     # reverse KL on the shared vocabulary over one-to-one spans (no grad)

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

Memory: student logits are computed in chunks of ``chunk_size`` tokens and recomputed in the
backward pass (activation checkpointing), so no [tokens x vocab] tensor of the batch is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sage_opd.losses import CONFIDENCES, NORMALIZATIONS, TOKEN_LOSSES, OpdLoss, normalize, teacher_confidence, token_losses
from sage_opd.xtok import SharedVocab

MODES = ("sequence", "shared_vocab", "uld")


@dataclass
class AlignedTeacher:
    """The teacher at its own response tokens: final hidden states at the positions predicting each of them
    [Nt, Ht], the lm_head weight [Vt, Ht], the tokens [Nt] and their spans [Nt] (as the student's span ids)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    target_ids: torch.Tensor
    span: torch.Tensor

    def select(self, mask: torch.Tensor) -> AlignedTeacher:
        return AlignedTeacher(self.hidden[mask], self.weight, self.target_ids[mask], self.span[mask])


def _check(name: str, value: str, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ValueError(f"unknown {name} {value!r}; accepted: {', '.join(accepted)}")


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

    def sum_over_span(self, student: torch.Tensor | None = None, teacher: torch.Tensor | None = None) -> torch.Tensor:
        """Per span: the sum of a student-token value and/or a teacher-token value."""
        out = torch.zeros(self.n_s.shape[0], device=self.n_s.device)
        if student is not None:
            out = out.index_add(0, self.s_idx, student.float())
        return out.index_add(0, self.t_idx, teacher.float()) if teacher is not None else out


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


def _matched_loss(hidden, weight, t_hidden, t_weight, shared_s, shared_t, kind, beta, top_k):
    """``token_loss`` on the shared vocabulary (renormalised) [C]; with ``top_k`` > 0, plus the L1 distance of the
    sorted top-k probabilities of the tokens outside it (ULD)."""
    logp = F.log_softmax((hidden @ weight.T).float(), -1)
    with torch.no_grad():
        logq = F.log_softmax((t_hidden @ t_weight.T).float(), -1)
    loss = token_losses(logp[:, shared_s], logq[:, shared_t], kind, beta=beta)
    if top_k:
        k = min(top_k, logp.shape[1], logq.shape[1])
        p_rest = logp.exp().index_fill(1, shared_s, 0.0).topk(k, -1).values
        q_rest = logq.exp().index_fill(1, shared_t, 0.0).topk(k, -1).values
        loss = loss + (p_rest - q_rest).abs().sum(-1)
    return loss


def xtok_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor, target_ids: torch.Tensor,
              span: torch.Tensor, teacher: AlignedTeacher, shared: SharedVocab | None = None, *,
              mode: str = "sequence", intervention: torch.Tensor | None = None, token_loss: str = "reverse_kl",
              confidence: str = "entropy", normalization: str = "preserve", beta: float = 0.5, top_k: int = 20,
              chunk_size: int = 256, eps: float = 1e-8) -> OpdLoss:
    """The SAGE-OPD loss across tokenizers (see the module docstring): L = sum(w l) / sum(w) (preserve) or / N."""
    _check("cross-tokenizer mode", mode, MODES)
    _check("token_loss", token_loss, TOKEN_LOSSES)
    _check("confidence", confidence, CONFIDENCES)
    _check("normalization", normalization, NORMALIZATIONS)
    if mode != "sequence" and token_loss != "sampled" and shared is None:
        raise ValueError(f"cross-tokenizer mode {mode!r} needs the shared vocabulary (CrossTokenizer.shared)")
    if mode == "uld" and top_k < 1:
        raise ValueError(f"uld needs top_k >= 1 probabilities to sort, got {top_k}")
    n = target_ids.shape[0]
    spans = _Spans.of(span, teacher.span)
    logq_z, conf_t = _teacher_stats(teacher, confidence, chunk_size)
    logp_y = torch.cat([checkpoint(_token_logprobs, student_hidden[s:s + chunk_size], student_weight,
                                   target_ids[s:s + chunk_size], use_reentrant=False)
                        for s in range(0, n, chunk_size)]) if n else student_hidden.new_zeros(0)
    adv = spans.sum_over_span(logp_y.detach(), -logq_z)[spans.s_idx]
    losses = adv / spans.n_s[spans.s_idx] + adv * (logp_y - logp_y.detach())
    if mode != "sequence" and token_loss != "sampled":
        matched = _matched_rows(student_hidden, student_weight, teacher, shared, spans, token_loss, beta,
                                top_k if mode == "uld" else 0, chunk_size)
        losses = losses.index_put((spans.rows,), matched) if len(spans.rows) else losses
    conf = (spans.sum_over_span(teacher=conf_t) / spans.n_t.clamp(min=1))[spans.s_idx]
    i = (intervention.reshape(-1).detach().float() if intervention is not None
         else torch.ones(n, device=student_hidden.device))
    loss, no_update = normalize(losses, i * conf, normalization, eps)
    mean = (lambda x: float(x.mean()) if n else 0.0)
    return OpdLoss(loss=loss, no_update=no_update, num_tokens=n, weight_sum=float((i * conf).sum()),
                   token_loss_mean=mean(losses.detach()), confidence_mean=mean(conf), intervention_mean=mean(i))


def _matched_rows(student_hidden, student_weight, teacher: AlignedTeacher, shared: SharedVocab, spans: _Spans,
                  kind: str, beta: float, top_k: int, chunk: int) -> torch.Tensor:
    """``_matched_loss`` [len(spans.rows)] at the one-to-one spans, chunk by chunk, recomputed in backward."""
    device = student_hidden.device
    shared_s, shared_t = shared.student_ids.to(device), shared.teacher_ids.to(device)
    parts = [checkpoint(_matched_loss, student_hidden[spans.rows[s:s + chunk]], student_weight,
                        teacher.hidden[spans.t_rows[s:s + chunk]].detach(), teacher.weight.detach(), shared_s, shared_t,
                        kind, beta, top_k, use_reentrant=False) for s in range(0, len(spans.rows), chunk)]
    return torch.cat(parts) if parts else student_hidden.new_zeros(0, dtype=torch.float32)


@torch.no_grad()
def shared_vocab_kl(student_hidden: torch.Tensor, student_weight: torch.Tensor, span: torch.Tensor,
                    teacher: AlignedTeacher, shared: SharedVocab, chunk_size: int = 256) -> tuple[float, int]:
    """The cross-tokenizer divergence: sum and count of reverse KL(p || q) on the shared vocabulary (renormalised)
    over the student tokens of one-to-one spans (with one tokenizer: the exact token KL over every token)."""
    spans = _Spans.of(span, teacher.span)
    kl = _matched_rows(student_hidden, student_weight, teacher, shared, spans, "reverse_kl", 0.5, 0, chunk_size)
    return float(kl.sum()), int(kl.numel())
