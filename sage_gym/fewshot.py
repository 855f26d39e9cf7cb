"""Worked examples for few-shot prompts: the expert's turns on an env's train split, rendered by the
env's own formatter, so examples and the evaluated episode read the same way (``sage evaluate --fewshot``)."""

from __future__ import annotations

from typing import Any

from sage_gym.errors import SageError
from sage_gym.registry import list_envs, make, spec


def train_split(env_id: str) -> tuple[str, dict[str, Any]]:
    """The env id (and kwargs) of ``env_id``'s train split: ``<family>-train`` when registered (ALFWorld,
    ScienceWorld), else the env itself with ``split="train"`` (a search QA dataset with train questions)."""
    s = spec(env_id)
    if s.split == "train":
        return env_id, {}
    family_train = [e for e in list_envs() if e.family == s.family and e.split == "train"]
    if family_train:
        return family_train[0].env_id, {}
    if s.has_train_split:
        return env_id, {"split": "train"}
    raise SageError(f"{env_id} has no train split to draw worked examples from; drop --fewshot "
                    "(or install the dataset's train questions)")


def example_episodes(env_id: str, n: int, **env_kwargs: Any) -> tuple[list[list[dict[str, str]]], dict[str, Any]]:
    """``n`` expert turns from the first episodes of ``env_id``'s train split, as chat messages.

    Returns one message list per example episode (its first user message, then assistant/user pairs up
    to the env's answer to its last example turn) and where they came from. Env kwargs such as
    ``prompt_format`` or ``data_dir`` shape the examples like the evaluated env."""
    if n < 1:
        raise ValueError(f"the number of example turns must be >= 1, got {n}")
    train_id, kwargs = train_split(env_id)
    env = make(train_id, **{**{k: v for k, v in env_kwargs.items() if k not in ("max_turns", "history_window")},
                            **kwargs})
    episodes: list[list[dict[str, str]]] = []
    used: list[str] = []
    try:
        u = env.unwrapped
        for episode_id in u.episode_ids:
            if n <= 0:
                break
            _, info = env.reset(seed=0, options={"episode_id": episode_id})
            try:
                plan = u.expert_actions()
            except NotImplementedError as err:
                raise SageError(f"{train_id} has no expert to write worked examples: {err}") from None
            done, turns = False, 0
            for action in plan[:n]:
                _, _, terminated, truncated, info = env.step(u.formatter.format_action(action))
                done, turns = terminated or truncated, turns + 1
                if done:
                    break
            if turns:
                n -= turns
                used.append(episode_id)
                episodes.append(info["messages"][1:])  # the env's own rendering, without its system message
    finally:
        env.close()
    return episodes, {"env_id": train_id, "episode_ids": used}
