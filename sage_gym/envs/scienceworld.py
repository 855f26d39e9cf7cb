"""ScienceWorld over the real simulator JVM (scienceworld 1.2.3; SPEC sections 2-3).

Episode ids are ``<task>/<variation>``, e.g. ``boil/17``: the task name as ScienceWorld
lists it (``get_task_names()``) and the variation number. Each env runs one JVM with a
heap cap; the JVM reads a pipe from this process and exits when the process dies.

Speed: the stock ``ScienceWorldEnv.step`` lists every valid action on each step (~90% of
its cost). Here a step is the raw simulator step plus score and completion calls, and the
schema check is a Python match against ScienceWorld's command templates (object names are
left to the simulator, which answers "No known action matches that input." and changes
nothing when it knows no such object here). The valid actions are still listed on demand
by ``admissible_actions()`` (or every step with ``list_actions=True``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import weakref
from functools import lru_cache
from pathlib import Path
from typing import Any

from sage_gym.core import EpisodeStart, GameStep, TextEnv
from sage_gym.errors import EnvCrashedError, SageError
from sage_gym.formatting import ReActFormatter
from sage_gym.registry import EnvSpec, register

SCIENCEWORLD_VERSION = "1.2.3"
PANELS_PATH = Path(__file__).with_name("scienceworld_panels.json")
PANEL_SIZE = 300
SPLITS = {"train": "train", "seen": "dev", "unseen": "test"}  # env split -> ScienceWorld variation set
PANEL_SIZES = {"train": None, "seen": PANEL_SIZE, "unseen": PANEL_SIZE}  # None: every variation
SIMPLIFICATIONS = ("easy", "teleportAction", "selfWateringFlowerPots", "openContainers", "openDoors",
                   "noElectricalAction")
AMBIGUOUS = "Ambiguous request"

# The trigger phrases of ScienceWorld 1.2.3's parser (simulator/.../actions/*.scala), keyed by
# the template names that ``get_possible_actions()`` reports. A template is a verb phrase,
# optionally followed by an object, optionally followed by a separator and a second object.
GRAMMAR: dict[str, tuple[tuple[str, ...], int, tuple[str, ...]]] = {
    "activate OBJ": (("activate", "turn on"), 1, ()),
    "close OBJ": (("close",), 1, ()),
    "connect OBJ to OBJ": (("connect",), 2, ("to", "in", "into")),
    "deactivate OBJ": (("deactivate", "turn off"), 1, ()),
    "disconnect OBJ": (("disconnect",), 1, ()),
    "dunk OBJ in OBJ": (("dunk",), 2, ("in", "into")),
    "eat OBJ": (("eat", "consume"), 1, ()),
    "flush OBJ": (("flush",), 1, ()),
    "focus on OBJ": (("focus on", "focus"), 1, ()),
    "go OBJ": (("go", "go through", "walk through", "move through", "go to", "walk to", "move to", "go into",
                "move into"), 1, ()),
    "inventory": (("inventory",), 0, ()),
    "look around": (("look around", "look"), 0, ()),
    "look at OBJ": (("look at", "look on", "examine"), 1, ()),
    "look in OBJ": (("look in",), 1, ()),
    "mix OBJ": (("mix", "stir"), 1, ()),
    "move OBJ to OBJ": (("move", "put"), 2, ("to", "in", "into", "on")),
    "open OBJ": (("open",), 1, ()),
    "pick up OBJ": (("pick up", "get", "take"), 1, ()),
    "pour OBJ in OBJ": (("pour",), 2, ("in", "into", "on", "to")),
    "put down OBJ": (("put down", "drop"), 1, ()),
    "read OBJ": (("read",), 1, ()),
    "reset task": (("reset task",), 0, ()),
    "task": (("task",), 0, ()),
    "teleport OBJ": (("teleport", "teleport to", "teleport into"), 1, ()),
    "use OBJ on OBJ": (("use",), 2, ("on", "with")),
    "wait": (("wait",), 0, ()),
    "wait1": (("wait1",), 0, ()),
}

RULES = """You are an agent in ScienceWorld, a text-based simulation of an elementary-school science lab and house \
(rooms such as the kitchen, workshop, greenhouse and outside, linked by doors) with working thermodynamics, \
electricity, chemistry, plants, animals and genetics. You act by typing one command per turn. OBJ stands for an \
object or place named in the observations (e.g. "metal pot", "door to kitchen", "substance in metal pot").
Commands:
  look around: describe the current room
  look at OBJ (or examine OBJ): describe an object; look in OBJ: show a container's contents
  go to OBJ: move to a room through an open door; open OBJ / close OBJ: open or close a door or container
  pick up OBJ: put an object in your inventory; put down OBJ: drop an object from your inventory
  move OBJ to OBJ: move an object into a container; pour OBJ in OBJ: pour a liquid; dunk OBJ in OBJ
  activate OBJ / deactivate OBJ: switch a device (stove, sink, ...) on or off
  use OBJ on OBJ: use a device (thermometer, ...) on an object; read OBJ; eat OBJ; flush OBJ; mix OBJ
  connect OBJ to OBJ / disconnect OBJ: wire electrical components (terminals, wires, batteries)
  focus on OBJ: declare the object your task is about (focusing on a wrong object fails the task)
  wait: let 10 time steps pass; wait1: let one time step pass
  inventory: list what you carry; task: repeat the task description
When the game lists numbered options after an ambiguous command, answer with the number of your choice.
Finish the task in as few turns as you can."""


# ---- panels ------------------------------------------------------------------------
@lru_cache(maxsize=1)
def load_variations() -> dict[str, dict[str, list[int]]]:
    """The shipped variation lists ``{split: {task: [variation, ...]}}`` (no JVM needed)."""
    data = json.loads(PANELS_PATH.read_text())
    return data["variations"]


def build_panel(variations: dict[str, list[int]], size: int | None) -> list[str]:
    """A deterministic panel of ``task/variation`` ids, tasks interleaved round-robin.

    Each of the tasks (sorted by name) gets one slot per round until ``size`` is reached
    (None: every variation); a task's slots are spread evenly over its sorted variations.
    Interleaving makes every prefix of the panel cover the tasks evenly.
    """
    tasks = sorted(variations)
    pools = {t: sorted(variations[t]) for t in tasks}
    quota = {t: len(pools[t]) if size is None else 0 for t in tasks}
    left = 0 if size is None else size
    while left > 0 and any(quota[t] < len(pools[t]) for t in tasks):
        for t in tasks:
            if left > 0 and quota[t] < len(pools[t]):
                quota[t], left = quota[t] + 1, left - 1
    picks = {t: [pools[t][i * len(pools[t]) // quota[t]] for i in range(quota[t])] for t in tasks}
    rounds = max(quota.values(), default=0)
    return [f"{t}/{picks[t][r]}" for r in range(rounds) for t in tasks if r < quota[t]]


@lru_cache(maxsize=None)
def episode_ids(split: str) -> tuple[str, ...]:
    """The episode ids of ``scienceworld-<split>`` (train: all 3592 train variations)."""
    if split not in SPLITS:
        raise ValueError(f"Unknown ScienceWorld split {split!r}; choose one of {', '.join(SPLITS)}")
    return tuple(build_panel(load_variations()[SPLITS[split]], PANEL_SIZES[split]))


def fetch_variations(server) -> dict[str, dict[str, list[int]]]:
    """Ask a running simulator (``PythonInterface``) for every task's train/dev/test variations."""
    out: dict[str, dict[str, list[int]]] = {s: {} for s in SPLITS.values()}
    for task in sorted(server.getTaskNames()):
        server.load(task, 0, "", False)
        out["train"][task] = sorted(server.getVariationsTrain())
        out["dev"][task] = sorted(server.getVariationsDev())
        out["test"][task] = sorted(server.getVariationsTest())
    return out


def write_panels(path: Path = PANELS_PATH) -> Path:
    """Regenerate the shipped variation file from the simulator (see docs/scienceworld.md)."""
    import scienceworld

    jvm = ScienceWorldJVM()
    try:
        data = {"scienceworld": scienceworld.__version__, "variations": fetch_variations(jvm.server)}
    finally:
        jvm.close()
    path.write_text(json.dumps(data, sort_keys=True, separators=(",", ":")) + "\n")
    return path


# ---- the simulator process -----------------------------------------------------------
def _stop(proc, gateway) -> None:
    """Stop a simulator JVM: closing its stdin pipe makes it exit (py4j ``--die-on-broken-pipe``)."""
    # Mark the client disconnected first, or py4j retries (and logs) for every Java object
    # that Python garbage-collects later.
    gateway._gateway_client.is_connected = False
    gateway._gateway_client.close()
    if proc.poll() is None:
        try:
            proc.stdin.close()
            proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()


class ScienceWorldJVM:
    """One ScienceWorld simulator JVM behind a py4j gateway.

    The JVM gets ``-Xmx<heap> -XX:+UseSerialGC -XX:+ExitOnOutOfMemoryError`` and py4j's
    ``die_on_exit``: it reads a pipe from this process and exits when the pipe closes, so it
    does not outlive this process even after SIGKILL (unless a forked child holds the pipe).
    ``deterministic``: the simulator keeps its objects in hash sets whose order, by default, follows
    Java identity hashes, so the order of same-named objects in observations, ambiguity menus and even
    gold paths changes from one load to the next. Its ``EnvObject`` then hashes by its per-load uuid
    (``scienceworld_hash``: the class is patched on the classpath) and every other object gets one
    identity hash (``-XX:hashCode=2``), so an episode is a function of its actions, at stock speed.
    """

    def __init__(self, heap: str = "512m", deterministic: bool = True):
        from py4j.java_gateway import GatewayParameters, JavaGateway, launch_gateway
        from scienceworld.constants import BASEPATH, JAR_PATH

        if shutil.which("java") is None:
            raise SageError("ScienceWorld needs Java 17+ on PATH (e.g. `apt-get install openjdk-17-jre-headless`).")
        classpath = JAR_PATH
        if deterministic:
            from sage_gym.envs.scienceworld_hash import patched_classes

            classpath = f"{patched_classes(JAR_PATH)}{os.pathsep}{JAR_PATH}"
        try:
            port, self.proc = launch_gateway(
                classpath=classpath, die_on_exit=True, cwd=BASEPATH, return_proc=True,
                javaopts=[f"-Xmx{heap}", "-XX:+UseSerialGC", "-XX:+ExitOnOutOfMemoryError"]
                + (["-XX:+UnlockExperimentalVMOptions", "-XX:hashCode=2"] if deterministic else []))
        except ValueError as e:  # the JVM printed no port: it failed to start
            raise EnvCrashedError(f"The ScienceWorld JVM failed to start with -Xmx{heap} (the heap takes a Java "
                                  "size such as '512m' or '2g'; is Java 17+ installed?)") from e
        self.gateway = JavaGateway(gateway_parameters=GatewayParameters(port=port), java_process=self.proc)
        self.server = self.gateway.jvm.scienceworld.runtime.pythonapi.PythonInterface()
        self._finalizer = weakref.finalize(self, _stop, self.proc, self.gateway)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        self._finalizer()


# ---- the schema ------------------------------------------------------------------------
def normalize(action: str) -> str:
    """Lower-case, collapse spaces and drop the articles, as ScienceWorld's parser does."""
    return " ".join(w for w in action.lower().split() if w not in ("a", "an", "the"))


def fits_template(text: str, template: str) -> bool:
    """Whether normalized ``text`` fits a template, with any non-empty object names.

    Mirrors the simulator's prefix matching, so it accepts everything the simulator's
    parser can accept; the simulator then checks the object names itself.
    """
    verbs, slots, separators = GRAMMAR.get(template, ((template,), 0, ()))
    for verb in verbs:
        if not text.startswith(verb):
            continue
        rest = text[len(verb):].strip()
        if (slots == 0 and not rest) or (slots == 1 and rest):
            return True
        if slots == 2:
            for sep in separators:
                at = rest.find(sep, 1)
                while at > 0:
                    if rest[at + len(sep):].strip():
                        return True
                    at = rest.find(sep, at + 1)
    return False


# ---- the env ---------------------------------------------------------------------------
class ScienceWorldEnv(TextEnv):
    """A ScienceWorld split as a multi-turn text env (turn cap 30, score = max(points, 0)/100).

    ``list_actions``: put the valid actions into ``info["admissible_actions"]`` each step
    (costly: ~100 ms); ``admissible_actions()`` lists them on demand either way.
    ``jvm_heap``: the JVM's -Xmx. ``deterministic``: make the simulator's object order
    reproducible (see ``ScienceWorldJVM``). ``simplifications``: ScienceWorld's comma-separated
    simplification string (e.g. "easy"); the benchmark setting is none.
    """

    rules = RULES

    def __init__(self, split: str = "unseen", max_turns: int = 30, formatter: ReActFormatter | None = None,
                 history_window: int | None = None, list_actions: bool = False, jvm_heap: str = "512m",
                 deterministic: bool = True, simplifications: str = "", render_mode: str | None = None):
        unknown = [s for s in simplifications.split(",") if s and s not in SIMPLIFICATIONS]
        if unknown:
            raise ValueError(f"Unknown ScienceWorld simplification(s) {unknown}; choose from {', '.join(SIMPLIFICATIONS)}")
        self.env_id = f"scienceworld-{split}"
        super().__init__(list(episode_ids(split)), max_turns, formatter or ReActFormatter(history_window), render_mode)
        self.split, self.list_actions, self.simplifications = split, list_actions, simplifications
        self.jvm_heap, self.deterministic = jvm_heap, deterministic
        self._jvm: ScienceWorldJVM | None = None
        self._templates: list[str] = []
        self._task, self._variation = "", 0
        self._sent: list[str] = []  # actions the simulator ran this episode, to replay after a gold-path load
        self._gold: list[str] | None = None
        self._ambiguous = False

    # ---- JVM calls -------------------------------------------------------------------
    def _call(self, method: str, *args: Any) -> Any:
        """Call the simulator; a dead JVM or a Java exception becomes ``EnvCrashedError``."""
        from py4j.protocol import Py4JError, Py4JJavaError

        if self._jvm is None:
            raise EnvCrashedError("The ScienceWorld JVM is not running (it crashed or the env was closed): call reset().")
        error: Exception | None = None
        if self._jvm.alive():  # checked first so that a dead JVM does not make py4j retry and log
            try:
                return getattr(self._jvm.server, method)(*args)
            except Py4JError as e:
                error = e
        jvm, self._jvm = self._jvm, None
        rc = jvm.proc.poll()
        if rc is None and not isinstance(error, Py4JJavaError):  # the connection broke: a dying JVM
            try:
                rc = jvm.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        what = f"{method}({', '.join(map(repr, args))})"
        jvm.close()
        if rc is not None:
            raise EnvCrashedError(f"The ScienceWorld JVM (pid {jvm.pid}) died with exit code {rc} before or during "
                                  f"{what}. Call reset() to start a fresh one.") from error
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise EnvCrashedError(f"The ScienceWorld simulator failed during {what}: {detail}. "
                              "Its JVM was stopped; call reset() to start a fresh one.") from error

    @property
    def jvm_pid(self) -> int | None:
        """The simulator JVM's process id (None before the first reset and after close)."""
        return self._jvm.pid if self._jvm is not None else None

    def _load(self, gold: bool) -> str:
        error = self._call("load", self._task, self._variation, self.simplifications, gold)
        if error:
            raise SageError(f"ScienceWorld could not load {self._task}/{self._variation}: {error}")
        return self._call("step", "look around")

    # ---- game hooks ------------------------------------------------------------------
    def _start_episode(self, episode_id: str) -> EpisodeStart:
        if self._jvm is not None and not self._jvm.alive():
            self._jvm.close()
            self._jvm = None
        if self._jvm is None:
            self._jvm = ScienceWorldJVM(self.jvm_heap, self.deterministic)
        task, _, variation = episode_id.rpartition("/")
        self._task, self._variation = task, int(variation)
        self._sent, self._gold, self._ambiguous = [], None, False
        observation = self._load(gold=False)
        self._templates = list(self._call("getPossibleActions"))
        return EpisodeStart(task=self._call("getTaskDescription"), observation=observation, task_type=task,
                            extra={"variation": self._variation})

    def _game_step(self, action: str) -> GameStep:
        observation = self._call("step", action)
        self._sent.append(action)
        self._ambiguous = observation.startswith(AMBIGUOUS)
        points = int(round(100 * self._call("getScore")))
        completed = bool(self._call("getCompleted"))
        return GameStep(observation=observation, score=max(points, 0) / 100, done=completed or points < 0,
                        won=completed and points == 100,
                        extra={"points": points, "ambiguous": self._ambiguous})  # a numbered menu awaits an answer

    def is_valid_action(self, action: str) -> bool:
        text = normalize(action)
        if self._ambiguous and text.isdigit():
            return True
        return any(fits_template(text, t) for t in self._templates)

    def admissible_actions(self) -> list[str]:
        return list(self._call("getValidActionObjectCombinations"))

    def info_admissible_actions(self) -> list[str]:
        return self.admissible_actions() if self.list_actions else []

    def expert_actions(self) -> list[str]:
        """The gold action sequence from the episode start (generated on first request: 0.1-9 s)."""
        if self._gold is None:
            self._load(gold=True)  # generating the gold path reloads the task: replay this episode
            self._gold = list(self._call("getGoldActionSequence"))
            for action in self._sent:
                self._call("step", action)
        return list(self._gold)

    def close(self):
        if self._jvm is not None:
            self._jvm.close()
            self._jvm = None
        super().close()


def data_status(spec: EnvSpec) -> str:
    """`sage envs` status line: ScienceWorld ships with its data, it needs Java."""
    return "ready" if shutil.which("java") else "missing: Java 17+ (apt-get install openjdk-17-jre-headless)"


for _split in SPLITS:
    register(EnvSpec(env_id=f"scienceworld-{_split}", entry_point="sage_gym.envs.scienceworld:ScienceWorldEnv",
                     family="scienceworld", split=_split, max_turns=30, num_episodes=len(episode_ids(_split)),
                     kwargs={"split": _split}, has_train_split=_split == "train",
                     data_status="sage_gym.envs.scienceworld:data_status"))
