"""ScienceWorld over the real simulator JVM: panels, schema, expert, turn cap, JVM lifecycle."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
from gymnasium.utils.env_checker import check_env

import sage_gym
from sage_gym.agents import ExpertAgent, play_episode
from sage_gym.envs import scienceworld as sw

QUICK_TASKS = ("find-animal", "lifespan-longest-lived", "chemistry-mix", "power-component")


@pytest.fixture(scope="module")
def env():
    env = sage_gym.make("scienceworld-unseen")
    yield env
    env.close()


def first_of(split: str, task: str) -> str:
    return next(e for e in sw.episode_ids(split) if e.startswith(task + "/"))


def act(env, action: str):
    return env.step(env.unwrapped.formatter.format_action(action))


def jvm_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def test_registry_and_panels_without_a_jvm():
    specs = {s.env_id: s for s in sage_gym.list_envs() if s.family == "scienceworld"}
    assert {k: (v.num_episodes, v.max_turns, v.has_train_split) for k, v in specs.items()} == {
        "scienceworld-train": (3592, 30, True), "scienceworld-seen": (300, 30, False),
        "scienceworld-unseen": (300, 30, False)}
    variations = sw.load_variations()
    tasks = sorted(variations["train"])
    assert len(tasks) == 30 and sum(map(len, variations["dev"].values())) == 1796
    panels = {split: sw.episode_ids(split) for split in sw.SPLITS}
    for split, ids in panels.items():
        assert len(set(ids)) == len(ids)
        assert all(re.fullmatch(r"[a-z0-9-]+/\d+", e) for e in ids)
        assert sorted({e.split("/")[0] for e in ids[:30]}) == tasks  # interleaved: a prefix covers every task
        source = variations[sw.SPLITS[split]]
        assert all(int(e.split("/")[1]) in source[e.split("/")[0]] for e in ids)
    # splits do not overlap, and the panel is a pure function of the variation lists (any input order)
    assert not set(panels["seen"]) & set(panels["unseen"]) and not set(panels["train"]) & set(panels["seen"])
    shuffled = {t: random.Random(0).sample(v, len(v)) for t, v in reversed(list(variations["test"].items()))}
    assert sw.build_panel(shuffled, 300) == list(panels["unseen"])
    assert sw.build_panel({"a": [5, 1], "b": [3, 4, 9, 7]}, 5) == ["a/1", "b/3", "a/5", "b/4", "b/7"]
    made = sage_gym.make("scienceworld-seen")
    assert made.unwrapped.jvm_pid is None and made.unwrapped.episode_ids == list(panels["seen"])
    with pytest.raises(ValueError, match="simplification"):
        sage_gym.make("scienceworld-seen", simplifications="nonsense")


def test_shipped_variations_equal_a_fresh_computation(env):
    import scienceworld

    env.reset(options={"episode_id": first_of("unseen", "boil")})
    shipped = __import__("json").loads(sw.PANELS_PATH.read_text())
    assert shipped["scienceworld"] == scienceworld.__version__ == sw.SCIENCEWORLD_VERSION
    assert sw.fetch_variations(env.unwrapped._jvm.server) == shipped["variations"]


def test_expert_wins_and_every_gold_action_fits_the_schema(env):
    for task in QUICK_TASKS:
        episode_id = first_of("unseen", task)
        result = play_episode(env, ExpertAgent(), episode_id=episode_id)
        assert result["won"] and result["score"] == 1.0 and result["terminated"], episode_id
        assert result["points"] == 100 and result["task_type"] == task
        plan = env.unwrapped.expert_actions()
        assert all(any(sw.fits_template(sw.normalize(a), t) for t in sw.GRAMMAR) for a in plan)


def test_expert_path_is_replayed_when_requested_mid_episode(env):
    episode_id = first_of("unseen", "find-animal")
    env.reset(options={"episode_id": episode_id})
    plan = env.unwrapped.expert_actions()
    env.reset(options={"episode_id": episode_id})
    for action in plan[:4]:
        act(env, action)
    assert env.unwrapped.expert_actions() == plan  # generated now: the game reloads and replays 4 actions
    for action in plan[4:]:
        _, _, terminated, _, info = act(env, action)
    assert terminated and info["won"]


def test_invalid_responses_and_the_template_schema(env):
    env.reset(options={"episode_id": first_of("unseen", "find-animal")})
    cases = [("", "empty"), ("I think so.", "unparseable"), ("<action>a</action><action>b</action>", "unparseable"),
             ("<action>fly to the moon</action>", "schema_violation"),  # no template
             ("<action>help</action>", "schema_violation"),  # a simulator meta-command, not an action
             ("<action>0</action>", "schema_violation")]  # a menu number with no ambiguity menu open
    for turn, (response, reason) in enumerate(cases, 1):
        obs, reward, terminated, truncated, info = env.step(response)
        assert (info["action_valid"], info["invalid_reason"], info["turn"]) == (False, reason, turn)
        assert reward == 0.0 and not terminated and obs.startswith("Invalid response")
    # a template with an object the simulator does not know here: a valid turn, the game says so
    obs, reward, _, _, info = act(env, "open unicorn")
    assert info["action_valid"] and obs == "No known action matches that input." and reward == 0.0
    _, _, _, _, info = act(env, "Look at  the TABLE")  # case, spaces and articles do not matter
    assert info["action_valid"] and "table" in info["messages"][-1]["content"]
    _, _, _, _, info = act(env, "look around")
    assert info["action_valid"] and info["invalid_reason"] is None and "This room is called" in info["messages"][-1]["content"]
    assert info["admissible_actions"] == []  # listing is off by default
    listed = env.unwrapped.admissible_actions()
    assert "look around" in listed and "inventory" in listed
    assert all(env.unwrapped.is_valid_action(a) for a in listed)  # the schema accepts every valid action
    env.unwrapped.list_actions = True
    try:
        _, _, _, _, info = act(env, "look around")
        # (the simulator words some object names differently from call to call: compare sizes)
        assert len(info["admissible_actions"]) == len(env.unwrapped.admissible_actions()) > 100
    finally:
        env.unwrapped.list_actions = False


def test_ambiguity_menu_numbers_are_valid_only_while_a_menu_is_open(env):
    u = env.unwrapped
    episode_id = first_of("unseen", "grow-plant")
    env.reset(options={"episode_id": episode_id})
    plan = u.expert_actions()
    menu = next(i for i, a in enumerate(plan) if a.isdigit())
    u.max_turns = 200
    try:
        for action in plan[:menu]:
            obs, *_ = act(env, action)
        assert obs.startswith("Ambiguous request") and u.is_valid_action(plan[menu])
        obs, _, _, _, info = act(env, plan[menu])
        assert info["action_valid"] and not u.is_valid_action("0")
    finally:
        u.max_turns = 30


def test_play_as_a_human_shows_the_task_and_menu_answers_and_help_are_free(env):
    """`sage play`: the task text is shown (the first observation does not state it); `help` and the number
    that answers an ambiguity menu cost no turn; a command the game does not know is told to a person."""
    from typer.testing import CliRunner

    from sage_cli.main import app

    episode_id = first_of("unseen", "grow-plant")
    env.reset(options={"episode_id": episode_id})
    plan = env.unwrapped.expert_actions()
    task = env.unwrapped._episode.task
    menu = next(i for i, a in enumerate(plan) if a.isdigit())
    typed = ["help", *plan[:menu + 1], "fly away", "quit"]
    out = CliRunner().invoke(app, ["play", "--env", "scienceworld-unseen", "--episode", episode_id],
                             input="\n".join(typed) + "\n", env={"COLUMNS": "400"})
    assert out.exit_code == 0, out.output
    text = " ".join(out.output.split())
    assert f"Task: {' '.join(task.split())}" in text
    assert "commands (help costs no turn)" in text and "menu answer: no turn used" in text
    assert "'fly away' is not a command this game knows" in text and "Reply with your reasoning" not in text
    assert "Result: not won, score" in text and f"{menu + 1} turns (quit)" in text  # the menu answer was free


def test_failure_scores_zero_and_turn_cap_truncates(env):
    env.reset(options={"episode_id": first_of("unseen", "find-animal")})
    _, reward, terminated, truncated, info = act(env, "focus on air")  # air is not an animal: the task fails
    assert terminated and not truncated and info["points"] == -100 and info["score"] == 0.0 and not info["won"]
    env.reset(options={"episode_id": first_of("unseen", "boil")})
    for turn in range(1, 31):
        _, _, terminated, truncated, info = act(env, "look around")
        assert not terminated and truncated == (turn == 30)
    with pytest.raises(RuntimeError, match="reset"):
        act(env, "look around")


def _trace(env, episode_id: str) -> tuple[list[str], list[str]]:
    """An episode's gold path and the observations along its first 12 actions."""
    obs, _ = env.reset(options={"episode_id": episode_id})
    plan = env.unwrapped.expert_actions()
    env.reset(options={"episode_id": episode_id})
    return plan, [obs] + [act(env, a)[0] for a in plan[:12]]


def test_episodes_repeat_across_loads_and_jvms_and_stock_hashing_does_not(env):
    """deterministic=True (the default): an episode is a function of its actions, the same observations and
    gold path after other tasks ran in the JVM and in a fresh JVM; the simulator's EnvObject hashes by uuid
    (the patched class is the one loaded). Stock identity hashes change the episode between loads."""
    from sage_gym.envs.scienceworld_hash import add_uuid_hash_code, patched_classes

    episode_id = first_of("unseen", "find-animal")
    first = _trace(env, episode_id)
    env.reset(options={"episode_id": first_of("unseen", "chemistry-mix")})
    act(env, "look around")
    assert _trace(env, episode_id) == first
    cls = env.unwrapped._jvm.gateway.jvm.java.lang.Class.forName("scienceworld.struct.EnvObject")
    assert "hashCode" in [m.getName() for m in cls.getDeclaredMethods()]
    fresh = sage_gym.make("scienceworld-unseen")
    try:
        assert _trace(fresh, episode_id) == first
    finally:
        fresh.close()
    stock = sage_gym.make("scienceworld-unseen", deterministic=False)
    try:
        traces = [_trace(stock, episode_id) for _ in range(3)]
    finally:
        stock.close()
    assert any(t != traces[0] for t in traces[1:]), "stock hashing repeated the episode: the test cannot tell"
    from scienceworld.constants import JAR_PATH

    with pytest.raises(ValueError, match="already declares hashCode"):  # a simulator that hashes itself
        add_uuid_hash_code((patched_classes(JAR_PATH) / "scienceworld/struct/EnvObject.class").read_bytes())


def test_check_env(env):
    check_env(env.unwrapped, skip_render_check=True)


def test_crash_gives_a_clear_error_and_reset_recovers(env):
    u = env.unwrapped
    env.reset(options={"episode_id": first_of("unseen", "find-animal")})
    pid = u.jvm_pid
    os.kill(pid, signal.SIGKILL)
    assert jvm_gone(pid)
    with pytest.raises(sage_gym.EnvCrashedError, match=rf"pid {pid}\) died"):
        act(env, "look around")
    with pytest.raises(sage_gym.EnvCrashedError, match="reset"):
        act(env, "look around")
    obs, info = env.reset(options={"episode_id": first_of("unseen", "find-animal")})
    assert u.jvm_pid not in (None, pid) and "This room is called" in obs
    assert act(env, "look around")[4]["action_valid"]


def test_close_stops_the_jvm():
    env = sage_gym.make("scienceworld-seen", jvm_heap="256m")
    env.reset(options={"episode_id": first_of("seen", "find-animal")})
    pid = env.unwrapped.jvm_pid
    cmdline = psutil.Process(pid).cmdline()
    assert "-Xmx256m" in cmdline and "-XX:+UseSerialGC" in cmdline
    env.close()
    assert env.unwrapped.jvm_pid is None and jvm_gone(pid, timeout=2)


def test_jvm_does_not_outlive_a_killed_parent():
    code = textwrap.dedent(f"""
        import sys, time, sage_gym
        env = sage_gym.make("scienceworld-seen")
        env.reset(options={{"episode_id": {first_of("seen", "find-animal")!r}}})
        print(env.unwrapped.jvm_pid, flush=True)
        time.sleep(120)
    """)
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())
        assert psutil.Process(pid).name() == "java"
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert jvm_gone(pid), f"the JVM {pid} outlived its killed parent"
    finally:
        parent.kill()
