"""Shared fixtures: the real ALFWorld games (from ../shared or an installed copy) and tiny real models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = ROOT.parent / "shared" / "data" / "alfworld-json_2.1.1.tar.xz"


@pytest.fixture(scope="session")
def alfworld_data(tmp_path_factory) -> Path:
    """A complete ALFWorld data folder: an installed one if complete, else the shared archive extracted once."""
    from sage_gym.data import alfworld_status, install_alfworld_archive

    status = alfworld_status()
    if status["complete"]:
        return Path(status["root"])
    if not ARCHIVE.is_file():
        pytest.fail(f"ALFWorld games are not installed and the archive {ARCHIVE} is missing")
    dest = tmp_path_factory.mktemp("alfworld")
    install_alfworld_archive(ARCHIVE, dest)
    return dest


@pytest.fixture(scope="session", autouse=True)
def _alfworld_env_var(alfworld_data):
    """Point $ALFWORLD_DATA at the test data so subprocesses (CLI, workers) find the games too."""
    old = os.environ.get("ALFWORLD_DATA")
    os.environ["ALFWORLD_DATA"] = str(alfworld_data)
    yield
    if old is None:
        os.environ.pop("ALFWORLD_DATA", None)
    else:
        os.environ["ALFWORLD_DATA"] = old


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """A tiny student and a larger tiny teacher sharing one tokenizer (built offline, cached per session)."""
    from sage_models.tiny import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny-models"))
