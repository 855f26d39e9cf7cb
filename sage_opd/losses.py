"""SAGE-OPD losses (SPEC section 4): token losses, teacher confidence, weighting and normalisation.

Plain functions of tensors, TRL style. Nothing here knows about environments or models.

Chunked objective (what the trainer calls; never builds a [tokens x vocab] tensor of the batch)::

    opd_loss(student_hidden [..., H], student_weight [V, H], teacher: DenseTeacher | SparseTeacher,
             *, mask [...] bool = None, target_ids [...] long = None, intervention [...] float = None,
             token_loss="reverse_kl", confidence="entropy", normalization="preserve",
             beta=0.5, chunk_size=256) -> OpdLoss(loss, no_update, num_tokens, weight_sum, token_loss_mean,
                                                  confidence_mean, intervention_mean, weighted_sum)
    DenseTeacher(hidden [..., Ht], weight [V, Ht])       # in-process teacher: full vocabulary
    SparseTeacher(ids [..., k], logprobs [..., k], token_logprobs [...])  # remote teacher: top-k only
    # a teacher is anything with num_tokens(), select(mask) and chunk_loss(...) -> (loss, dl/dz, confidence)

``student_hidden`` are the final hidden states (after the last norm) at the positions that
predict each token, ``student_weight`` the lm_head weight; ``mask`` selects the positions
that predict the student's response tokens (prompt and environment tokens are dropped);
``intervention`` is the turn's i_t repeated over its tokens; ``target_ids`` are the response
tokens themselves (needed by ``sampled``).

Unchunked reference functions on logits (the definitions; used by tests and the benchmark)::

    token_losses(student_logits [N, V], teacher_logits [N, V], kind, target_ids=None, beta=0.5) -> [N]
    teacher_confidence(teacher_logits [N, V], kind) -> [N]          # no gradient
    normalize(token_losses [N], weights [N], mode) -> (loss, no_update)
    loss_denominator(mode, weight_sum, num_tokens) -> D or None    # L = sum(w l) / D: the one place D is chosen
    reference_opd_loss(student_logits, teacher_logits, ...) -> OpdLoss

How the chunked objective stays cheap: the weights w = i * c are stop-gradient and known per
chunk, so the gradient of sum(w * l) with respect to the student logits is computed chunk by
chunk in the forward pass and immediately folded into the gradients of the hidden states
([N, H]) and of the head weight ([V, H]); the backward pass only scales them. Peak memory is
a few [chunk x V] tensors, and the matmuls are the same four as the naive version (teacher
logits, student logits, two gradient products), so there is no recomputation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

TOKEN_LOSSES = ("reverse_kl", "sampled", "forward_kl", "jsd")
CONFIDENCES = ("entropy", "maxprob", "none")
NORMALIZATIONS = ("preserve", "none")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Softmax arithmetic runs in fp32 (fp64 inputs stay fp64, for gradient checks)."""
    return x if x.dtype == torch.float64 else x.float()


def _check(name: str, value: str, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ValueError(f"unknown {name} {value!r}; accepted: {', '.join(accepted)}")


# --------------------------------------------------------------------------------------------
# Per-token terms on log-probabilities, shared by the reference and the chunked implementation.
# Each returns the loss per row and its gradient with respect to the student logits.


def _jsd_mixture(logp: torch.Tensor, logq: torch.Tensor, beta: float) -> torch.Tensor:
    """log m with m = beta * q + (1 - beta) * p (TRL's generalised JSD mixture)."""
    return torch.logaddexp(logp + math.log1p(-beta), logq + math.log(beta))


def _loss_and_grad(logp: torch.Tensor, logq: torch.Tensor, kind: str, target: torch.Tensor | None,
                   logq_target: torch.Tensor | None, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss l [C] and dl/dz [C, V'] for student log-probs ``logp`` (= log_softmax(z)) and teacher ``logq``.

    The softmax Jacobian gives dl/dz = p * (g - <p, g>) where g = dl/dp; ``sampled`` uses the
    policy-gradient surrogate A * d log p(y)/dz = A * (onehot(y) - p) with A = log p(y) - log q(y).
    """
    p = logp.exp()
    if kind == "sampled":
        adv = logp.gather(1, target[:, None]).squeeze(1) - logq_target
        grad = p.mul_(-adv[:, None])
        grad.scatter_add_(1, target[:, None], adv[:, None])
        return adv, grad
    if kind == "jsd" and beta == 0.0:
        kind = "forward_kl"
    if kind == "jsd" and beta == 1.0:
        kind = "reverse_kl"
    if kind == "reverse_kl":
        g = logp - logq
        loss = (p * g).sum(-1)
        return loss, g.sub_(loss[:, None]).mul_(p)
    if kind == "forward_kl":
        q = logq.exp()
        loss = (q * (logq - logp)).sum(-1)
        return loss, p.sub_(q)
    if kind == "jsd":
        logm = _jsd_mixture(logp, logq, beta)
        q = logq.exp()
        loss = beta * (q * (logq - logm)).sum(-1)
        g = (logp - logm).mul_(1.0 - beta)
        loss += (p * g).sum(-1)
        return loss, g.sub_((p * g).sum(-1, keepdim=True)).mul_(p)
    raise ValueError(f"unknown token_loss {kind!r}; accepted: {', '.join(TOKEN_LOSSES)}")


def _confidence(logq: torch.Tensor, kind: str, log_vocab: float) -> torch.Tensor:
    """c [C] from teacher log-probs: entropy 1 - H(q)/log|V|, maxprob max q, none 1."""
    if kind == "none":
        return torch.ones(logq.shape[0], dtype=logq.dtype, device=logq.device)
    if kind == "maxprob":
        return logq.max(-1).values.exp()
    if kind == "entropy":
        entropy = -(logq.exp() * logq).sum(-1)
        return (1.0 - entropy / log_vocab).clamp(0.0, 1.0)
    raise ValueError(f"unknown confidence {kind!r}; accepted: {', '.join(CONFIDENCES)}")


# --------------------------------------------------------------------------------------------
# Unchunked reference implementations (plain autograd on full logits).


def token_losses(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "reverse_kl",
               target_ids: torch.Tensor | None = None, beta: float = 0.5) -> torch.Tensor:
    """Per-token loss [N] from full logits [N, V]; differentiable in the student logits.

    reverse_kl: sum_v p (log p - log q); forward_kl: sum_v q (log q - log p);
    jsd: beta KL(q||m) + (1-beta) KL(p||m), m = beta q + (1-beta) p (beta 0 / 1: forward / reverse KL, as TRL);
    sampled: the value is A = log p(y) - log q(y), the gradient is that of sg(A) * log p(y).
    """
    _check("token_loss", kind, TOKEN_LOSSES)
    logp = F.log_softmax(_upcast(student_logits), -1)
    logq = F.log_softmax(_upcast(teacher_logits), -1).detach()
    if kind == "sampled":
        if target_ids is None:
            raise ValueError("token_loss='sampled' needs target_ids (the sampled response tokens)")
        logp_y = logp.gather(1, target_ids[:, None]).squeeze(1)
        adv = (logp_y - logq.gather(1, target_ids[:, None]).squeeze(1)).detach()
        return adv + adv * (logp_y - logp_y.detach())
    if kind == "jsd" and 0.0 < beta < 1.0:
        logm = _jsd_mixture(logp, logq, beta)
        return beta * (logq.exp() * (logq - logm)).sum(-1) + (1 - beta) * (logp.exp() * (logp - logm)).sum(-1)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return (logq.exp() * (logq - logp)).sum(-1)
    return (logp.exp() * (logp - logq)).sum(-1)


@torch.no_grad()
def teacher_confidence(teacher_logits: torch.Tensor, kind: str = "entropy") -> torch.Tensor:
    """Teacher confidence c [N] in [0, 1] (stop-gradient): entropy 1 - H(q)/log|V|, maxprob max_v q(v), none 1."""
    _check("confidence", kind, CONFIDENCES)
    logq = F.log_softmax(_upcast(teacher_logits), -1)
    return _confidence(logq, kind, math.log(logq.shape[-1]))


def loss_denominator(mode: str, weight_sum: float, num_tokens: int, eps: float = 1e-8) -> float | None:
    """D of L = sum(w l) / D (SPEC section 4): ``preserve`` sum(w); ``none`` N, the number of response tokens;
    ``standard`` (standard OPD, where every w is 1) N. None when D <= eps: there is nothing to learn from
    (every weight ~0, or no token), so no update is made."""
    _check("normalization", mode, (*NORMALIZATIONS, "standard"))
    denominator = float(weight_sum) if mode == "preserve" else float(num_tokens)
    return denominator if denominator > eps else None


def normalize(token_losses: torch.Tensor, weights: torch.Tensor, mode: str = "preserve",
              eps: float = 1e-8) -> tuple[torch.Tensor, bool]:
    """Weighted loss over N response tokens: preserve sum(w l)/sum(w), none sum(w l)/N.

    With nothing to normalise by (``loss_denominator`` is None: sum(w) <= eps under preserve, or no
    token) the loss is a zero that still backpropagates (zero gradients) and ``no_update`` is True,
    so the trainer can skip and log the step.
    """
    _check("normalization", mode, NORMALIZATIONS)
    weights = weights.detach()
    total = (weights * token_losses).sum()
    denominator = loss_denominator(mode, weights.sum(), token_losses.numel(), eps)
    if denominator is None:
        return total * 0.0, True
    return total / denominator, False


# --------------------------------------------------------------------------------------------
# Teacher inputs of the chunked loss.


@dataclass
class DenseTeacher:
    """An in-process teacher: final hidden states [..., Ht] and lm_head weight [V, Ht] (frozen)."""

    hidden: torch.Tensor
    weight: torch.Tensor

    def select(self, mask: torch.Tensor) -> DenseTeacher:
        return DenseTeacher(self.hidden[mask], self.weight)

    def num_tokens(self) -> int:
        return self.hidden.reshape(-1, self.hidden.shape[-1]).shape[0]

    def chunk_logprobs(self, start: int, end: int) -> torch.Tensor:
        """Teacher log-probs [C, V] (fp32) of rows start:end."""
        return F.log_softmax(_upcast(self.hidden[start:end].detach() @ self.weight.detach().T), -1)

    @torch.no_grad()
    def token_logprobs(self, target_ids: torch.Tensor, chunk_size: int = 256) -> torch.Tensor:
        """log q(y) [N] for flat hidden [N, Ht] and target ids [N], chunk by chunk."""
        out = [self.chunk_logprobs(s, s + chunk_size).gather(1, target_ids[s:s + chunk_size, None]).squeeze(1)
               for s in range(0, target_ids.shape[0], chunk_size)]
        return torch.cat(out) if out else target_ids.new_zeros(0, dtype=torch.float32)

    def chunk_loss(self, s: int, e: int, z: torch.Tensor, kind: str, conf_kind: str, target: torch.Tensor | None,
                   beta: float, log_vocab: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Loss [C], dl/dz [C, V] and confidence [C] of rows s:e, from the student logits z [C, V]."""
        logq = self.chunk_logprobs(s, e)
        logq_target = logq.gather(1, target[:, None]).squeeze(1) if kind == "sampled" else None
        return (*_loss_and_grad(F.log_softmax(z, -1), logq, kind, target, logq_target, beta),
                _confidence(logq, conf_kind, log_vocab))


@dataclass
class SparseTeacher:
    """A remote teacher's top-k prompt log-probs: ids [..., k], logprobs [..., k] and log q(y) [...].

    Approximation (remote teachers only): reverse/forward KL and JSD are computed on the teacher's
    top-k support S, with both p and q renormalised over S; ``entropy`` confidence uses the
    renormalised top-k distribution (a lower bound of the full entropy); ``maxprob`` and
    ``sampled`` (which needs only log q(y)) are exact.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    token_logprobs: torch.Tensor

    def select(self, mask: torch.Tensor) -> SparseTeacher:
        return SparseTeacher(self.ids[mask], self.logprobs[mask], self.token_logprobs[mask])

    def num_tokens(self) -> int:
        return self.ids.reshape(-1, self.ids.shape[-1]).shape[0]

    def chunk_loss(self, s: int, e: int, z: torch.Tensor, kind: str, conf_kind: str, target: torch.Tensor | None,
                   beta: float, log_vocab: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Loss [C], dl/dz [C, V] and confidence [C] of rows s:e on the top-k support (see the class docstring)."""
        logprobs = self.logprobs[s:e].to(z.dtype)
        logq_s = F.log_softmax(logprobs, -1)  # renormalised over S
        conf = logprobs.max(-1).values.exp() if conf_kind == "maxprob" else _confidence(logq_s, conf_kind, log_vocab)
        if kind == "sampled":
            return (*_loss_and_grad(F.log_softmax(z, -1), None, kind, target, self.token_logprobs[s:e].to(z.dtype),
                                    beta), conf)
        ids = self.ids[s:e]
        loss, grad_s = _loss_and_grad(F.log_softmax(z.gather(1, ids), -1), logq_s, kind, None, None, beta)
        return loss, torch.zeros_like(z).scatter_(1, ids, grad_s), conf


@dataclass
class OpdLoss:
    """The scalar loss to backpropagate and what the trainer logs about it."""

    loss: torch.Tensor
    no_update: bool  # preserve normalisation with sum(w) ~ 0: skip the optimizer step
    num_tokens: int  # N response tokens
    weight_sum: float  # sum(w)
    token_loss_mean: float  # mean token loss over the N tokens (unweighted)
    confidence_mean: float
    intervention_mean: float  # token-averaged i
    weighted_sum: torch.Tensor | None = None  # sum(w l), differentiable: what a caller normalising a larger batch adds


# --------------------------------------------------------------------------------------------
# The chunked objective.


class _ChunkedOpd(torch.autograd.Function):
    """sum(w * l) with gradients computed chunk by chunk in forward (w stop-gradient)."""

    @staticmethod
    def forward(ctx, hidden, weight, teacher, target_ids, intervention, kind, conf_kind, beta, chunk_size):
        n, v = hidden.shape[0], weight.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        losses = torch.zeros(n, dtype=acc, device=hidden.device)
        confs = torch.zeros(n, dtype=acc, device=hidden.device)
        weighted = hidden.new_zeros((), dtype=acc)
        log_vocab = math.log(v)
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            h = hidden[s:e]
            z = _upcast(h @ weight.T)
            target = target_ids[s:e] if target_ids is not None else None
            loss, grad, conf = teacher.chunk_loss(s, e, z, kind, conf_kind, target, beta, log_vocab)
            del z
            w = intervention[s:e].to(acc) * conf
            losses[s:e], confs[s:e] = loss, conf
            weighted += (w * loss).sum()
            grad.mul_(w[:, None])
            if need_h:
                grad_h[s:e] = (grad.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                grad_w.addmm_(grad.T, h.to(acc))
        weight_sum = (intervention.to(acc) * confs).sum()
        ctx.save_for_backward(grad_h if need_h else None, grad_w if need_w else None)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(losses, confs, weight_sum)
        return weighted, losses, confs, weight_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_losses, _grad_confs, _grad_wsum):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None,
                (grad_w * grad_loss).to(ctx.weight_dtype) if grad_w is not None else None,
                None, None, None, None, None, None, None)


def opd_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher: DenseTeacher | SparseTeacher,
             *, mask: torch.Tensor | None = None, target_ids: torch.Tensor | None = None,
             intervention: torch.Tensor | None = None, token_loss: str = "reverse_kl",
             confidence: str = "entropy", normalization: str = "preserve", beta: float = 0.5,
             chunk_size: int = 256, eps: float = 1e-8) -> OpdLoss:
    """The SAGE-OPD loss L = sum(w l) / sum(w) (preserve) or / N (none), w = i * c, chunked over tokens.

    Standard OPD is ``confidence="none"`` with i = 1 (``intervention=None``): L = sum(l) / N.
    ``mask`` (same leading shape as every per-token argument, teacher included) keeps only the
    positions that predict student response tokens. Gradients flow into ``student_hidden`` and,
    when it requires grad, ``student_weight``; the teacher is frozen. ``weighted_sum`` is sum(w l)
    before normalisation, for callers that normalise over a larger batch (``loss_denominator``).
    """
    _check("token_loss", token_loss, TOKEN_LOSSES)
    _check("confidence", confidence, CONFIDENCES)
    _check("normalization", normalization, NORMALIZATIONS)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    teacher_v = teacher.weight.shape[0] if isinstance(teacher, DenseTeacher) else None
    if teacher_v is not None and teacher_v != student_weight.shape[0]:
        raise ValueError(f"student and teacher heads have different vocabulary sizes ({student_weight.shape[0]} vs "
                         f"{teacher_v}); slice both lm_head weights to len(tokenizer) rows")
    if mask is not None:
        mask = mask.bool()
        student_hidden, teacher = student_hidden[mask], teacher.select(mask)
        target_ids = target_ids[mask] if target_ids is not None else None
        intervention = intervention[mask] if intervention is not None else None
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    n = hidden.shape[0]
    if teacher.num_tokens() != n:
        raise ValueError(f"teacher has {teacher.num_tokens()} tokens but the student {n}: both must be aligned "
                         "on the same positions (same mask)")
    if token_loss == "sampled" and target_ids is None:
        raise ValueError("token_loss='sampled' needs target_ids (the sampled response tokens)")
    target_ids = target_ids.reshape(-1) if target_ids is not None else None
    intervention = (intervention.reshape(-1).detach() if intervention is not None
                    else torch.ones(n, dtype=torch.float32, device=hidden.device))
    total, losses, confs, weight_sum = _ChunkedOpd.apply(hidden, student_weight, teacher, target_ids, intervention,
                                                         token_loss, confidence, beta, chunk_size)
    denominator = loss_denominator(normalization, weight_sum, n, eps)
    loss = total * 0.0 if denominator is None else total / denominator
    mean = (lambda x: float(x.mean()) if n else 0.0)
    return OpdLoss(loss=loss, no_update=denominator is None, num_tokens=n, weight_sum=float(weight_sum),
                   token_loss_mean=mean(losses), confidence_mean=mean(confs), intervention_mean=mean(intervention),
                   weighted_sum=total)


def reference_opd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, mask: torch.Tensor | None = None,
                       target_ids: torch.Tensor | None = None, intervention: torch.Tensor | None = None,
                       token_loss: str = "reverse_kl", confidence: str = "entropy",
                       normalization: str = "preserve", beta: float = 0.5, eps: float = 1e-8) -> OpdLoss:
    """The same objective from full logits [..., V], unchunked (the definition; memory-hungry)."""
    if mask is not None:
        mask = mask.bool()
        student_logits, teacher_logits = student_logits[mask], teacher_logits[mask]
        target_ids = target_ids[mask] if target_ids is not None else None
        intervention = intervention[mask] if intervention is not None else None
    student_logits = student_logits.reshape(-1, student_logits.shape[-1])
    teacher_logits = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    n = student_logits.shape[0]
    losses = token_losses(student_logits, teacher_logits, token_loss,
                          target_ids.reshape(-1) if target_ids is not None else None, beta)
    confs = teacher_confidence(teacher_logits, confidence)
    i = intervention.reshape(-1).float() if intervention is not None else torch.ones_like(confs)
    weights = i * confs
    loss, no_update = normalize(losses, weights, normalization, eps)
    return OpdLoss(loss=loss, no_update=no_update, num_tokens=n, weight_sum=float(weights.sum()),
                   token_loss_mean=float(losses.detach().mean()) if n else 0.0,
                   confidence_mean=float(confs.mean()) if n else 0.0, intervention_mean=float(i.mean()) if n else 0.0,
                   weighted_sum=(weights.detach() * losses).sum())

