"""sage_gym: Gymnasium-style multi-turn text-agent environments (ALFWorld, ScienceWorld, search QA).

>>> import sage_gym
>>> env = sage_gym.make("alfworld-unseen")
>>> obs, info = env.reset(options={"episode_id": sage_gym.describe(env)["episode_ids"][0]})
>>> obs, reward, terminated, truncated, info = env.step("I should look around. <action>look</action>")
"""

from importlib.metadata import version as _version

from sage_gym.core import EpisodeStart, GameStep, TextEnv, describe
from sage_gym.errors import DataNotFoundError, EnvCrashedError, SageError, UnknownEnvError
from sage_gym.formatting import INVALID_REASONS, ReActFormatter
from sage_gym.registry import EnvSpec, list_envs, make, register, spec
from sage_gym import envs as _envs  # noqa: F401  (registers the built-in env ids)

__version__ = _version("sage-agents")

__all__ = [
    "EnvSpec", "EpisodeStart", "GameStep", "TextEnv", "ReActFormatter", "INVALID_REASONS",
    "DataNotFoundError", "EnvCrashedError", "SageError", "UnknownEnvError",
    "describe", "list_envs", "make", "register", "spec",
]
