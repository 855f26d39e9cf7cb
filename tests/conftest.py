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


@pytest.fixture(scope="session")
def batches(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """Saved rollout batches of real ALFWorld turns, train.json and heldout.json: each holds one episode of the
    random tiny student (invalid turns only) and one of the expert relabelled as the student's (valid turns)."""
    from sage_models import HFPolicy
    from sage_models.policy import Decoding
    from sage_opd.rollout import RolloutBatch, RolloutCollector

    collector = RolloutCollector("alfworld-train", 2, max_turns=2)
    try:
        ids = collector.episode_ids[:2]
        student = collector.collect(ids, HFPolicy(tiny_models["student"]),
                                    Decoding(temperature=1.0, max_new_tokens=16), seed=1)
        expert = collector.collect(ids, None, Decoding(), seed=1, expert=True)
    finally:
        collector.close()
    for turn in expert.turns:
        turn.source = "student"
    assert all(not t.action_valid for t in student.turns) and all(t.action_valid for t in expert.turns)
    folder = tmp_path_factory.mktemp("batches")
    RolloutBatch([student.episodes[0], expert.episodes[0]]).save(folder / "train.json")
    RolloutBatch([student.episodes[1], expert.episodes[1]]).save(folder / "heldout.json")
    return {"train": folder / "train.json", "heldout": folder / "heldout.json"}
