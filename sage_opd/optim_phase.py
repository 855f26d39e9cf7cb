"""The optimiser step: sum the gradients and loss sums over ranks, divide the gradients by the batch-wide
denominator D (``sage_opd.losses.loss_denominator``: sum(w) for ``preserve``, N for ``none`` and
standard OPD), clip, step, advance the schedule. With D ~ 0 (no turn selected) no update is made."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from sage_opd.losses import loss_denominator
from sage_opd.loss_phase import SUMS
from sage_opd.parallel import DistInfo, all_reduce_gradients, to_float


def optimizer_step(sums: dict[str, float], params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                   scheduler, normalization: str, max_grad_norm: float, dist_info: DistInfo | None = None,
                   step: int = 0) -> dict[str, float]:
    """Sum gradients and statistics over ranks, normalise by sum(w) (or N), clip and step; return the step's
    loss metrics (``loss`` = sum(w l) / D, ``kl``, ``confidence_mean``, ``ce``, ``grad_norm``, ``lr``, ...)."""
    dist_info = dist_info or DistInfo()
    totals = torch.tensor([float(sums.get(k, 0.0)) for k in SUMS], dtype=torch.float64)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if dist_info.world > 1:
        dist.all_reduce(totals)
        if dist_info.strategy == "ddp":
            all_reduce_gradients(params)
    t = dict(zip(SUMS, totals.tolist()))
    denom = loss_denominator(normalization, t["weight_sum"], t["tokens"])
    out = {"loss": t["weighted_loss"] / denom if denom is not None else 0.0, "no_update": int(denom is None),
           "response_tokens": int(t["tokens"]), "weight_sum": t["weight_sum"],
           "kl": t["kl_sum"] / t["opd_tokens"] if t["opd_tokens"] else None,
           "confidence_mean": t["confidence_sum"] / t["opd_tokens"] if t["opd_tokens"] else None,
           "ce": t["ce_sum"] / t["ce_tokens"] if t["ce_tokens"] else None,
           "lr": scheduler.get_last_lr()[0], "grad_norm": 0.0}
    if denom is None:
        if dist_info.main:
            print(f"step {step + 1}: sum of weights is ~0 (no turn selected): no update this step")
    else:
        # fsdp's reduce-scatter averages over ranks; ddp (above) summed
        scale = (dist_info.world if dist_info.strategy == "fsdp" else 1) / denom
        for p in params:
            p.grad.mul_(scale)
        out["grad_norm"] = to_float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
        optimizer.step()
    with warnings.catch_warnings():  # a skipped step still advances the schedule (it counts steps)
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return out
