"""Env options given as plain values (`sage evaluate --env-arg key=value`, the env server's session
kwargs, a run folder's ``run.json``): checked against the env class's signature and stated bounds
before any env is built, so a bad option is one clear error and never a crash inside an env."""

from __future__ import annotations

import inspect
import math
import operator
import re
import types
import typing
from pathlib import Path
from typing import Any

from sage_gym.errors import SageError
from sage_gym.registry import EnvSpec

# stated bounds of the numeric options every family shares (inclusive)
BOUNDS = {"max_turns": (1, 1000), "history_window": (1, 1000), "reset_cache_size": (0, 1024), "topk": (1, 100),
          "max_query_chars": (1, 100_000)}
PATTERNS = {"jvm_heap": (r"[1-9][0-9]{0,5}[mMgG]", "a Java heap size such as 512m or 2g")}
PLAIN = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
MAX_SEED = 2**63 - 1  # seeds are non-negative (numpy's rule) and fit a signed 64-bit integer
MACHINE_LOCAL = ("data_dir",)  # options that name this machine's files: not part of a run's identity


class EnvArgError(SageError, ValueError):
    """An env option that the env does not take, of the wrong type, or out of its bounds."""


def _parameters(spec: EnvSpec) -> tuple[dict[str, inspect.Parameter], dict[str, Any], bool]:
    """The env class's keyword parameters, their resolved annotations, and whether it takes **kwargs."""
    target = spec.load()
    init = target.__init__ if inspect.isclass(target) else target
    params = dict(inspect.signature(init).parameters)
    params.pop("self", None)
    try:
        hints = typing.get_type_hints(init)
    except Exception:  # an annotation that does not resolve: types are then not checked
        hints = {}
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params.values())
    return {k: p for k, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}, hints, open_ended


def _plain_types(hint: Any) -> set[type]:
    """The JSON-like types an annotation accepts (``Path`` counts as ``str``)."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    out = {a for a in args if a in PLAIN}
    if Path in args:
        out.add(str)
    return out


def _check_value(env_id: str, key: str, value: Any, hint: Any, choices: list | None) -> Any:
    accepted = _plain_types(hint) if hint is not None else set(PLAIN)
    if not accepted - {type(None)} and value is not None:
        raise EnvArgError(f"{env_id} option {key!r} takes a Python object ({hint}); it cannot be given as a plain "
                          "value (command line, HTTP or run.json)")
    if isinstance(value, Path) and str in accepted:
        value = str(value)
    if isinstance(value, str) and float in accepted and str not in accepted:
        try:
            value = float(value)
        except ValueError:
            pass
    kind = type(value)
    ok = kind in accepted or (kind is int and float in accepted)
    if not ok:
        names = " or ".join(PLAIN[t] for t in PLAIN if t in accepted)
        raise EnvArgError(f"{env_id} option {key!r} must be {names}, got {kind.__name__} {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise EnvArgError(f"{env_id} option {key!r} must be a finite number, got {value!r}")
    if key in BOUNDS and isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi = BOUNDS[key]
        if not lo <= value <= hi:
            raise EnvArgError(f"{env_id} option {key!r} must be between {lo} and {hi}, got {value!r}")
    if key in PATTERNS and isinstance(value, str) and not re.fullmatch(PATTERNS[key][0], value):
        raise EnvArgError(f"{env_id} option {key!r} must be {PATTERNS[key][1]}, got {value!r}")
    if choices is not None and value not in choices:
        raise EnvArgError(f"{env_id} option {key!r} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def check_env_kwargs(spec: EnvSpec, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` checked as plain env options of ``spec`` (paths become strings); raises ``EnvArgError``."""
    params, hints, open_ended = _parameters(spec)
    target = spec.load()
    out = {}
    for key, value in kwargs.items():
        if key not in params and not open_ended:
            raise EnvArgError(f"{spec.env_id} has no option {key!r}; accepted: {', '.join(sorted(params))}")
        choices = None
        if key == "render_mode":
            choices = [*getattr(target, "metadata", {}).get("render_modes", []), None]
        out[key] = _check_value(spec.env_id, key, value, hints.get(key), choices)
    return out


def effective_env_kwargs(spec: EnvSpec, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Every plain option in effect (the class defaults, the spec's, then ``kwargs``), without machine-local
    ones such as ``data_dir``: two runs with equal effective options played the same envs."""
    params, _, _ = _parameters(spec)
    out = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    out.update(spec.kwargs)
    out.update(kwargs)
    return {k: str(v) if isinstance(v, Path) else v for k, v in sorted(out.items())
            if k not in MACHINE_LOCAL and (v is None or type(v) in PLAIN or isinstance(v, Path))}


def check_seed(seed: Any) -> int:
    """A seed as reset() takes it: an integer in 0..MAX_SEED."""
    try:
        value = operator.index(seed)  # ints and numpy integers, not floats or strings
    except TypeError:
        value = None
    if isinstance(seed, bool) or value is None or not 0 <= value <= MAX_SEED:
        raise EnvArgError(f"a seed must be an integer between 0 and 2**63-1, got {seed!r}")
    return value


def parse_key_value(text: str, what: str, example: str, error: type[SageError]) -> tuple[str, Any]:
    """``"key=value"`` -> ``(key, value)`` with the value read as YAML (numbers, true/false, null, strings, lists),
    as `sage train` overrides and `sage evaluate --env-arg` take them; ``error`` names ``what`` was wrong."""
    import yaml

    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise error(f"{what} {text!r} must look like key=value, e.g. {example}")
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise error(f"{what} {text!r}: the value is not valid YAML; quote strings, e.g. {key.strip()}='\"...\"'") \
            from None


def parse_env_arg(text: str) -> tuple[str, Any]:
    """``"topk=5"`` -> ``("topk", 5)``; a value must be a number, true/false, null or a string."""
    key, value = parse_key_value(text, "--env-arg", "topk=5 or prompt_format=search-r1", EnvArgError)
    if isinstance(value, (list, dict)):
        raise EnvArgError(f"--env-arg {text!r}: the value must be a number, true/false, null or a string")
    return key, value
