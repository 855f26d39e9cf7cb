"""The score phase: the ids of scripted turns (the student's chat template), and i_t for every turn:
SAGE-OPD's judge on distilled turns (invalid turns short-circuit to i = 1 with no teacher call),
1 everywhere else. Teacher log-probabilities are read per micro-batch by the loss phase
(``teacher_scores``), so only one micro-batch's teacher states are alive at a time: on the student's
own ids, or, for a teacher with another tokenizer, at the teacher's own tokens of each turn
re-rendered with its chat template and aligned with the student's (``sage_opd.xtok``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from sage_gym.formatting import INVALID_REASONS
from sage_models import chat_ids, derive_seed
from sage_opd.algorithm import Algorithm
from sage_opd.losses import DenseTeacher
from sage_opd.records import TurnRecord
from sage_opd.teacher import make_batch
from sage_opd.xtok import span_ids
from sage_opd.xtok_losses import AlignedTeacher


@dataclass
class Scores:
    """What the score phase decided for a step's turns (aligned with them)."""

    interventions: list[float]  # i_t (1 for imitated turns)
    imitated: list[bool]  # trained by cross-entropy rather than OPD
    stats: dict[str, Any] = field(default_factory=dict)  # judge_calls, short_circuit/<reason> (distilled turns)

    @property
    def distilled(self) -> list[float]:
        """i_t of the distilled turns."""
        return [i for i, imitated in zip(self.interventions, self.imitated) if not imitated]


class ScorePhase:
    """Scores turns with the algorithm's rules and the judge (None: every i_t is 1). ``on_judged(step, turns,
    result)`` receives each judged batch (the run log's judge_turns.jsonl)."""

    def __init__(self, algorithm: Algorithm, judge, tokenizer, seed: int, rank: int = 0,
                 on_judged: Callable[[int, list[TurnRecord], Any], None] | None = None):
        self.algorithm, self.judge, self.tokenizer = algorithm, judge, tokenizer
        self.seed, self.rank, self.on_judged = seed, rank, on_judged

    def tokenize(self, turns: list[TurnRecord]) -> None:
        """Fill the ids of scripted (expert) turns with the student's chat template; model turns keep theirs."""
        for t in turns:
            if t.prompt_ids and (t.token_ids or not t.text):
                continue
            t.prompt_ids = chat_ids(self.tokenizer, t.messages)
            t.token_ids = self.tokenizer(t.text, add_special_tokens=False)["input_ids"]

    def __call__(self, turns: list[TurnRecord], step: int) -> Scores:
        """i_t for every turn: the judge for ``sage_opd`` (short-circuiting invalid turns), else 1."""
        self.tokenize(turns)
        imitated = [self.algorithm.imitates(t.source) for t in turns]
        distilled = [t for t, im in zip(turns, imitated) if not im]
        # invalid turns by reason, for every algorithm: they get i = 1 with no teacher call (short circuit)
        stats: dict[str, Any] = {"judge_calls": 0, **{f"short_circuit/{r}": sum(t.invalid_reason == r for t in distilled)
                                                      for r in INVALID_REASONS}}
        if self.judge is None or not distilled:
            return Scores([1.0] * len(turns), imitated, stats)
        from sage_opd.judge import JudgeTurn

        self.judge.rng.seed(derive_seed(self.seed, step, self.rank, 31))
        result = self.judge([JudgeTurn(t.task, t.messages, t.text, t.feedback, t.invalid_reason) for t in distilled])
        decided = iter(result.interventions)
        interventions = [1.0 if im else next(decided) for im in imitated]
        if self.on_judged is not None:
            self.on_judged(step, distilled, result)
        stats["judge_calls"] = result.stats.judge_calls
        return Scores(interventions, imitated, stats)


def teacher_scores(teacher, batch, vocab: int, turns: list[TurnRecord] | None = None, xtok=None):
    """The teacher's scores of a micro-batch of ``turns`` (``batch``: their student ids) and the student's span ids.

    One tokenizer (``xtok`` None): the scores of the student's own ids (an in-process teacher's head cut to the
    tokenizer's ``vocab`` rows) and None. Across tokenizers (``xtok``, a ``sage_opd.xtok.CrossTokenizer``): an
    ``AlignedTeacher`` at the teacher's own tokens of each turn re-rendered with its chat template, and the span of
    each student response token [N] (``sage_opd.xtok.span_ids``)."""
    if xtok is None:
        scores = teacher.score(batch)
        if isinstance(scores, DenseTeacher):
            scores = DenseTeacher(scores.hidden, scores.weight[:vocab])
        return scores, None
    aligned = xtok.teacher_turns(turns)
    tok, device = xtok.teacher_tok, batch.input_ids.device
    t_batch = make_batch([a.teacher for a in aligned], tok.pad_token_id if tok.pad_token_id is not None
                         else tok.eos_token_id, device)
    scores, mask = teacher.score(t_batch), t_batch.response_mask
    student_span, teacher_span = span_ids(aligned)
    return (AlignedTeacher(scores.hidden[mask], scores.weight[:len(tok)], t_batch.target_ids[mask],
                           teacher_span.to(device), xtok.shared), student_span.to(device))
