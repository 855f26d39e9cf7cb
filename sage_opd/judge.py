"""The turn-level intervention judge of SAGE-OPD (SPEC section 4).

After the environment answered a student turn, the teacher reads a judgment prompt (the task,
the recent history, the student's response, the feedback that followed) and is asked whether
the response should be corrected. API used by the trainer::

    JudgeConfig(mode="judge", decision="hard", tau=0.5, weak_weight=0.5, history_messages=6, seed=0)
    judge = TurnJudge(teacher, tokenizer, config)    # teacher: HFTeacher or RemoteTeacher; its tokenizer
    result = judge(turns: list[JudgeTurn]) -> JudgeResult(interventions, p_yes, p_answers, stats)
    judge.answers, judge.answer_ids                    # ("Yes", "No") or ("Skip", "Weak", "Strong"); their token ids

Yes/No decisions (``hard``, ``soft``): p_yes = q(Yes) / (q(Yes) + q(No)) from ONE teacher
forward pass over the judgment prompt rendered with the teacher's chat template and its
generation prompt (thinking disabled), each answer's probability summed over its usual
spellings ("Yes", "yes", " Yes", " yes"). Graded decisions (``graded``, ``graded_hard``): the
prompt offers three answers, Skip, Weak and Strong, read the same way and normalised over the
three; p_yes = 1 - p_skip (the probability of any correction). A spelling's token is the first
token the tokenizer gives it right after that assistant prompt: the ids of ``render(prompt) +
spelling`` past the prompt's ids (falling back to the first id of the spelling encoded alone
when the prompt's ids are not a prefix); an id that starts spellings of two answers alike (e.g.
a bare space) is left out of both.

Decisions: ``hard`` i = 1[p_yes >= tau]; ``soft`` i = p_yes; ``graded`` i = weak_weight * p_weak +
p_strong; ``graded_hard`` i = (0, weak_weight, 1) of the most probable answer (argmax).
Modes: ``judge`` (i = the decision); ``all`` (i = 1, no teacher call: standard OPD); ``inverted``
(i = 1 - the judge's i); ``random`` (the judge runs on the batch to update its running
intervention rate r = mean judge i over every judged turn so far, this batch included; then
i ~ Bernoulli(r), independently of the judge's verdicts: a matched-rate control). ``floor`` f > 0 raises every
judged turn's i to at least f (0, the default, is SPEC's objective): turns the judge skips keep OPD at weight f.
Every mode short-circuits invalid turns (``empty``, ``unparseable``, ``schema_violation``):
i = 1 with no teacher call. No environment reward or success flag is ever read.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import torch

from sage_models import chat_text
from sage_gym.formatting import INVALID_REASONS

MODES = ("judge", "all", "random", "inverted")
DECISIONS = ("hard", "soft", "graded", "graded_hard")
GRADES = ("Skip", "Weak", "Strong")

JUDGE_SYSTEM = ("You are an expert supervising a student agent that acts in a text environment. "
                "You judge single turns of the student.")
_CONTEXT = """Task:
{task}

Recent history:
{history}

Student response:
{response}

Environment feedback after the response:
{feedback}

"""
JUDGE_TEMPLATE = _CONTEXT + "Should the student's response be corrected? Answer Yes or No."
GRADED_TEMPLATE = _CONTEXT + ("How much should the student's response be corrected? Answer Skip (not at all), "
                              "Weak (a little) or Strong (it is wrong).")


@dataclass
class JudgeTurn:
    """One student turn as the judge sees it; ``invalid_reason`` comes from the gym's parser."""

    task: str
    history: list[dict[str, str]]  # the chat messages before this response (system message dropped)
    response: str
    feedback: str
    invalid_reason: str | None = None


def judgment_messages(turn: JudgeTurn, history_messages: int, template: str = JUDGE_TEMPLATE) -> list[dict[str, str]]:
    """The judgment prompt as a chat (system, user): the task, the last ``history_messages`` messages
    before the response (system message dropped), the response, the feedback that followed it and the
    question of ``template`` (``JUDGE_TEMPLATE``: Yes/No; ``GRADED_TEMPLATE``: Skip/Weak/Strong)."""
    recent = [m for m in turn.history if m.get("role") != "system"][-history_messages:] if history_messages else []
    history = "\n".join(f"[{m['role']}] {m['content']}" for m in recent) or "(none)"
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": template.format(task=turn.task, history=history, response=turn.response,
                                                        feedback=turn.feedback)}]


@dataclass
class JudgeConfig:
    """Intervention options: mode (judge/all/random/inverted), decision (hard/soft/graded/graded_hard),
    threshold of ``hard``, weight of a Weak answer in the graded decisions, the least i of a judged turn."""

    mode: str = "judge"
    decision: str = "hard"
    tau: float = 0.5
    weak_weight: float = 0.5
    history_messages: int = 6  # the most recent history messages shown to the judge
    seed: int = 0
    floor: float = 0.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown intervention mode {self.mode!r}; accepted: {', '.join(MODES)}")
        if self.decision not in DECISIONS:
            raise ValueError(f"unknown judge decision {self.decision!r}; accepted: {', '.join(DECISIONS)}")
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"tau must be in [0, 1], got {self.tau}")
        if not 0.0 <= self.weak_weight <= 1.0:
            raise ValueError(f"weak_weight must be in [0, 1], got {self.weak_weight}")
        if not 0.0 <= self.floor <= 1.0:
            raise ValueError(f"floor must be in [0, 1], got {self.floor}")

    @property
    def graded(self) -> bool:
        return self.decision.startswith("graded")


@dataclass
class JudgeStats:
    """What the trainer logs: teacher-judged turns, forward passes, short circuits by reason, rates."""

    turns: int = 0
    judge_calls: int = 0  # turns scored by the teacher
    short_circuit: dict[str, int] = field(default_factory=dict)
    intervention_rate: float = 0.0  # mean i over the batch's turns
    judge_rate: float | None = None  # running mean of the judge's i over all judged turns so far


@dataclass
class JudgeResult:
    interventions: list[float]
    p_yes: list[float | None]  # None where no teacher call was made; graded: 1 - p_skip
    p_answers: list[dict[str, float] | None]  # each answer's probability by answer (TurnJudge.answers), or None
    stats: JudgeStats


class TurnJudge:
    """Decides i_t for a batch of turns with one teacher forward pass per judged turn."""

    def __init__(self, teacher, tokenizer, config: JudgeConfig | None = None):
        self.teacher, self.tokenizer = teacher, tokenizer
        self.config = config or JudgeConfig()
        self.rng = random.Random(self.config.seed)
        self.judged_total, self.judged_sum = 0, 0.0
        self.answers = GRADES if self.config.graded else ("Yes", "No")
        self.template = GRADED_TEMPLATE if self.config.graded else JUDGE_TEMPLATE
        found = {a: self._answer_ids(a) for a in self.answers}
        self.answer_ids = {a: [i for i in ids if not any(i in found[b] for b in self.answers if b != a)]
                           for a, ids in found.items()}
        if not all(self.answer_ids.values()):
            lost = " or ".join(repr(a) for a, ids in self.answer_ids.items() if not ids)
            raise ValueError(f"every spelling of {lost} starts with a token another answer starts with in this "
                             f"tokenizer ({found}); the judge cannot tell the answers apart")

    @property
    def yes_ids(self) -> list[int]:
        return self.answer_ids["Yes"]

    @property
    def no_ids(self) -> list[int]:
        return self.answer_ids["No"]

    def _answer_ids(self, word: str) -> list[int]:
        """The first token of each usual spelling of ``word`` right after the assistant prompt (deduplicated)."""
        text = self.render_text(JudgeTurn("task", [], "response", "feedback"))
        prefix = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids: list[int] = []
        for spelling in (word, word.lower(), " " + word, " " + word.lower()):
            full = self.tokenizer(text + spelling, add_special_tokens=False)["input_ids"]
            if full[:len(prefix)] == prefix and len(full) > len(prefix):
                token = full[len(prefix)]
            else:
                token = self.tokenizer(spelling, add_special_tokens=False)["input_ids"][0]
            if token not in ids:
                ids.append(token)
        return ids

    def render_text(self, turn: JudgeTurn) -> str:
        """The judgment prompt in the teacher's chat template, ending with the assistant generation prompt."""
        return chat_text(self.tokenizer, judgment_messages(turn, self.config.history_messages, self.template))

    def render(self, turn: JudgeTurn) -> list[int]:
        """Token ids of the judgment prompt."""
        return self.tokenizer(self.render_text(turn), add_special_tokens=False)["input_ids"]

    def answer_probs(self, turns: list[JudgeTurn]) -> torch.Tensor:
        """[len(turns), len(answers)]: each answer's probability (summed over its spellings) normalised over the
        answers, from one forward pass per prompt."""
        ids = [self.answer_ids[a] for a in self.answers]
        prompts = [self.render(t) for t in turns]
        logprobs = self.teacher.next_token_logprobs(prompts, [i for a in ids for i in a]).float()
        groups = torch.split(logprobs, [len(a) for a in ids], dim=-1)
        return torch.stack([torch.logsumexp(g, -1) for g in groups], -1).softmax(-1)

    def p_yes(self, turns: list[JudgeTurn]) -> torch.Tensor:
        """q(Yes) / (q(Yes) + q(No)) per turn (graded: 1 - p_skip, the probability of any correction)."""
        probs = self.answer_probs(turns)
        return 1.0 - probs[:, 0] if self.config.graded else probs[:, 0]

    def decide(self, probs: torch.Tensor) -> list[float]:
        """The judge's i per turn from its answer probabilities [n, len(answers)] (see the module docstring)."""
        cfg = self.config
        if cfg.decision == "soft":
            return probs[:, 0].tolist()
        if cfg.decision == "hard":
            return (probs[:, 0] >= cfg.tau).float().tolist()
        grade = torch.tensor([0.0, cfg.weak_weight, 1.0], dtype=torch.float64)
        return (probs.double() @ grade if cfg.decision == "graded" else grade[probs.argmax(-1)]).tolist()

    def __call__(self, turns: list[JudgeTurn]) -> JudgeResult:
        cfg = self.config
        for t in turns:
            if t.invalid_reason is not None and t.invalid_reason not in INVALID_REASONS:
                raise ValueError(f"unknown invalid_reason {t.invalid_reason!r}; accepted: None, "
                                 f"{', '.join(INVALID_REASONS)}")
        shorted = Counter(t.invalid_reason for t in turns if t.invalid_reason is not None)
        judged = [k for k, t in enumerate(turns) if t.invalid_reason is None]
        interventions = [1.0] * len(turns)
        p_yes: list[float | None] = [None] * len(turns)
        p_answers: list[dict[str, float] | None] = [None] * len(turns)
        if cfg.mode != "all" and judged:
            probs = self.answer_probs([turns[k] for k in judged])
            decisions = self.decide(probs)
            self.judged_total += len(judged)
            self.judged_sum += sum(decisions)
            rate = self.judged_sum / self.judged_total
            yes = (1.0 - probs[:, 0] if cfg.graded else probs[:, 0]).tolist()
            for k, p, answers, d in zip(judged, yes, probs.tolist(), decisions):
                p_yes[k], p_answers[k] = p, dict(zip(self.answers, answers))
                interventions[k] = max(cfg.floor, {"judge": d, "inverted": 1.0 - d,
                                                   "random": float(self.rng.random() < rate)}[cfg.mode])
        stats = JudgeStats(turns=len(turns), judge_calls=len(judged) if cfg.mode != "all" else 0,
                           short_circuit=dict(shorted),
                           intervention_rate=sum(interventions) / len(turns) if turns else 0.0,
                           judge_rate=self.judged_sum / self.judged_total if self.judged_total else None)
        return JudgeResult(interventions, p_yes, p_answers, stats)
