"""The core multi-turn text environment (SPEC section 2).

``TextEnv`` implements the episode protocol once: chat messages, response parsing and
schema validation, invalid-turn feedback, turn caps and the ``info`` keys. A concrete
environment (ALFWorld, ScienceWorld, search QA) only implements the game hooks at the
bottom of the class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Any

import gymnasium as gym
from gymnasium import spaces

from sage_gym.formatting import SCHEMA_VIOLATION, EpisodeText, ReActFormatter, Turn

MAX_TEXT = 1 << 17


@cache
def text_space() -> spaces.Text:
    """The observation/action space: any text of printable Unicode (BMP) characters and whitespace.

    Built once (its character table takes ~0.1 s) and shared by every env of the process.
    """
    charset = "".join(c for c in map(chr, range(0x20, 0x10000)) if c.isprintable()) + "\n\t\r"
    return spaces.Text(max_length=MAX_TEXT, min_length=0, charset=charset)


@dataclass
class EpisodeStart:
    """What a game hook returns when an episode starts."""

    task: str
    observation: str
    task_type: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class GameStep:
    """What a game hook returns for one valid action. ``score`` is in [0, 1]."""

    observation: str
    score: float
    done: bool
    won: bool
    extra: dict[str, Any] = field(default_factory=dict)


def describe(env) -> dict[str, Any]:
    """``TextEnv.describe()`` of an env, through any gymnasium wrappers around it (a ``RemoteEnv`` too)."""
    return env.get_wrapper_attr("describe")() if hasattr(env, "get_wrapper_attr") else env.describe()


class TextEnv(gym.Env):
    """A gymnasium env whose action is a model's whole response and whose observation is text.

    ``step(response)`` parses the response with the formatter, checks the action against
    the environment's action schema, and only then sends it to the game. An invalid turn
    is not sent to the game, gets a fixed feedback message and still counts as a turn.
    """

    metadata = {"render_modes": ["ansi"]}
    env_id: str = "text-env"
    rules: str = ""

    def __init__(self, episode_ids: list[str], max_turns: int, formatter: ReActFormatter | None = None,
                 render_mode: str | None = None):
        if not episode_ids:
            raise ValueError(f"{type(self).__name__} has an empty episode panel")
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        self.episode_ids = list(episode_ids)
        self._episode_set = set(self.episode_ids)
        self.max_turns = max_turns
        self.formatter = formatter or ReActFormatter()
        self.render_mode = render_mode
        self.observation_space = self.action_space = text_space()
        self._episode: EpisodeText | None = None
        self._episode_id: str | None = None
        self._task_type = ""
        self._turn = 0
        self._score = 0.0
        self._won = False
        self._done = False
        self._last_obs = ""

    # ---- gymnasium API -------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = options or {}
        episode_id = options.get("episode_id")
        if episode_id is None:
            episode_id = self.episode_ids[int(self.np_random.integers(len(self.episode_ids)))]
        elif episode_id not in self._episode_set:
            raise KeyError(
                f"episode_id {episode_id!r} is not in the {self.env_id} panel "
                f"({len(self.episode_ids)} episodes, e.g. {self.episode_ids[0]!r}); see env.unwrapped.episode_ids"
            )
        start = self._start_episode(episode_id)
        self._episode_id, self._task_type = episode_id, start.task_type
        self._episode = EpisodeText(self.rules, start.task, start.observation)
        self._turn, self._score, self._won, self._done = 0, 0.0, False, False
        self._last_obs = start.observation
        info = self._info(start.extra)
        info.update(task=start.task, task_type=start.task_type, episode_id=episode_id)
        return start.observation, info

    def step(self, response: str):
        if self._episode is None:
            raise RuntimeError("call reset() before step()")
        if self._done:
            raise RuntimeError("the episode is over (terminated or truncated): call reset() to start another")
        parsed = self.formatter.parse(response if isinstance(response, str) else "")
        reason = parsed.invalid_reason
        if reason is None and not self.is_valid_action(parsed.action):
            reason = SCHEMA_VIOLATION
        self._turn += 1
        extra: dict[str, Any] = {}
        reward, terminated = 0.0, False
        if reason is None:
            game = self._game_step(parsed.action)
            reward = game.score - self._score
            self._score, self._won, terminated = game.score, game.won, game.done
            observation, extra = game.observation, game.extra
        else:
            observation = self.formatter.invalid_feedback(reason)
        truncated = not terminated and self._turn >= self.max_turns
        self._done = terminated or truncated
        self._last_obs = observation
        self._episode.turns.append(Turn(parsed.response, observation))
        info = self._info(extra)
        info.update(action=parsed.action if reason is None else None, action_valid=reason is None,
                    invalid_reason=reason,
                    # the text inside <action> even when it broke the schema (None when unparseable)
                    parsed_action=parsed.action)
        return observation, float(reward), terminated, truncated, info

    def render(self):
        if self.render_mode == "ansi":
            return self._last_obs
        return None

    # ---- helpers -------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """What a client needs to know of this env without reaching into it: its id, panel (episode ids in
        order), turn cap, stop strings, rules and history window (``sage_gym.describe(env)`` for wrapped envs)."""
        return {"env_id": self.env_id, "episode_ids": list(self.episode_ids), "max_turns": self.max_turns,
                "stop": list(self.stop), "rules": self.rules, "history_window": self.formatter.history_window}

    @property
    def messages(self) -> list[dict[str, str]]:
        """The chat so far (system, first user message, then assistant/user pairs)."""
        if self._episode is None:
            raise RuntimeError("call reset() first")
        return self.formatter.messages(self._episode)

    @property
    def stop(self) -> list[str]:
        return self.formatter.stop

    def _info(self, extra: dict[str, Any]) -> dict[str, Any]:
        info = {
            "episode_id": self._episode_id,
            "task": self._episode.task if self._episode else "",
            "task_type": self._task_type,
            "messages": self.messages,
            "admissible_actions": self.info_admissible_actions(),
            "turn": self._turn,
            "max_turns": self.max_turns,
            "won": self._won,
            "score": self._score,
        }
        info.update(extra)
        return info

    def info_admissible_actions(self) -> list[str]:
        """Admissible actions put into ``info`` each step (an env may return [] when listing is costly)."""
        return self.admissible_actions()

    # ---- game hooks (implemented by each environment) -------------------------------
    def _start_episode(self, episode_id: str) -> EpisodeStart:
        raise NotImplementedError

    def _game_step(self, action: str) -> GameStep:
        raise NotImplementedError

    def is_valid_action(self, action: str) -> bool:
        """Whether ``action`` fits the environment's action schema."""
        raise NotImplementedError

    def admissible_actions(self) -> list[str]:
        """The actions that are admissible now (may be costly for some environments)."""
        raise NotImplementedError

    def expert_actions(self) -> list[str]:
        """The gold action sequence of the current episode, for the ``expert`` agent."""
        raise NotImplementedError

    def expert_action(self) -> tuple[str, str] | None:
        """A state-based expert's next ``(action, thought)`` from the current state, whatever played the
        turns so far (DAgger labels, the ``handcoded`` agent); None when the env has no such expert."""
        return None

    def explain_action(self, action: str) -> str | None:
        """That expert's one-sentence reason for ``action`` in the current state (None without one)."""
        return None
