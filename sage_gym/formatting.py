"""Prompt formatting and response parsing (SPEC section 2).

A formatter turns an episode's history into chat ``messages`` and parses a model's
response into one action. The default is ReAct style: free reasoning followed by exactly
one ``<action>...</action>``; generation stops at ``</action>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

EMPTY, UNPARSEABLE, SCHEMA_VIOLATION = "empty", "unparseable", "schema_violation"
INVALID_REASONS = (EMPTY, UNPARSEABLE, SCHEMA_VIOLATION)


@dataclass(frozen=True)
class Parsed:
    """A parsed response: the action text, or None with the reason it is invalid."""

    action: str | None
    invalid_reason: str | None
    response: str  # the response as the gym keeps it (stop string restored)


@dataclass
class Turn:
    """One agent turn: the response and the environment feedback that followed it."""

    response: str
    feedback: str


@dataclass
class EpisodeText:
    """What a formatter needs to render messages: env rules, the task and the turns so far."""

    rules: str
    task: str
    first_observation: str
    turns: list[Turn] = field(default_factory=list)


class ReActFormatter:
    """ReAct prompts: a system message with the rules and the format, full history by default.

    ``history_window``: keep only the last N turns in ``messages`` (None keeps all).
    """

    open_tag, close_tag = "<action>", "</action>"

    def __init__(self, history_window: int | None = None):
        if history_window is not None and history_window < 1:
            raise ValueError(f"history_window must be a positive number of turns or None, got {history_window}")
        self.history_window = history_window
        self._pattern = re.compile(re.escape(self.open_tag) + r"(.*?)" + re.escape(self.close_tag), re.DOTALL)

    @property
    def stop(self) -> list[str]:
        """Stop strings for generation."""
        return [self.close_tag]

    def system_prompt(self, rules: str) -> str:
        return (
            f"{rules.strip()}\n\n"
            "Response format: think step by step in free text, then give exactly one action as\n"
            f"{self.open_tag}your action{self.close_tag}\n"
            "Write nothing after the action."
        )

    def first_user_message(self, task: str, observation: str) -> str:
        return f"{observation.strip()}\n\nYour task: {task.strip()}" if task.strip() not in observation else observation.strip()

    def invalid_feedback(self, reason: str) -> str:
        """The fixed feedback for an invalid turn: it names the problem and restates the format in words,
        never as a tag pair, so a model that copies it does not produce an action."""
        problem = {
            EMPTY: "Your response was empty.",
            UNPARSEABLE: "Your response did not contain exactly one action inside action tags.",
            SCHEMA_VIOLATION: "That action is not a valid command in this environment.",
        }[reason]
        return (
            f"Invalid response: {problem} Nothing happened. Reply with your reasoning, then exactly one valid "
            "command placed between an opening and a closing action tag, as the system message shows."
        )

    def format_action(self, action: str, thought: str = "") -> str:
        """Wrap an action in the response format (used by scripted agents)."""
        prefix = f"{thought.strip()}\n" if thought.strip() else ""
        return f"{prefix}{self.open_tag}{action}{self.close_tag}"

    def restore_stop(self, response: str) -> str:
        """Append the stop string back when a backend stripped it after an open action tag."""
        last_open = response.rfind(self.open_tag)
        if last_open >= 0 and self.close_tag not in response[last_open:]:
            return response + self.close_tag
        return response

    def parse(self, response: str) -> Parsed:
        """Parse a response: ``empty``, ``unparseable`` (zero or several actions) or an action."""
        if response is None or not response.strip():
            return Parsed(None, EMPTY, response or "")
        response = self.restore_stop(response)
        action = self.extract_action(response)
        return Parsed(action, UNPARSEABLE if action is None else None, response)

    def extract_action(self, response: str) -> str | None:
        """The response's single action, whitespace collapsed; None unless there is exactly one."""
        found = self._pattern.findall(response)
        if len(found) != 1 or not found[0].strip():
            return None
        return " ".join(found[0].split())

    def messages(self, episode: EpisodeText) -> list[dict[str, str]]:
        """The chat so far, ready for any chat template (windowed when ``history_window`` is set)."""
        msgs = [
            {"role": "system", "content": self.system_prompt(episode.rules)},
            {"role": "user", "content": self.first_user_message(episode.task, episode.first_observation)},
        ]
        turns = episode.turns if self.history_window is None else episode.turns[-self.history_window :]
        for turn in turns:
            msgs.append({"role": "assistant", "content": turn.response})
            msgs.append({"role": "user", "content": turn.feedback})
        return msgs
