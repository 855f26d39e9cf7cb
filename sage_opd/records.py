"""What a rollout hands the trainer: turns, episodes and a step's batch (saved as JSON by ``rollout.from_file``).

Plain data with no env or model imports, so the loss layer and the phases can read turns without
loading any environment. Each turn keeps the context (messages and ``prompt_ids``), the generated
``token_ids`` exactly as sampled, the response text, its validity, the env feedback after it, the
task and who wrote it (``student``, ``teacher`` or ``expert``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class TurnRecord:
    """One agent turn of a rollout."""

    episode: int  # index of the episode in its batch
    turn: int
    task: str
    messages: list[dict[str, str]]  # the context the response answered
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    action_valid: bool
    invalid_reason: str | None
    feedback: str  # the env's answer to this turn
    source: str = "student"  # student | teacher | expert
    finish_reason: str = "stop"
    action: str | None = None  # the parsed action (None when invalid)
    expert_action: str | None = None  # the env's expert move from this state (envs made with expert_labels)


@dataclass
class EpisodeRecord:
    episode_id: str
    task: str
    task_type: str
    won: bool = False
    score: float = 0.0
    turns: list[TurnRecord] = field(default_factory=list)


@dataclass
class RolloutBatch:
    """The episodes one rank collected in one step."""

    episodes: list[EpisodeRecord]

    @property
    def turns(self) -> list[TurnRecord]:
        return [t for ep in self.episodes for t in ep.turns]

    def success_rate(self) -> float:
        return sum(ep.won for ep in self.episodes) / max(len(self.episodes), 1)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps([asdict(ep) for ep in self.episodes]))

    @classmethod
    def load(cls, path: str | Path) -> RolloutBatch:
        episodes = []
        for ep in json.loads(Path(path).read_text()):
            turns = [TurnRecord(**t) for t in ep.pop("turns")]
            episodes.append(EpisodeRecord(**ep, turns=turns))
        return cls(episodes)
