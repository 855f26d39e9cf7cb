"""The loss phase: backpropagate sum(w * l) over a step's turns in ``optim.grad_accum`` micro-batches
(``sage_opd.objective.micro_batch_loss``: OPD on distilled turns, cross-entropy on imitated ones) and
return the sums the optimiser step normalises by. Turns the judge skipped (i = 0) are left out. With a
teacher of another tokenizer (``xtok``) the OPD loss is ``loss.cross_tokenizer``'s on aligned spans and
the logged ``kl`` the reverse KL on the shared vocabulary.
"""

from __future__ import annotations

import math
from collections import Counter

import torch
import torch.distributed as dist

from sage_opd.build import Student
from sage_opd.config import LossConfig
from sage_opd.losses import DenseTeacher
from sage_opd.objective import MicroResult, micro_batch_loss, reverse_kl_sum, shared_kl_sum
from sage_opd.records import TurnRecord
from sage_opd.run_log import PhaseTimer
from sage_opd.score_phase import Scores, teacher_scores
from sage_opd.teacher import make_batch
from sage_opd.xtok_losses import AlignedTeacher

SUMS = ("tokens", "weighted_loss", "weight_sum", "opd_tokens", "ce_tokens", "kl_sum", "confidence_sum", "ce_sum")


def micro_batches(turns: list, n: int) -> list[list]:
    """Split a list of turns into at most ``n`` contiguous, nearly equal micro-batches."""
    n = max(1, min(n, len(turns)))
    size = math.ceil(len(turns) / n) if turns else 0
    return [turns[i:i + size] for i in range(0, len(turns), size)] if turns else []


class LossPhase:
    """Accumulates the student's gradients of sum(w * l); ``loss`` holds the algorithm's loss options, ``xtok`` the
    cross-tokenizer alignment (``sage_opd.build.ModelPlan.xtok``; None: teacher and student share a tokenizer)."""

    def __init__(self, student: Student, teacher, loss: LossConfig, grad_accum: int, xtok=None):
        self.student, self.teacher, self.loss, self.grad_accum, self.xtok = student, teacher, loss, grad_accum, xtok

    def __call__(self, turns: list[TurnRecord], scores: Scores, timer: PhaseTimer | None = None) -> dict[str, float]:
        """Backpropagate sum(w * l) over ``turns``; return the sums ``SUMS`` (this rank's)."""
        timer = timer or PhaseTimer()
        student, loss, device, vocab = self.student, self.loss, self.student.dist.device, self.student.vocab
        sums = Counter(tokens=sum(len(t.token_ids) for t in turns))
        kept = [(t, i, im) for t, i, im in zip(turns, scores.interventions, scores.imitated) if (i > 0 or im)
                and t.token_ids]
        parts: list = micro_batches(kept, self.grad_accum)
        if student.dist.strategy == "fsdp":  # FSDP collectives: every rank runs as many passes as the busiest
            most = torch.tensor(len(parts))
            dist.all_reduce(most, op=dist.ReduceOp.MAX)
            parts += [None] * (int(most) - len(parts))
        for part in parts:
            if part is None:
                student.empty_pass()
                continue
            batch = make_batch([t for t, _, _ in part], student.pad_id, device)
            is_imitated = torch.tensor([im for _, _, im in part], device=device)
            weights = torch.tensor([i for _, i, _ in part], dtype=torch.float32, device=device)
            teacher = span = None
            if not bool(is_imitated.all()):
                with timer("teacher"):
                    teacher, span = teacher_scores(self.teacher, batch, vocab, [t for t, _, _ in part], self.xtok)
            with timer("loss"):
                s_hidden, s_weight = student.hidden(batch)
                res: MicroResult = micro_batch_loss(s_hidden, s_weight[:vocab], teacher, batch.turn_index,
                                                    batch.target_ids, weights, is_imitated,
                                                    token_loss=loss.token_loss, confidence=loss.confidence,
                                                    jsd_beta=loss.jsd_beta, chunk_tokens=loss.chunk_tokens,
                                                    cross_tokenizer=loss.cross_tokenizer, uld_top_k=loss.uld_top_k,
                                                    student_span=span)
                res.weighted_loss.backward()
                if loss.token_loss != "reverse_kl" and isinstance(teacher, DenseTeacher):
                    res.kl_sum = reverse_kl_sum(s_hidden.detach(), s_weight[:vocab].detach(), teacher.hidden,
                                                teacher.weight, batch.turn_index, is_imitated, weights,
                                                loss.chunk_tokens)
                elif isinstance(teacher, AlignedTeacher):  # the options' values are not KLs: the shared-vocabulary KL
                    res.kl_sum = shared_kl_sum(s_hidden.detach(), s_weight[:vocab].detach(), teacher, span,
                                               batch.turn_index, is_imitated, weights, loss.chunk_tokens)
                elif loss.token_loss != "reverse_kl":
                    res.kl_sum = float("nan")  # a server teacher gives top-k only: no full-vocabulary KL
            sums.update(weighted_loss=float(res.weighted_loss.detach()), weight_sum=res.weight_sum,
                        opd_tokens=res.opd_tokens, ce_tokens=res.ce_tokens, kl_sum=res.kl_sum,
                        confidence_sum=res.confidence_sum, ce_sum=res.ce_sum)
        return dict(sums)
