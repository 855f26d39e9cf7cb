"""The gym core over the real ALFWorld engine (games from the shared archive)."""

from __future__ import annotations

import subprocess
import sys
import tarfile

import gymnasium
import pytest
from gymnasium.utils.env_checker import check_env

import sage_gym
from sage_gym.agents import ExpertAgent, RandomAgent, play_episode
from sage_gym.data import install_alfworld_archive
from sage_gym.envs.alfworld import TASK_TYPES, task_type_of

CLOCK = "valid_unseen/look_at_obj_in_light-AlarmClock-None-DeskLamp-308/trial_T20190908_222917_366542"


@pytest.fixture(scope="module")
def env(alfworld_data):
    env = sage_gym.make("alfworld-unseen", data_dir=alfworld_data)
    yield env
    env.close()


def one_per_task_type(episode_ids):
    chosen = {}
    for episode_id in episode_ids:
        chosen.setdefault(task_type_of(episode_id), episode_id)
    return chosen


def test_registry_and_panels(alfworld_data):
    ids = {s.env_id: s for s in sage_gym.list_envs()}
    assert {"alfworld-train", "alfworld-seen", "alfworld-unseen"} <= set(ids)
    assert ids["alfworld-train"].has_train_split and not ids["alfworld-unseen"].has_train_split
    seen = sage_gym.make("alfworld-seen", data_dir=alfworld_data)
    unseen = sage_gym.make("alfworld-unseen", data_dir=alfworld_data)
    assert len(seen.episode_ids) == 140 and len(unseen.episode_ids) == 134
    assert len(set(unseen.episode_ids)) == 134
    assert [task_type_of(e) for e in unseen.episode_ids[:6]] == list(TASK_TYPES)  # any prefix covers the types
    assert unseen.episode_ids == sage_gym.make("alfworld-unseen", data_dir=alfworld_data).episode_ids
    assert all(e.startswith("valid_unseen/") and e.count("/") == 2 for e in unseen.episode_ids)
    assert set(seen.episode_ids).isdisjoint(unseen.episode_ids)
    assert {task_type_of(e) for e in unseen.episode_ids} == set(TASK_TYPES)


def test_gymnasium_make_and_check_env(alfworld_data):
    env = gymnasium.make("sage/alfworld-unseen-v0", data_dir=alfworld_data)
    assert env.unwrapped.env_id == "alfworld-unseen"
    check_env(env.unwrapped, skip_render_check=True)
    env.close()


def test_seed_picks_episode_deterministically(env):
    a = env.reset(seed=3)[1]["episode_id"]
    b = env.reset(seed=3)[1]["episode_id"]
    picks = {env.reset(seed=s)[1]["episode_id"] for s in range(8)}
    assert a == b and len(picks) > 1


def test_reset_info_and_messages(env):
    obs, info = env.reset(options={"episode_id": CLOCK})
    for key in ("episode_id", "task", "task_type", "messages", "admissible_actions", "turn", "max_turns"):
        assert key in info
    assert info["turn"] == 0 and info["max_turns"] == 30
    assert info["task"] and info["task"] in obs and "Welcome to TextWorld" not in obs
    assert [m["role"] for m in info["messages"]] == ["system", "user"]
    assert "<action>" in info["messages"][0]["content"]
    assert "go to desk 1" in info["admissible_actions"]
    with pytest.raises(KeyError, match="not in the alfworld-unseen panel"):
        env.reset(options={"episode_id": "valid_unseen/nope/trial"})


def test_expert_wins_every_task_type(alfworld_data):
    agent = ExpertAgent()
    for split in ("unseen", "seen"):
        env = sage_gym.make(f"alfworld-{split}", data_dir=alfworld_data)
        sample = one_per_task_type(env.episode_ids)
        assert set(sample) == set(TASK_TYPES)
        for task_type, episode_id in sample.items():
            result = play_episode(env, agent, episode_id)
            assert result["won"] and result["terminated"] and result["score"] == 1.0, (split, episode_id)
            assert result["task_type"] == task_type
        env.close()


@pytest.mark.parametrize("response,reason", [
    ("", "empty"),
    ("   \n", "empty"),
    ("I will go to the desk.", "unparseable"),
    ("<action>look</action> and then <action>inventory</action>", "unparseable"),
    ("<action>   </action>", "unparseable"),
    ("Let me fly. <action>fly to the moon</action>", "schema_violation"),
    ("<action>go to desk</action>", "schema_violation"),
])
def test_invalid_responses_are_reported_and_not_sent(env, response, reason):
    env.reset(options={"episode_id": CLOCK})
    before = env.admissible_actions()
    obs, reward, terminated, truncated, info = env.step(response)
    assert info["action_valid"] is False and info["invalid_reason"] == reason and info["action"] is None
    assert obs == env.formatter.invalid_feedback(reason)
    assert env.formatter.parse(obs).invalid_reason == "unparseable"  # a model copying the feedback writes no action
    assert reward == 0.0 and not terminated and not truncated and info["turn"] == 1
    assert env.admissible_actions() == before  # the game did not move
    assert info["messages"][-1] == {"role": "user", "content": obs}


def test_valid_step_and_stop_string_restored(env):
    env.reset(options={"episode_id": CLOCK})
    obs, _, _, _, info = env.step("The desk may hold the clock. <action>go to desk 2")
    assert info["action_valid"] and info["action"] == "go to desk 2" and info["invalid_reason"] is None
    assert "You arrive at desk 2" in obs
    assert info["messages"][-2]["content"].endswith("</action>")
    obs, _, _, _, info = env.step("<action>go to   the moon 1</action>")  # fits the grammar, not admissible
    assert info["action_valid"] and obs == "Nothing happens."


def test_turn_cap_truncates(alfworld_data):
    env = sage_gym.make("alfworld-unseen", data_dir=alfworld_data, max_turns=3)
    env.reset(options={"episode_id": CLOCK})
    flags = [env.step("<action>look</action>")[2:4] for _ in range(3)]
    assert flags == [(False, False), (False, False), (False, True)]
    with pytest.raises(RuntimeError, match="episode is over"):
        env.step("<action>look</action>")


def test_history_window(alfworld_data):
    env = sage_gym.make("alfworld-unseen", data_dir=alfworld_data, history_window=2)
    env.reset(options={"episode_id": CLOCK})
    for _ in range(4):
        info = env.step("<action>look</action>")[4]
    assert len(info["messages"]) == 2 + 2 * 2
    full = sage_gym.make("alfworld-unseen", data_dir=alfworld_data)
    full.reset(options={"episode_id": CLOCK})
    for _ in range(4):
        info = full.step("<action>look</action>")[4]
    assert len(info["messages"]) == 2 + 2 * 4


def test_warm_reset_matches_cold(alfworld_data):
    warm = sage_gym.make("alfworld-unseen", data_dir=alfworld_data)
    cold = sage_gym.make("alfworld-unseen", data_dir=alfworld_data, reset_cache_size=0)
    episode_id = one_per_task_type(warm.episode_ids)["pick_heat_then_place_in_recep"]
    agent = ExpertAgent()
    play_episode(warm, agent, episode_id)  # fills the cache and moves the game away from its start
    obs_w, info_w = warm.reset(options={"episode_id": episode_id})
    obs_c, info_c = cold.reset(options={"episode_id": episode_id})
    assert obs_w == obs_c and info_w["admissible_actions"] == info_c["admissible_actions"]
    assert play_episode(warm, agent, episode_id)["won"]


def test_random_agent_only_plays_admissible_actions(env):
    agent = RandomAgent(seed=0)
    _, info = env.reset(options={"episode_id": env.episode_ids[5]})
    for _ in range(5):
        admissible = info["admissible_actions"]
        response = agent.act(env, info)
        _, _, terminated, truncated, info = env.step(response)
        assert info["action_valid"] and info["action"] in admissible
        if terminated or truncated:
            break


def test_bad_env_id_is_clear():
    with pytest.raises(sage_gym.UnknownEnvError, match=r"Unknown env id 'alfworld-unsen'.*Did you mean alfworld-unseen"):
        sage_gym.make("alfworld-unsen")


def test_missing_data_folder_is_clear(tmp_path, monkeypatch):
    monkeypatch.delenv("ALFWORLD_DATA", raising=False)
    with pytest.raises(sage_gym.DataNotFoundError, match="sage data fetch alfworld"):
        sage_gym.make("alfworld-unseen", data_dir=tmp_path)


def test_incomplete_data_folder_is_clear(tmp_path, alfworld_data):
    game = alfworld_data / "json_2.1.1" / sage_gym.make("alfworld-unseen", data_dir=alfworld_data).episode_ids[0]
    target = tmp_path / "json_2.1.1" / "valid_unseen" / game.parent.name / game.name
    target.mkdir(parents=True)
    (target / "game.tw-pddl").write_bytes((game / "game.tw-pddl").read_bytes())
    with pytest.raises(sage_gym.DataNotFoundError, match="has 1 games, expected 134"):
        sage_gym.make("alfworld-unseen", data_dir=tmp_path)


def test_archive_with_wrong_layout_is_refused(tmp_path):
    (tmp_path / "json_2.1.1" / "train").mkdir(parents=True)
    archive = tmp_path / "bad.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "json_2.1.1", arcname="json_2.1.1")
    dest = tmp_path / "dest"
    with pytest.raises(sage_gym.DataNotFoundError, match="train: 0 games, expected 3553"):
        install_alfworld_archive(archive, dest)
    assert not (dest / "json_2.1.1").exists()
    with pytest.raises(sage_gym.DataNotFoundError, match="does not exist"):
        install_alfworld_archive(tmp_path / "nope.tar.xz", dest)


def _sage(*args, env=None):
    return subprocess.run([sys.executable, "-m", "sage_cli", *args], capture_output=True, text=True, env=env)


def test_cli_envs_play_and_errors(alfworld_data):
    out = _sage("envs")
    assert out.returncode == 0 and "alfworld-unseen" in out.stdout and "134" in out.stdout
    out = _sage("play", "--env", "alfworld-unseen", "--agent", "expert", "--seed", "1")
    assert out.returncode == 0, out.stderr
    assert "Result: won" in out.stdout and "admissible:" in out.stdout
    out = _sage("play", "--env", "alfworld-unsen", "--agent", "expert")
    assert out.returncode == 2 and "Unknown env id" in out.stderr and "Traceback" not in out.stderr
    out = _sage("data", "status")
    assert out.returncode == 0 and "3553" in out.stdout
