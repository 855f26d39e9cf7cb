"""What each training algorithm does, as data (SPEC section 4): who writes the rollout turns, which
turns are imitated (cross-entropy on their tokens) rather than distilled (the OPD token loss against
the teacher), whether the teacher judges turns, which loss options apply and whether the teacher may
have its own tokenizer. The trainer's phases read an ``Algorithm``; nothing else branches on the
algorithm's name.

| algorithm    | rollout turns written by            | imitated turns | loss options            | teacher's tokenizer   |
|--------------|-------------------------------------|----------------|-------------------------|-----------------------|
| `opd`        | the student                         | none           | i = 1, c = 1, sum(l)/N  | any (cross_tokenizer) |
| `sage_opd`   | the student                         | none           | the config's (judge...) | any (cross_tokenizer) |
| `guided_opd` | the teacher with probability beta_s | the teacher's  | i = 1, c = 1, sum(l)/N  | the student's         |
| `sft`        | the env's expert, or the teacher    | all            | cross-entropy, sum/N    | the student's         |
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # config imports this module; the loss options are only read here
    from sage_opd.config import LossConfig


def guided_beta(step: int, total_steps: int, rho: float = 0.8) -> float:
    """Guided-OPD teacher probability: 0.5 (1 + cos(pi min(s / (rho S), 1))), from 1 down to 0."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step / (rho * total_steps), 1.0)))


@dataclass(frozen=True)
class Algorithm:
    """One training algorithm.

    ``writer``: who writes the rollout turns (``guided``: the teacher with probability beta_s, else the
    student). ``imitate_all``: every turn is imitated (SFT); otherwise teacher and expert turns are.
    ``selective``: the config's intervention, confidence and normalisation apply (SAGE-OPD); otherwise
    standard OPD's: i = 1, c = 1 and L = sum(l) / N."""

    name: str
    writer: Literal["student", "guided", "teacher", "expert"]
    imitate_all: bool = False
    selective: bool = False

    @property
    def teacher_writes(self) -> bool:
        """The teacher generates rollout turns (with token ids): it must run in process, not behind a server."""
        return self.writer in ("guided", "teacher")

    @property
    def needs_teacher(self) -> bool:
        return self.teacher_writes or not self.imitate_all

    @property
    def any_teacher_tokenizer(self) -> bool:
        """The teacher may have another tokenizer than the student's (``loss.cross_tokenizer``): it only scores and
        judges student turns, re-rendered as text for it; a teacher that writes turns must write the student's ids."""
        return not self.teacher_writes

    def imitates(self, source: str) -> bool:
        """Whether a turn written by ``source`` (student, teacher, expert) is trained by cross-entropy."""
        return self.imitate_all or source in ("teacher", "expert")

    def teacher_prob(self, step: int, total_steps: int, rho: float) -> float:
        """The probability that the teacher writes a turn of this step's rollouts."""
        return {"guided": guided_beta(step, total_steps, rho), "teacher": 1.0}.get(self.writer, 0.0)

    def loss_options(self, loss: LossConfig) -> LossConfig:
        """The loss options this algorithm trains with: the config's for SAGE-OPD, standard OPD's otherwise
        (``normalization: standard`` is sum(l) / N, see ``sage_opd.losses.loss_denominator``)."""
        if self.selective:
            return loss
        return dataclasses.replace(loss, intervention="all", confidence="none", normalization="standard")

    def judges(self, loss: LossConfig) -> bool:
        """Whether the teacher judges turns (i_t from ``sage_opd.judge``, Yes/No or graded by ``loss.judge_mode``)
        rather than i_t = 1."""
        return self.selective and loss.intervention != "all"


ALGORITHMS = {
    "opd": Algorithm("opd", "student"),
    "sage_opd": Algorithm("sage_opd", "student", selective=True),
    "guided_opd": Algorithm("guided_opd", "guided"),
    "sft": Algorithm("sft", "expert", imitate_all=True),
}


def algorithm_for(name: str, sft_source: str = "expert") -> Algorithm:
    """The ``Algorithm`` called ``name``; SFT's turns are written by ``sft_source`` (expert or teacher)."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; accepted: {', '.join(ALGORITHMS)}")
    algorithm = ALGORITHMS[name]
    return dataclasses.replace(algorithm, writer=sft_source) if name == "sft" else algorithm
