"""Scripted agents (``expert``, ``handcoded``, ``random``): they act on the env itself, so the episode
runner plays them in the env's worker process instead of calling ``generate``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SCRIPTED = ("expert", "handcoded", "random")


@dataclass(frozen=True)
class ScriptedAgent:
    """A scripted agent by name, with its options (e.g. ``epsilon`` for noisy ``handcoded`` play)."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
