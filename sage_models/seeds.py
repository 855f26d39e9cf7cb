"""The one seed derivation of the project: a seed is a hash of the parts that identify what it seeds
(run seed, step, episode, turn, ...), so a random draw never depends on batch composition, worker
count, rank or resumption."""

from __future__ import annotations

import hashlib


def derive_seed(*parts: int | str) -> int:
    """A 32-bit seed from ``parts`` (ints or strings), different for every tuple of parts."""
    digest = hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def turn_seed(seed: int, episode_id: str, turn: int) -> int:
    """The sampling seed of one turn: a function of (run seed, episode, turn) only."""
    return derive_seed(seed, episode_id, turn)
