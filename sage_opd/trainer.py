"""The SAGE-OPD trainer: every step is rollout -> score -> loss -> optimiser step, then log, evaluate and
checkpoint. Each phase is a module that can be built and tested alone:

    build       sage_opd.build          teacher path (same tokenizer or across tokenizers), student (LoRA, FSDP
                                        copy), teacher, judge, optimiser from the config
    rollout     sage_opd.rollout_phase  the step's episodes, written as the algorithm says; vLLM engine sync
    score       sage_opd.score_phase    ids of scripted turns, i_t per turn (the judge)
    loss        sage_opd.loss_phase     backpropagate sum(w l) in micro-batches (teacher scores per micro-batch,
                                        aligned with the student's across tokenizers)
    optimiser   sage_opd.optim_phase    divide by D (sum(w) or N), clip, step
    checkpoint  sage_opd.checkpoint     log  sage_opd.run_log     evaluate  sage_opd.evaluation

What each algorithm does (who writes turns, which are imitated, which loss options, whether the
teacher may have its own tokenizer) is data in ``sage_opd.algorithm``. Data parallel: under
``torchrun`` every rank collects its share of the step's episodes; gradients of sum(w * l) are
summed over micro-batches and ranks, then divided by the batch-wide denominator, so the update does
not depend on how the batch was split. Everything random is seeded from (seed, step): a resumed run
repeats an uninterrupted one.

>>> from sage_opd.config import load_config
>>> Trainer(load_config("configs/tiny_sage_opd_alfworld.yaml")).train()
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from sage_gym.durable import FolderLock
from sage_gym.errors import SageError
from sage_gym.formatting import INVALID_REASONS
from sage_models import derive_seed
from sage_opd.algorithm import algorithm_for
from sage_opd.build import ModelTooLargeError, build, check_models, resolve_dtype
from sage_opd.checkpoint import Checkpoints
from sage_opd.config import ConfigError, TrainConfig, save_config
from sage_opd.evaluation import evaluate_student
from sage_opd.loss_phase import LossPhase
from sage_opd.losses import DenseTeacher
from sage_opd.objective import turn_reverse_kl
from sage_opd.optim_phase import optimizer_step
from sage_opd.parallel import DistInfo, init_distributed
from sage_opd.records import RolloutBatch, TurnRecord
from sage_opd.rollout import check_train_split
from sage_opd.rollout_phase import RolloutPhase
from sage_opd.run_log import PhaseTimer, RunLog
from sage_opd.score_phase import Scores, ScorePhase, teacher_scores
from sage_opd.teacher import make_batch
from sage_opd.xtok_losses import AlignedTeacher, shared_vocab_kl


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


class Trainer:
    """Trains a student with ``opd``, ``sage_opd``, ``guided_opd`` or ``sft`` (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, resume: bool = False):
        self.cfg, self.algorithm = cfg, algorithm_for(cfg.algorithm, cfg.sft.source)
        self.loss = self.algorithm.loss_options(cfg.loss)
        self.dist = init_distributed(cfg.dist.strategy)
        dtype = resolve_dtype(cfg.optim.dtype, self.dist.device)
        self.out_dir, self.step = Path(cfg.log.out_dir), 0
        self.checkpoints = Checkpoints(self.out_dir, self.dist, cfg.log.keep_checkpoints)
        self.run_log = RunLog(self.out_dir, cfg.log, self.dist.main, cfg.to_dict())
        if not resume:
            self.checkpoints.refuse_existing_run(self.run_log.metrics_path)
        if cfg.rollout.env_id and not cfg.rollout.from_file:
            check_train_split(cfg.rollout.env_id)
        set_seed(cfg.optim.seed)
        plan = check_models(cfg, self.algorithm, self.dist, dtype)  # teacher path decided, memory checked
        self.xtok = plan.xtok  # None: teacher and student share a tokenizer
        if cfg.log.kl_by_turn and self.xtok is not None:
            raise ConfigError("log.kl_by_turn needs a teacher that shares the student's tokenizer; this teacher's "
                              "differs (cross-tokenizer OPD logs only the shared-vocabulary kl)")

        self._lock = FolderLock(self.out_dir, "sage train").acquire() if self.dist.main else None
        self.resumed_from = self.checkpoints.latest() if resume else None  # None: from the start
        if resume and self.resumed_from is None and self.dist.main:
            print(f"--resume: no checkpoint under {self.checkpoints.folder}; starting from step 0")
        built = build(cfg, self.algorithm, self.loss, plan, self.dist, dtype, self.resumed_from)
        self.student, self.teacher, self.judge = built.student, built.teacher, built.judge
        self.optimizer, self.scheduler = built.optimizer, built.scheduler
        if plan.route and self.dist.main:
            print(plan.route)
        self.rollouts = RolloutPhase(cfg, self.algorithm, self.student, self.teacher, self.dist, self.out_dir)
        self.scorer = ScorePhase(self.algorithm, self.judge, self.student.tokenizer, cfg.optim.seed, self.dist.rank,
                                 on_judged=self.run_log.judged)
        self.losses = LossPhase(self.student, self.teacher, self.loss, cfg.optim.grad_accum, self.xtok)
        if self.resumed_from is not None:
            self.step = self.checkpoints.load(self.resumed_from, cfg, self.student, self.optimizer, self.scheduler,
                                              self.judge)
        if self.dist.main:
            save_config(cfg, self.out_dir / "config.yaml")
            self.run_log.truncate(self.step)

    @property
    def model(self):
        """The trained student module (FSDP-sharded under ``dist.strategy=fsdp``)."""
        return self.student.model

    # ---- the loop ------------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, Any]:
        """One full step; returns the metrics logged for it (identical on every rank)."""
        timer, start = PhaseTimer(), time.perf_counter()
        set_seed(derive_seed(self.cfg.optim.seed, step, self.dist.rank))
        with timer("rollout"):
            batch = self.rollouts.collect(step)
        with timer("judge"):
            scores = self.scorer(batch.turns, step)
        kl_groups = {}
        if self.cfg.log.kl_by_turn:
            with timer("kl_by_turn"):
                kl_groups = self.kl_by_turn(batch.turns, scores)
        try:
            sums = self.losses(batch.turns, scores, timer)
        except torch.OutOfMemoryError as err:
            raise ModelTooLargeError(f"out of memory in the training step ({err}). Lower optim.grad_accum's "
                                     "micro-batch size (raise optim.grad_accum), rollout.max_new_tokens, use "
                                     "student.lora.enabled=true or student.gradient_checkpointing=true.") from err
        with timer("optim"):
            metrics = optimizer_step(sums, self.student.parameters(), self.optimizer, self.scheduler,
                                     self.loss.normalization, self.cfg.optim.max_grad_norm, self.dist, step)
            metrics.update(step=step + 1, **batch_counts(batch, scores, self.dist), **kl_groups)  # steps done
        if self.algorithm.writer == "guided":
            metrics["beta"] = self.algorithm.teacher_prob(step, self.cfg.optim.steps, self.cfg.guided.rho)
        metrics.update(self.rollouts.metrics(step))
        metrics.update({f"time/{k}": round(v, 4) for k, v in timer.seconds.items()})
        metrics["time/step"] = round(time.perf_counter() - start, 4)
        return metrics

    def train(self, on_step: Callable[[dict[str, Any]], None] | None = None,
              until: int | None = None) -> list[dict[str, Any]]:
        """Run from ``self.step`` to ``optim.steps`` (or stop after step ``until``, like a pre-empted job);
        checkpoint every ``log.save_every`` steps and at the end."""
        cfg, history = self.cfg, []
        last = min(cfg.optim.steps, until) if until is not None else cfg.optim.steps
        try:
            while self.step < last:
                metrics = self.train_step(self.step)
                self.step += 1
                if cfg.eval.every and self.step % cfg.eval.every == 0:
                    self.student.sync_rollout_model()  # fsdp: every rank gathers; rank 0 evaluates the full copy
                    if self.dist.main:
                        start = time.perf_counter()
                        metrics.update(evaluate_student(self.student, cfg.eval, cfg.student.path, self.out_dir,
                                                        self.step))
                        metrics["time/eval"] = round(time.perf_counter() - start, 4)
                self.run_log.log(metrics)
                history.append(metrics)
                if on_step is not None:
                    on_step(metrics)
                if self.step == last or (cfg.log.save_every and self.step % cfg.log.save_every == 0):
                    self.checkpoints.save(self.step, self.student, self.optimizer, self.scheduler, self.judge,
                                          cfg.to_dict())
        finally:
            self.close()
        return history

    # ---- analysis ------------------------------------------------------------------------------------
    @torch.no_grad()
    def token_kl(self, turns: list[TurnRecord], batch_size: int = 8) -> float:
        """Mean reverse KL(student || teacher) per response token over ``turns`` (e.g. held-out turns); across
        tokenizers, on the shared vocabulary over the tokens of one-to-one spans."""
        if self.xtok is None:
            kl, tokens = self.turn_kl(turns, batch_size)
            return float(kl.sum()) / max(int(tokens.sum()), 1)
        total, count, student, device = 0.0, 0, self.student, self.dist.device
        turns = [t for t in turns if t.token_ids]
        for lo in range(0, len(turns), batch_size):
            part = turns[lo:lo + batch_size]
            batch = make_batch(part, student.pad_id, device)
            teacher, span = teacher_scores(self.teacher, batch, student.vocab, part, self.xtok)
            if not isinstance(teacher, AlignedTeacher):
                raise SageError("token_kl needs an in-process teacher (full vocabulary)")
            s_hidden, s_weight = student.hidden(batch)
            kl, n = shared_vocab_kl(s_hidden[batch.response_mask], s_weight[:student.vocab], span, teacher,
                                    self.loss.chunk_tokens)
            total, count = total + kl, count + n
        return total / max(count, 1)

    @torch.no_grad()
    def turn_kl(self, turns: list[TurnRecord], batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        """Per turn of ``turns``: (sum of the token reverse KL(student || teacher), response tokens), two CPU
        tensors; needs an in-process teacher that shares the student's tokenizer."""
        student, device = self.student, self.dist.device
        kl, tokens = torch.zeros(len(turns)), torch.zeros(len(turns), dtype=torch.long)
        scored = [k for k, t in enumerate(turns) if t.token_ids]
        for lo in range(0, len(scored), batch_size):
            index = scored[lo:lo + batch_size]
            part = [turns[k] for k in index]
            batch = make_batch(part, student.pad_id, device)
            teacher, _ = teacher_scores(self.teacher, batch, student.vocab, part, None)
            if not isinstance(teacher, DenseTeacher):
                raise SageError("turn_kl needs an in-process teacher (full vocabulary) that shares the student's "
                                "tokenizer")
            s_hidden, s_weight = student.hidden(batch)
            part_kl, part_tokens = turn_reverse_kl(s_hidden, s_weight[:student.vocab], teacher.hidden, teacher.weight,
                                                   batch.turn_index, len(part), self.loss.chunk_tokens)
            kl[index], tokens[index] = part_kl.cpu(), part_tokens.cpu()
        return kl, tokens

    def kl_by_turn(self, turns: list[TurnRecord], scores: Scores) -> dict[str, float | None]:
        """``log.kl_by_turn``: the mean token KL to the teacher on the step's distilled turns that the loss keeps
        (i > 0) and skips (i = 0), and on those whose action is the env's expert move or not (envs with expert
        labels), before the update. Each is None when the step has no such turn (summed over ranks)."""
        distilled = [(t, i) for t, i, im in zip(turns, scores.interventions, scores.imitated) if not im]
        kl, tokens = self.turn_kl([t for t, _ in distilled])
        groups = {"kept": [i > 0 for _, i in distilled], "skipped": [i == 0 for _, i in distilled],
                  "expert_same": [t.expert_action is not None and t.action == t.expert_action for t, _ in distilled],
                  "expert_other": [t.expert_action is not None and t.action != t.expert_action for t, _ in distilled]}
        sums = torch.tensor([[float(kl[torch.tensor(m, dtype=torch.bool)].sum()),
                              float(tokens[torch.tensor(m, dtype=torch.bool)].sum())] for m in groups.values()],
                            dtype=torch.float64)
        if self.dist.world > 1:
            sums = sums.to(self.dist.device)
            dist.all_reduce(sums)
        return {f"kl/{name}": (total / n if n else None) for name, (total, n) in zip(groups, sums.tolist())}

    def close(self) -> None:
        self.rollouts.close()
        self.run_log.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def batch_counts(batch: RolloutBatch, scores: Scores, dist_info: DistInfo) -> dict[str, Any]:
    """The step's rollout and judge statistics, summed over ranks: intervention rate on distilled turns, judge
    calls, short circuits by reason, turns, teacher turns, episodes and rollout success."""
    turns, distilled = batch.turns, scores.distilled
    local = torch.tensor([sum(distilled), len(distilled), len(turns), sum(t.source == "teacher" for t in turns),
                          sum(ep.won for ep in batch.episodes), len(batch.episodes), scores.stats["judge_calls"],
                          *[scores.stats[f"short_circuit/{r}"] for r in INVALID_REASONS]], dtype=torch.float64)
    if dist_info.world > 1:
        dist.all_reduce(local)
    (i_sum, n_distilled, n_turns, n_teacher, wins, n_eps, calls, *short) = local.tolist()
    return {"intervention_rate": i_sum / n_distilled if n_distilled else None, "judge_calls": int(calls),
            **{f"short_circuit/{r}": int(n) for r, n in zip(INVALID_REASONS, short)},
            "turns": int(n_turns), "teacher_turns": int(n_teacher), "episodes": int(n_eps),
            "rollout_success": wins / n_eps if n_eps else None}
