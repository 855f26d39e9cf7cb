"""Env worker processes: spawned with a fixed string-hash seed.

Python randomises ``hash(str)`` per process, and game engines iterate over sets and order
objects by hash (Fast Downward sorts conditions by their hash), so two processes can build the
same game differently. Env workers are therefore started with ``PYTHONHASHSEED=0`` (unless the
user fixed another): episodes replay identically in any worker, and a game translated by one
worker can be reused by the others (ALFWorld's on-disk reset cache is only used with a fixed seed).
"""

from __future__ import annotations

import os
from contextlib import contextmanager


@contextmanager
def fixed_hash_seed():
    """Processes started inside this block inherit PYTHONHASHSEED=0 when it is not already set."""
    if os.environ.get("PYTHONHASHSEED") not in (None, "", "random"):
        yield
        return
    saved = os.environ.get("PYTHONHASHSEED")
    os.environ["PYTHONHASHSEED"] = "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["PYTHONHASHSEED"]
        else:
            os.environ["PYTHONHASHSEED"] = saved


def hash_seed() -> str | None:
    """This process's fixed string-hash seed, or None when hashing is randomised."""
    seed = os.environ.get("PYTHONHASHSEED")
    return None if seed in (None, "", "random") else seed
