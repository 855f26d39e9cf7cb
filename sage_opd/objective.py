"""The per-micro-batch objective of every algorithm, on tensors only (no env, rollout or config import).

Every algorithm trains on turns (context ids + response ids). A turn is either distilled
(OPD token loss against the teacher, weight w = i_t * c_tk) or imitated (cross-entropy on
its tokens, weight 1: Guided-OPD teacher turns, SFT); which is which is the caller's
``is_imitated`` (``sage_opd.algorithm.Algorithm.imitates``). Functions here return the *sum*
sum(w * l) and sum(w) of a micro-batch; the optimiser step divides the accumulated gradient by
the batch-wide (all ranks) denominator (``sage_opd.losses.loss_denominator``), so the loss keeps
one scale however the batch is split into micro-batches and ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sage_opd.losses import DenseTeacher, SparseTeacher, opd_loss, token_losses
from sage_opd.xtok_losses import AlignedTeacher, shared_vocab_kl, xtok_loss


@dataclass
class MicroResult:
    """Sums over one micro-batch (the trainer adds them over micro-batches and ranks)."""

    weighted_loss: torch.Tensor  # sum(w * l), differentiable
    weight_sum: float = 0.0
    tokens: int = 0
    opd_tokens: int = 0
    ce_tokens: int = 0
    kl_sum: float = 0.0  # sum of token losses on OPD tokens (the reverse KL with the default loss)
    confidence_sum: float = 0.0
    ce_sum: float = 0.0


def cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """sum_k -log p(y_k) over flat hidden [N, H], chunked and recomputed in backward (no [N, V] tensor kept)."""
    def piece(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy((h @ weight.T).float(), y, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, hidden.shape[0], chunk):
        total = total + checkpoint(piece, hidden[s:s + chunk], targets[s:s + chunk], use_reentrant=False)
    return total


def turn_of_positions(turn_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(response mask [B, T], the turn of each response position [N]) from a batch's ``turn_index`` [B, T]
    (-1 off responses), or from a bool mask [B, T] whose row b is turn b."""
    if turn_index.dtype == torch.bool:
        rows = torch.arange(turn_index.shape[0], device=turn_index.device)[:, None].expand_as(turn_index)
        turn_index = torch.where(turn_index, rows, -1)
    mask = turn_index >= 0
    return mask, turn_index[mask]


def micro_batch_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                     teacher: DenseTeacher | SparseTeacher | AlignedTeacher | None, turn_index: torch.Tensor,
                     target_ids: torch.Tensor, intervention: torch.Tensor, is_imitated: torch.Tensor, *,
                     token_loss: str = "reverse_kl", confidence: str = "entropy", jsd_beta: float = 0.5,
                     chunk_tokens: int = 1024, cross_tokenizer: str | None = None, uld_top_k: int = 20,
                     student_span: torch.Tensor | None = None) -> MicroResult:
    """sum(w * l) over a micro-batch: OPD token loss on distilled turns, cross-entropy on imitated turns.

    Student hidden states [B, T, H] and the teacher's scores (in-process ``DenseTeacher`` or a
    server's top-k ``SparseTeacher``) are aligned with ``turn_index``/``target_ids`` [B, T]
    (see ``sage_opd.teacher.make_batch``; a bool response mask means one turn per row);
    ``intervention`` [n_turns] holds i_t per turn (1 for standard OPD), ``is_imitated`` [n_turns] bool;
    the keyword options are ``loss.*`` of the config (SPEC section 4). Across tokenizers the teacher is an
    ``AlignedTeacher`` at its own tokens, ``student_span`` [N] gives the span of each response token
    (``sage_opd.xtok.span_ids``) and the loss is ``cross_tokenizer``'s (``sage_opd.xtok_losses.xtok_loss``).
    """
    response_mask, row = turn_of_positions(turn_index)
    targets = target_ids[response_mask]
    hidden = student_hidden[response_mask]
    ce_sel, opd_sel = is_imitated[row], ~is_imitated[row]
    result = MicroResult(weighted_loss=student_hidden.sum() * 0.0, tokens=int(row.numel()))
    if ce_sel.any():
        ce = cross_entropy_sum(hidden[ce_sel], student_weight, targets[ce_sel], chunk_tokens)
        n_ce = int(ce_sel.sum())
        result.weighted_loss = result.weighted_loss + ce
        result.weight_sum += n_ce
        result.ce_tokens, result.ce_sum = n_ce, float(ce.detach())
    i_tok = intervention.to(hidden.device)[row].float()
    keep = opd_sel & (i_tok > 0)  # turns the judge skipped carry no gradient
    if keep.any():
        if teacher is None:
            raise ValueError("OPD turns need the teacher's scores")
        if isinstance(teacher, AlignedTeacher):
            span = student_span[keep]
            res = xtok_loss(hidden[keep], student_weight, targets[keep], span,
                            teacher.select(torch.isin(teacher.span, span)), mode=cross_tokenizer,
                            intervention=i_tok[keep], token_loss=token_loss, confidence=confidence, beta=jsd_beta,
                            top_k=uld_top_k, chunk_size=chunk_tokens)
        else:
            res = opd_loss(hidden[keep], student_weight, teacher.select(response_mask).select(keep),
                           target_ids=targets[keep], intervention=i_tok[keep], token_loss=token_loss,
                           confidence=confidence, beta=jsd_beta, chunk_size=chunk_tokens)
        n = res.num_tokens
        result.weighted_loss = result.weighted_loss + res.weighted_sum
        result.weight_sum += res.weight_sum
        result.opd_tokens = n
        result.kl_sum = res.token_loss_mean * n
        result.confidence_sum = res.confidence_mean * n
    return result


@torch.no_grad()
def turn_reverse_kl(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                    teacher_weight: torch.Tensor, turn_index: torch.Tensor, n_turns: int,
                    chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per turn of a batch: (sum of the token reverse KL(p || q) over its response tokens, its number of response
    tokens), two [n_turns] tensors."""
    response_mask, row = turn_of_positions(turn_index)
    s, t = student_hidden[response_mask], teacher_hidden[response_mask]
    kl = torch.zeros(n_turns, dtype=torch.float32, device=s.device)
    for i in range(0, s.shape[0], chunk):
        kl.index_add_(0, row[i:i + chunk],
                      token_losses(s[i:i + chunk] @ student_weight.T, t[i:i + chunk] @ teacher_weight.T).float())
    return kl, torch.bincount(row, minlength=n_turns)


def reverse_kl_sum(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                   teacher_weight: torch.Tensor, turn_index: torch.Tensor, is_imitated: torch.Tensor,
                   intervention: torch.Tensor, chunk: int) -> float:
    """sum of the token reverse KL(p || q) on distilled, supervised tokens (for logging other token losses)."""
    kl, _ = turn_reverse_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, turn_index,
                            len(is_imitated), chunk)
    keep = ~is_imitated.to(kl.device) & (intervention.to(kl.device) > 0)
    return float(kl[keep].sum())


@torch.no_grad()
def shared_kl_sum(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher: AlignedTeacher,
                  student_span: torch.Tensor, turn_index: torch.Tensor, is_imitated: torch.Tensor,
                  intervention: torch.Tensor, chunk: int) -> float:
    """Across tokenizers, the token reverse KL logged for the distilled, supervised tokens: the mean KL on the shared
    vocabulary over those in one-to-one spans (``shared_vocab_kl``), times their number."""
    response_mask, row = turn_of_positions(turn_index)
    keep = ~is_imitated[row] & (intervention.to(row.device)[row] > 0)
    span = student_span[keep]
    total, count = shared_vocab_kl(student_hidden[response_mask][keep], student_weight, span,
                                   teacher.select(torch.isin(teacher.span, span)), chunk)
    return total / count * int(keep.sum()) if count else float("nan")
