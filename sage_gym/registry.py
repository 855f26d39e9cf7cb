"""Env registration by id, ``make`` and ``list_envs`` (Gymnasium style).

Every env is also registered with gymnasium as ``sage/<env_id>-v0``.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import gymnasium

from sage_gym.errors import UnknownEnvError


@dataclass(frozen=True)
class EnvSpec:
    """A registered environment: how to build it and what it is."""

    env_id: str
    entry_point: str  # "module:callable"
    family: str  # alfworld | scienceworld | searchqa
    split: str  # train | seen | unseen | <dataset>
    max_turns: int
    num_episodes: int | None = None  # the panel size when known without loading data
    kwargs: dict[str, Any] = field(default_factory=dict)
    has_train_split: bool = False
    data_status: str | None = None  # "module:callable" returning a one-line data status, for `sage envs`

    @property
    def gym_id(self) -> str:
        return f"sage/{self.env_id}-v0"

    def load(self) -> Callable[..., Any]:
        return _resolve(self.entry_point)

    def status(self) -> str:
        """A one-line data status ("ready", what is missing) or "-" when the env needs no data."""
        return _resolve(self.data_status)(self) if self.data_status else "-"


def _resolve(entry: str) -> Callable[..., Any]:
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name)


_REGISTRY: dict[str, EnvSpec] = {}
_DISCOVERERS: list[Callable[[Any], None]] = []


def register(spec: EnvSpec) -> None:
    """Register an env id (and its gymnasium id ``sage/<env_id>-v0``)."""
    _REGISTRY[spec.env_id] = spec
    if spec.gym_id not in gymnasium.registry:
        gymnasium.register(id=spec.gym_id, entry_point="sage_gym.registry:make", kwargs={"env_id": spec.env_id})


def spec(env_id: str) -> EnvSpec:
    """The spec of ``env_id``; a clear error naming the known ids otherwise."""
    if env_id not in _REGISTRY:
        close = difflib.get_close_matches(env_id, list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownEnvError(
            f"Unknown env id {env_id!r}.{hint} Registered env ids: {', '.join(sorted(_REGISTRY))} "
            "(run `sage envs` for details)."
        )
    return _REGISTRY[env_id]


def make(env_id: str, **kwargs: Any):
    """Build the env registered as ``env_id``; ``kwargs`` override the registered ones."""
    s = spec(env_id)
    return s.load()(**{**s.kwargs, **kwargs})


def add_discoverer(fn: Callable[[Any], None]) -> None:
    """Register ``fn(data_dir)``, which registers the env ids that a data folder provides."""
    _DISCOVERERS.append(fn)


def discover(data_dir) -> None:
    """Register the env ids that the data under ``data_dir`` provides (e.g. custom search QA datasets),
    as the default data folder's are at import."""
    for fn in _DISCOVERERS:
        fn(data_dir)


def list_envs() -> list[EnvSpec]:
    """All registered env specs, sorted by id."""
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]
