"""Prompt options of `sage evaluate` for base and small models (as lm-evaluation-harness offers):
a system prompt of your own and worked example turns (few-shot) from the env's train split.

The env keeps rendering its own episode; these options only reshape the conversation the model
reads, so the recorded episode stays the env's and run.json records exactly what was added.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

EXAMPLE_HEADER = "Worked example (an expert's turns on another episode):\n\n"
NEW_EPISODE = "End of the example. Now your own episode begins.\n\n"


@dataclass(frozen=True)
class PromptOptions:
    """``system_prompt`` replaces the env's system message; ``examples`` (one message list per example
    episode, from ``sage_gym.fewshot.example_episodes``) go between it and the episode's first message."""

    system_prompt: str | None = None
    examples: list[list[dict[str, str]]] = field(default_factory=list)
    fewshot: int = 0
    source: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, env_id: str, system_prompt: str | None = None, fewshot: int = 0,
              env_kwargs: dict[str, Any] | None = None) -> PromptOptions:
        """The options for ``env_id``: plays the expert on its train split when ``fewshot`` > 0."""
        if fewshot < 0:
            raise ValueError(f"fewshot must be a number of example turns >= 0, got {fewshot}")
        if system_prompt is not None and not system_prompt.strip():
            raise ValueError("the system prompt is empty; pass a file with text in it, or no --system-prompt")
        examples, source = [], {}
        if fewshot:
            from sage_gym.fewshot import example_episodes

            examples, source = example_episodes(env_id, fewshot, **(env_kwargs or {}))
        return cls(system_prompt, examples, fewshot, source)

    def apply(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """The conversation the model reads: [system], examples, then the episode (roles still alternate)."""
        if not (self.system_prompt or self.examples):
            return messages
        head, rest = (messages[0], messages[1:]) if messages and messages[0]["role"] == "system" else (None, messages)
        out = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else [head] if head else []
        carry = ""  # text that opens the next user message (the end of the previous example)
        for episode in self.examples:
            first, *turns = episode
            out.append({"role": "user", "content": carry + EXAMPLE_HEADER + first["content"]})
            out += turns[:-1]
            carry = turns[-1]["content"] + "\n\n"
        if rest:
            out.append({"role": rest[0]["role"], "content": carry + NEW_EPISODE + rest[0]["content"]})
            out += rest[1:]
        return out

    def settings(self) -> dict[str, Any] | None:
        """What run.json records (None without options, so older run folders still resume)."""
        if not (self.system_prompt or self.examples):
            return None
        digest = hashlib.sha256(json.dumps([self.system_prompt, self.examples]).encode()).hexdigest()
        return {"system_prompt": self.system_prompt, "fewshot": self.fewshot, "fewshot_source": self.source,
                "sha256": digest}
