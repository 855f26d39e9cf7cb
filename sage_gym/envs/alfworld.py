"""ALFWorld over the real textworld PDDL engine (SPEC sections 2-3).

Games are registered by path, like alfworld's ``AlfredTWEnv`` does internally, because
the released game archive has no ``traj_data.json``. ``AlfredGame`` keeps each game's
translated planning task and initial state (in memory, and on disk for other processes), so
resetting a game seen before skips Fast Downward's translator (the ~1 s ALFWorld users know),
and ``fast_text_generation`` removes most of the cost of a step, with identical output.
"""

from __future__ import annotations

import copy
import hashlib
import os
import pickle
import re
import zlib
from collections import Counter, OrderedDict, defaultdict
from functools import cache, lru_cache
from pathlib import Path

from sage_gym.core import EpisodeStart, GameStep, TextEnv
from sage_gym.envs.alfworld_expert import HandCodedExpert
from sage_gym.procs import hash_seed
from sage_gym.data import ALFWORLD_COUNTS, ALFWORLD_SPLITS, FIX, GAME_FILE, find_alfworld, split_games
from sage_gym.errors import DataNotFoundError
from sage_gym.formatting import ReActFormatter
from sage_gym.registry import EnvSpec, register

TASK_TYPES = (
    "pick_and_place_simple", "look_at_obj_in_light", "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep", "pick_cool_then_place_in_recep", "pick_two_obj_and_place",
)
INTRO = "-= Welcome to TextWorld, ALFRED! =-"
RULES = """You are an agent in a household (ALFWorld). You act by typing one text command per turn.
Commands: go to {recep}; take {obj} from {recep}; move {obj} to {recep}; open {recep}; close {recep};
use {obj}; heat {obj} with {recep}; cool {obj} with {recep}; clean {obj} with {recep};
examine {obj or recep}; inventory; look. Names carry a number, e.g. "desk 1", "mug 2".
Finish the task in as few turns as you can."""
_ENTITY = r"[a-z][a-z_-]*(?: [a-z][a-z_-]*)* \d+"


def task_type_of(episode_id: str) -> str:
    """ALFWorld's task type: the first part of the game's folder name."""
    return Path(episode_id).parts[-2].split("-")[0]


def interleave_by_task_type(episode_ids: list[str]) -> list[str]:
    """The panel order: one game of each task type in turn (TASK_TYPES order, games sorted by path),
    so that any prefix, e.g. ``--limit 12``, covers the six task types evenly."""
    by_type: dict[str, list[str]] = {t: [] for t in TASK_TYPES}
    for episode_id in sorted(episode_ids):
        by_type.setdefault(task_type_of(episode_id), []).append(episode_id)
    rounds = max(len(games) for games in by_type.values())
    return [games[r] for r in range(rounds) for games in by_type.values() if r < len(games)]


def template_regex(templates: list[str]) -> re.Pattern:
    """One regex for the PDDL command grammar: each ``{slot}`` or ``[...]`` becomes an entity name."""
    alternatives = []
    for template in templates:
        parts = re.split(r"(\{[^}]*\}|\[[^\]]*\])", template)
        alternatives.append("".join(_ENTITY if p.startswith(("{", "[")) else re.escape(p) for p in parts if p))
    return re.compile("^(?:" + "|".join(sorted(set(alternatives))) + ")$")


@cache
def fast_text_generation() -> None:
    """Make textworld 1.7.0's text generation cheaper without changing one character of its output.

    Each step, textworld derives the command text of every applicable action and the feedback from
    grammar templates, and (1) parses each template with tatsu on every use, (2) deep-copies the
    entity infos and action mapping at every symbol. Here (1) each distinct template is parsed once
    and copies of the parse are handed out, and (2) those two dicts are copied shallowly: the text
    generation only adds keys to them and never mutates the entities they hold. Installed once per
    process; tests compare every feedback and command list with stock textworld's.
    """
    from textworld.envs.pddl import textgen

    parse = textgen._parse_and_convert

    @lru_cache(maxsize=1 << 16)
    def parsed(args: tuple, kwargs: tuple) -> list:
        return parse(*args, **dict(kwargs))

    def parse_once(*args, **kwargs):
        return copy.deepcopy(parsed(args, tuple(sorted(kwargs.items()))))

    def copy_context(context: dict) -> dict:
        return {"state": context["state"], "facts": context["facts"], "variables": dict(context["variables"]),
                "mapping": dict(context["mapping"]), "entity_infos": context["entity_infos"]}

    textgen._parse_and_convert, textgen.copy_context = parse_once, copy_context


def reset_cache_dir() -> Path:
    """Where translated games are kept between processes: $SAGE_CACHE/alfworld-reset (~/.cache/sage)."""
    return Path(os.environ.get("SAGE_CACHE", Path.home() / ".cache" / "sage")) / "alfworld-reset"


class AlfredGame:
    """One textworld PDDL engine with ALFWorld's name demangling and a warm-reset cache.

    ``cache_size`` bounds how many games keep their translated task in memory (LRU). With
    ``disk_cache`` and a fixed string-hash seed (env worker processes have one, see
    ``sage_gym.procs``), a game translated once is saved (pickled and compressed, ~0.15 MB) under
    ``reset_cache_dir()`` and later processes reset it warm too: evaluation seeds, worker
    processes and later runs never pay Fast Downward's translator again for that game.
    """

    def __init__(self, cache_size: int = 64, disk_cache: bool = True):
        import textworld
        from alfworld.agents.environment.alfred_tw_env import AlfredDemangler
        from textworld.envs.pddl import PddlEnv

        fast_text_generation()
        # facts: the hand-coded expert reads the game's predicates
        infos = textworld.EnvInfos(won=True, admissible_commands=True, facts=True, extras=["walkthrough"])
        self._pddl = PddlEnv(infos)
        self._env = AlfredDemangler(shuffle=False)(self._pddl)
        self._cache: OrderedDict[str, dict] = OrderedDict()
        self.cache_size = cache_size
        self.disk = reset_cache_dir() if disk_cache else None
        self.state = None

    def reset(self, game_file: str):
        """Load and reset ``game_file``; warm (no translator run) when the game is cached in memory or on disk."""
        entry = self._cache.get(game_file) or self._from_disk(game_file)
        if entry is not None:
            self._keep(game_file, entry)
            self.state = self._warm_reset(entry)
        else:
            self._env.load(game_file)
            self.state = self._env.reset()
            self._remember(game_file)
        return self.state

    def _disk_path(self, game_file: str) -> Path | None:
        """The cache file of ``game_file``; None unless string hashing is seeded: textworld and Fast Downward
        objects keep their hash, which only means the same thing in a process with the same seed."""
        seed = hash_seed()
        if self.disk is None or seed is None:
            return None
        import textworld

        stat = os.stat(game_file)
        key = (f"{os.path.abspath(game_file)}\0{stat.st_size}\0{stat.st_mtime_ns}\0{textworld.__version__}"
               f"\0{seed}")
        return self.disk / f"{hashlib.sha256(key.encode()).hexdigest()}.pkl.z"

    def _from_disk(self, game_file: str) -> dict | None:
        path = self._disk_path(game_file)
        if path is None or not path.is_file():
            return None
        try:
            return pickle.loads(zlib.decompress(path.read_bytes()))
        except Exception:  # noqa: BLE001 - a torn or stale cache file: translate again and rewrite it
            return None

    def _to_disk(self, game_file: str, entry: dict) -> None:
        path = self._disk_path(game_file)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_bytes(zlib.compress(pickle.dumps(entry, protocol=pickle.HIGHEST_PROTOCOL), 3))  # ~12x smaller
            os.replace(tmp, path)  # atomic: readers see the old file or the whole new one
        except OSError:
            tmp.unlink(missing_ok=True)  # a full or read-only disk only costs speed

    def step(self, command: str):
        self.state, _, done = self._env.step(command)
        return self.state, done

    def _remember(self, game_file: str) -> None:
        p, st = self._pddl, self._pddl._pddl_state
        entry = {
            "env": {k: getattr(p, k) for k in ("_game_data", "_game_file", "walkthrough", "_logic", "_entity_infos")},
            # a snapshot: the live state mutates its fact sets in place as the game is played
            "pddl_state": {k: _snapshot(v) for k, v in vars(st).items() if k not in ("_operators", "downward_lib")},
            "game_state": copy.copy(self.state),
        }
        self._to_disk(game_file, entry)
        self._keep(game_file, entry)

    def _keep(self, game_file: str, entry: dict) -> None:
        """Put ``entry`` in the in-memory LRU (most recent last)."""
        if self.cache_size <= 0:
            return
        self._cache[game_file] = entry
        self._cache.move_to_end(game_file)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _warm_reset(self, entry: dict):
        """Restore the initial state: reload the cached SAS task into the planner library and
        copy the initial facts and game state; textworld's step then works unchanged."""
        from textworld.envs.pddl.logic import PddlState

        p = self._pddl
        for key, value in entry["env"].items():
            setattr(p, key, value)
        saved = entry["pddl_state"]
        state = object.__new__(PddlState)
        state.__dict__.update(saved)
        state._facts = defaultdict(set, {k: set(v) for k, v in saved["_facts"].items()})
        state._vars_by_name = dict(saved["_vars_by_name"])
        state._vars_by_type = defaultdict(set, {k: set(v) for k, v in saved["_vars_by_type"].items()})
        state._var_counts = Counter(saved["_var_counts"])
        state.downward_lib = p.downward_lib
        p.downward_lib.load_sas(state.sas.encode("utf-8"))
        p.downward_lib.load_sas_replan(state.sas_replan.encode("utf-8"))
        state.all_applicable_actions()  # rebuilds the operator table that step() applies
        p._pddl_state, p.prev_state, p._last_action, p._moves = state, None, None, 0
        p.state = copy.copy(entry["game_state"])
        return p.state


def _snapshot(value):
    """A copy of a PddlState attribute that later play cannot change: dicts of sets and counters copied one
    level down (their sets hold immutable propositions and variables), anything else as is."""
    if isinstance(value, Counter):
        return Counter(value)
    if isinstance(value, dict):
        return {k: set(v) if isinstance(v, set) else v for k, v in value.items()}
    return value


class AlfWorldEnv(TextEnv):
    """An ALFWorld split as a multi-turn text env (turn cap 30, score 0/1, success = won).

    ``expert_labels``: put the hand-coded expert's next move from the current state in
    ``info["expert"]`` (``{"action", "thought"}``), to label another agent's turns (DAgger, judge data).
    Off by default: it is privileged information an agent under evaluation must not read.
    """

    rules = RULES

    def __init__(self, split: str = "unseen", data_dir: str | None = None, max_turns: int = 30,
                 formatter: ReActFormatter | None = None, history_window: int | None = None,
                 reset_cache_size: int = 64, render_mode: str | None = None, expert_labels: bool = False,
                 disk_cache: bool = True):
        if split not in ALFWORLD_SPLITS:
            raise ValueError(f"Unknown ALFWorld split {split!r}; choose one of {', '.join(ALFWORLD_SPLITS)}")
        folder = ALFWORLD_SPLITS[split]
        self.env_id = f"alfworld-{split}"
        self.root = find_alfworld(data_dir, folder) / "json_2.1.1"
        episode_ids = split_games(self.root.parent, folder)
        if len(episode_ids) != ALFWORLD_COUNTS[folder]:
            raise DataNotFoundError(f"ALFWorld split {folder} under {self.root} has {len(episode_ids)} games, "
                                    f"expected {ALFWORLD_COUNTS[folder]}: the data folder is incomplete. {FIX}")
        super().__init__(interleave_by_task_type(episode_ids), max_turns, formatter or ReActFormatter(history_window),
                         render_mode)
        self._game = AlfredGame(cache_size=reset_cache_size, disk_cache=disk_cache)
        self._expert = HandCodedExpert()
        self.expert_labels = expert_labels
        self._schema: re.Pattern | None = None

    def _start_episode(self, episode_id: str) -> EpisodeStart:
        state = self._game.reset(str(self.root / episode_id / GAME_FILE))
        if self._schema is None:
            self._schema = template_regex(state["command_templates"])
        observation = state.feedback.replace(INTRO, "").strip()
        match = re.search(r"Your task is to: (.*)", observation)
        task = match.group(1).strip() if match else ""
        self._expert.reset(episode_id, state)
        return EpisodeStart(task=task, observation=observation, task_type=task_type_of(episode_id))

    def _game_step(self, action: str) -> GameStep:
        state, done = self._game.step(action)
        self._expert.observe(action, state)
        won = bool(state["won"])
        return GameStep(observation=state.feedback.strip(), score=float(won), done=bool(done), won=won)

    def is_valid_action(self, action: str) -> bool:
        return bool(self._schema.match(action))

    def admissible_actions(self) -> list[str]:
        return [a for a in self._game.state["admissible_commands"] if a != "help"]

    def expert_actions(self) -> list[str]:
        return list(self._game.state["extra.walkthrough"])

    def _info(self, extra: dict) -> dict:
        info = super()._info(extra)
        if self.expert_labels:
            decision = self.expert_action()
            info["expert"] = {"action": decision[0], "thought": decision[1]} if decision else None
        return info

    def expert_action(self) -> tuple[str, str] | None:
        """ALFWorld's hand-coded expert (fixed, see ``alfworld_expert``), following this episode."""
        decision = self._expert.decision
        return (decision.action, decision.thought) if decision else None

    def explain_action(self, action: str) -> str | None:
        return self._expert.explain(action)

    def close(self):
        self._game = None
        super().close()


def data_status(spec: EnvSpec) -> str:
    """`sage envs` status line for an ALFWorld split."""
    folder = ALFWORLD_SPLITS[spec.split]
    try:
        root = find_alfworld(None, folder)
    except DataNotFoundError:
        return "missing: run `sage data fetch alfworld`"
    found = len(split_games(root, folder))
    return "ready" if found == ALFWORLD_COUNTS[folder] else f"incomplete: {found}/{ALFWORLD_COUNTS[folder]} games"


for _split, _folder in ALFWORLD_SPLITS.items():
    register(EnvSpec(env_id=f"alfworld-{_split}", entry_point="sage_gym.envs.alfworld:AlfWorldEnv",
                     family="alfworld", split=_split, max_turns=30, num_episodes=ALFWORLD_COUNTS[_folder],
                     kwargs={"split": _split}, has_train_split=_split == "train",
                     data_status="sage_gym.envs.alfworld:data_status"))
