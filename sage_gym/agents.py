"""Scripted agents: ``expert`` replays the episode's gold actions, ``random`` picks admissible ones.

An agent maps ``(env, info)`` to a whole response text, exactly like a model would.
"""

from __future__ import annotations

import random as _random
from typing import Any, Protocol


class Agent(Protocol):
    name: str

    def reset(self, env, info: dict[str, Any]) -> None: ...

    def act(self, env, info: dict[str, Any]) -> str: ...


class ExpertAgent:
    """Replays the game's gold action sequence (ALFWorld walkthrough, ScienceWorld gold path, ...)."""

    name = "expert"

    def __init__(self):
        self._plan: list[str] = []
        self._next = 0

    def reset(self, env, info: dict[str, Any]) -> None:
        self._plan, self._next = list(env.unwrapped.expert_actions()), 0

    def act(self, env, info: dict[str, Any]) -> str:
        formatter = env.unwrapped.formatter
        if self._next >= len(self._plan):
            return formatter.format_action("look", "The plan is finished.")
        action = self._plan[self._next]
        self._next += 1
        return formatter.format_action(action, f"Step {self._next} of the expert plan.")


class HandCodedAgent:
    """Acts with the env's state-based expert (``TextEnv.expert_action``; ALFWorld's hand-coded agent):
    it searches from what it has observed instead of replaying the walkthrough, and says why.

    ``epsilon``: the share of turns played with a random other admissible action instead (seeded), for
    data that covers mistakes and the expert's recovery from them."""

    name = "handcoded"
    seeded = True

    def __init__(self, epsilon: float = 0.0, seed: int = 0):
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
        self.epsilon, self._rng = epsilon, _random.Random(seed)

    def reset(self, env, info: dict[str, Any]) -> None:
        if env.unwrapped.expert_action() is None:
            raise ValueError(f"{env.unwrapped.env_id} has no state-based expert; use the 'expert' agent")

    def act(self, env, info: dict[str, Any]) -> str:
        decision = env.unwrapped.expert_action()
        action, thought = decision if decision else ("look", "I look around.")
        if self.epsilon and self._rng.random() < self.epsilon:
            others = [a for a in (info.get("admissible_actions") or env.unwrapped.admissible_actions()) if a != action]
            if others:  # explained in the expert's words, so that a mistake does not read differently
                action = self._rng.choice(others)
                thought = env.unwrapped.explain_action(action) or ""
        return env.unwrapped.formatter.format_action(action, thought)


class RandomAgent:
    """Picks a uniformly random admissible action each turn (seeded)."""

    name = "random"
    seeded = True

    def __init__(self, seed: int = 0):
        self._rng = _random.Random(seed)

    def reset(self, env, info: dict[str, Any]) -> None:
        pass

    def act(self, env, info: dict[str, Any]) -> str:
        actions = info.get("admissible_actions") or env.unwrapped.admissible_actions()
        return env.unwrapped.formatter.format_action(self._rng.choice(actions))


AGENTS = {"expert": ExpertAgent, "handcoded": HandCodedAgent, "random": RandomAgent}


def make_agent(name: str, **kwargs: Any):
    """Build a scripted agent by name (``expert``, ``handcoded`` or ``random``)."""
    if name not in AGENTS:
        raise ValueError(f"Unknown scripted agent {name!r}; choose one of: {', '.join(AGENTS)}")
    return AGENTS[name](**kwargs)


def play_episode(env, agent, episode_id: str | None = None, seed: int | None = None) -> dict[str, Any]:
    """Run one episode with a scripted agent; returns the last info plus the turn results."""
    _, info = env.reset(seed=seed, options={"episode_id": episode_id} if episode_id else None)
    agent.reset(env, info)
    terminated = truncated = False
    while not (terminated or truncated):
        _, _, terminated, truncated, info = env.step(agent.act(env, info))
    return {**info, "terminated": terminated, "truncated": truncated}
