"""A pool of environment workers, one env each, for running many episodes at once.

A worker owns one env and one episode at a time and builds that episode's record itself
(steps, invalid turns, timings, in the run format of docs/run-format.md); the main process
sends it responses, or asks the episode's scripted agent (which needs the env) to act. Worker
processes ignore Ctrl-C (the pool's owner stops them), exit when their pipe closes (the owner
died, even by kill -9) and always close their env, so no game process or JVM outlives a run.
``processes=False`` keeps the envs in this process behind the same interface.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from sage_models.policy import CUT
from sage_gym.formatting import INVALID_REASONS
from sage_gym.procs import fixed_hash_seed
from sage_gym.registry import EnvSpec

# why an episode ended: the game ended it, the turn cap, the model's context window was full
# (the next prompt left no room to generate), or it kept failing (an error line)
TERMINATED, TURN_CAP, CONTEXT_LIMIT, ERROR = "terminated", "turn_cap", "context_limit", "error"


def build_env(spec: EnvSpec, env_kwargs: dict[str, Any], env_server: str | None = None):
    """The env of one worker: local (``spec`` + kwargs) or, with ``env_server``, a remote one."""
    if env_server:
        from sage_gym.remote import RemoteEnv  # added by the env-server work; imported only when asked for

        return RemoteEnv(env_server, spec.env_id, **env_kwargs)
    return spec.load()(**{**spec.kwargs, **env_kwargs})


class Episode:
    """One episode in a worker: resets the env and accumulates the run-format record."""

    def __init__(self, env, env_id: str, episode_id: str, seed: int):
        self.env, self.t0 = env, time.perf_counter()
        self.observation, info = env.reset(seed=seed, options={"episode_id": episode_id})
        self.env_seconds = time.perf_counter() - self.t0
        self.info, self.done = info, False
        self.record: dict[str, Any] = {
            "episode_id": episode_id, "seed": seed, "env_id": env_id,
            "task": info.get("task", ""), "task_type": info.get("task_type", ""), "success": False, "score": 0.0, "metrics": {},
            "turns": 0, "terminated": False, "truncated": False, "end_reason": None,
            "invalid_turns": dict.fromkeys(INVALID_REASONS, 0), "finish_reasons": {},
            "cut_invalid_turns": dict.fromkeys(INVALID_REASONS, 0),
            "prompt_tokens": 0, "completion_tokens": 0, "seconds": 0.0, "gen_seconds": 0.0, "env_seconds": 0.0,
            "error": None, "messages": [], "steps": []}

    def step(self, response: str, prompt_tokens: int = 0, completion_tokens: int = 0, gen_seconds: float = 0.0,
             finish_reason: str | None = None) -> dict[str, Any]:
        """One turn; ``finish_reason`` says why the model's generation ended (None for scripted agents)."""
        t = time.perf_counter()
        obs, reward, terminated, truncated, info = self.env.step(response)
        self.env_seconds += time.perf_counter() - t
        r = self.record
        r["prompt_tokens"] += prompt_tokens
        r["completion_tokens"] += completion_tokens
        r["gen_seconds"] += gen_seconds
        if info["invalid_reason"]:
            r["invalid_turns"][info["invalid_reason"]] += 1
        if finish_reason is not None:
            r["finish_reasons"][finish_reason] = r["finish_reasons"].get(finish_reason, 0) + 1
            if info["invalid_reason"] and finish_reason in CUT:  # cut by a token limit, not a model's choice
                r["cut_invalid_turns"][info["invalid_reason"]] += 1
        step = {"turn": info["turn"], "response": info["messages"][-2]["content"], "action": info["action"],
                "action_valid": info["action_valid"], "invalid_reason": info["invalid_reason"],
                "finish_reason": finish_reason, "observation": obs, "reward": reward, "score": info["score"]}
        if "expert" in self.info:  # envs made with expert_labels=True: what the expert would have done here
            step["expert"] = self.info["expert"]
        r["steps"].append(step)
        self.info, self.done = info, terminated or truncated
        if self.done:
            self.end(TERMINATED if terminated else TURN_CAP)
        return step

    def end(self, reason: str) -> None:
        """Close the record: the game or the turn cap ended the episode, or (``CONTEXT_LIMIT``) the runner did
        because the model's next prompt no longer fits its context window (counted as truncated)."""
        info, self.done = self.info, True
        self.record.update(success=bool(info["won"]), score=float(info["score"]),
                           metrics=dict(info.get("metrics") or {}), turns=info["turn"], terminated=reason == TERMINATED,
                           truncated=reason != TERMINATED, end_reason=reason, messages=info["messages"],
                           env_seconds=self.env_seconds, seconds=time.perf_counter() - self.t0)


def make_scripted(name: str, kwargs: dict, seed: int, key: str):
    """A scripted agent for one episode; seeded agents get the seed of the episode's turn 0."""
    from sage_gym.agents import AGENTS, make_agent

    from sage_models import turn_seed

    seeded = getattr(AGENTS.get(name), "seeded", False)
    return make_agent(name, **({"seed": turn_seed(seed, key, 0), **kwargs} if seeded else kwargs))


class EnvWorker:
    """One env and its current episode, answering the runner's messages (in a worker process or in this one).

    ("reset", episode_id, seed, agent) -> ("obs", messages, None); ``agent`` is None or (name, kwargs, key) of the
    episode's scripted agent. ("step", response, prompt_tokens, completion_tokens, gen_seconds, finish) and ("act",)
    (the scripted agent writes the response) -> ("obs", messages, step) or ("done", record, step).
    ("end", reason) -> ("done", record, None)."""

    def __init__(self, env):
        self.env, self.episode, self.agent = env, None, None
        self.info = env_info(env)

    def handle(self, msg: tuple) -> tuple:
        kind = msg[0]
        if kind == "reset":
            _, episode_id, seed, agent = msg
            self.episode = Episode(self.env, self.info["env_id"], episode_id, seed)
            self.agent = make_scripted(agent[0], agent[1], seed, agent[2]) if agent else None
            if self.agent is not None:
                self.agent.reset(self.env, self.episode.info)
            return ("obs", self.episode.info["messages"], None)
        if kind == "end":
            self.episode.end(msg[1])
            return ("done", self.episode.record, None)
        if kind == "act":
            step = self.episode.step(self.agent.act(self.env, self.episode.info))
        elif kind == "step":
            step = self.episode.step(*msg[1:])
        else:
            raise ValueError(f"unknown worker message {kind!r}")
        done = self.episode.done
        return ("done", self.episode.record, step) if done else ("obs", self.episode.info["messages"], step)


def env_info(env) -> dict[str, Any]:
    """What the runner needs to know of an env: its panel, turn cap, history window and stop strings."""
    return env.unwrapped.describe()


def worker_main(conn: Connection, spec: EnvSpec, env_kwargs: dict, env_server: str | None) -> None:
    """Worker process loop: ("ready", env_info) once, then an ``EnvWorker`` reply per message until ("close",)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # runs the finally below
    env = None
    try:
        try:
            env = build_env(spec, env_kwargs, env_server)
            worker = EnvWorker(env)
            conn.send(("ready", worker.info))
        except Exception as err:  # noqa: BLE001 - reported to the owner, which raises it
            try:
                conn.send(("fatal", err))
            except Exception:  # noqa: BLE001 - an exception that does not pickle
                conn.send(("fatal", RuntimeError(f"building {spec.env_id} failed: {err!r}")))
            return
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return  # the owner is gone
            if msg[0] == "close":
                return
            try:
                conn.send(worker.handle(msg))
            except (BrokenPipeError, EOFError, ConnectionError):
                return  # the owner is gone (killed): nobody to answer
            except Exception:  # noqa: BLE001 - the owner restarts this worker and retries the episode
                conn.send(("error", traceback.format_exc(limit=8), None))
    finally:
        if env is not None:
            env.close()


class WorkerFailed(Exception):
    """A worker died, timed out or raised; ``reason`` says which."""

    def __init__(self, index: int, reason: str):
        super().__init__(reason)
        self.index, self.reason = index, reason


@dataclass
class _Worker:
    process: mp.Process
    conn: Connection


class EnvPool:
    """``n`` env worker processes (spawn context). ``info`` is what the first worker reported at start:
    the panel (episode ids), max_turns, history_window and the stop strings."""

    def __init__(self, spec: EnvSpec, n: int, env_kwargs: dict | None = None, env_server: str | None = None,
                 timeout: float = 600.0):
        self.spec, self.env_kwargs, self.env_server, self.timeout = spec, dict(env_kwargs or {}), env_server, timeout
        self._ctx = mp.get_context("spawn")
        self.workers: list[_Worker] = []
        self.info: dict[str, Any] = {}
        try:
            self.workers = [self._spawn() for _ in range(n)]
            self.info = [self._ready(i) for i in range(n)][0]
        except BaseException:
            self.close()
            raise

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=worker_main, args=(child, self.spec, self.env_kwargs, self.env_server),
                                 daemon=True, name="sage-env-worker")
        with fixed_hash_seed():
            proc.start()
        child.close()  # so that the worker's death reads as EOF here
        return _Worker(proc, parent)

    def _ready(self, i: int) -> dict:
        kind, payload = self.recv(i, timeout=self.timeout)
        if kind == "fatal":
            raise payload
        return payload

    def send(self, i: int, *msg: Any) -> None:
        try:
            self.workers[i].conn.send(msg)
        except (BrokenPipeError, OSError) as err:
            raise WorkerFailed(i, f"worker {i} is gone ({err})") from err

    def recv(self, i: int, timeout: float | None = None) -> tuple:
        w = self.workers[i]
        if not w.conn.poll(self.timeout if timeout is None else timeout):
            raise WorkerFailed(i, f"worker {i} sent nothing for {self.timeout:.0f} s (hung env?)")
        try:
            return w.conn.recv()
        except (EOFError, OSError):
            w.process.join(1)
            raise WorkerFailed(i, f"worker {i} died (exit code {w.process.exitcode})") from None

    def ready(self, indexes: list[int]) -> list[int]:
        """Which of ``indexes`` have a reply (or died) within the pool timeout; raises for a silent one."""
        conns = {self.workers[i].conn: i for i in indexes}
        got = wait(list(conns), self.timeout)
        if not got:
            raise WorkerFailed(indexes[0], f"no worker replied for {self.timeout:.0f} s (hung env?)")
        return [conns[c] for c in got]

    def restart(self, i: int) -> None:
        """Replace worker ``i`` with a fresh process (after a crash, a hang or an env exception)."""
        self._stop(self.workers[i])
        self.workers[i] = self._spawn()
        kind, payload = self.recv(i)
        if kind == "fatal":
            raise payload

    def pids(self) -> list[int]:
        return [w.process.pid for w in self.workers]

    @staticmethod
    def _stop(w: _Worker) -> None:
        try:
            w.conn.send(("close",))
        except (BrokenPipeError, OSError):
            pass
        w.process.join(5)
        if w.process.is_alive():
            w.process.terminate()  # SIGTERM: the worker still closes its env
            w.process.join(5)
        if w.process.is_alive():
            w.process.kill()
            w.process.join(1)
        w.conn.close()

    def close(self) -> None:
        for w in self.workers:
            if w.process.is_alive() or w.process.exitcode is None:
                try:
                    w.conn.send(("close",))
                except (BrokenPipeError, OSError):
                    pass
        for w in self.workers:
            self._stop(w)
        self.workers = []

    def __enter__(self) -> EnvPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()



class LocalPool:
    """``EnvPool``'s interface over ``n`` envs in this process: each message is answered when it is sent (no
    parallel stepping, no process to restart; an env that raised is rebuilt)."""

    def __init__(self, spec: EnvSpec, n: int, env_kwargs: dict | None = None, env_server: str | None = None,
                 timeout: float = 600.0):
        self.spec, self.env_kwargs, self.env_server = spec, dict(env_kwargs or {}), env_server
        self.workers: list[EnvWorker] = []
        self._replies: dict[int, tuple] = {}
        try:
            self.workers = [EnvWorker(build_env(spec, self.env_kwargs, env_server)) for _ in range(n)]
        except BaseException:
            self.close()
            raise
        self.info = self.workers[0].info

    def send(self, i: int, *msg: Any) -> None:
        try:
            self._replies[i] = self.workers[i].handle(msg)
        except Exception:  # noqa: BLE001 - as a worker process would report it
            self._replies[i] = ("error", traceback.format_exc(limit=8), None)

    def recv(self, i: int, timeout: float | None = None) -> tuple:
        if i not in self._replies:
            raise WorkerFailed(i, f"env {i} was sent nothing to answer")
        return self._replies.pop(i)

    def ready(self, indexes: list[int]) -> list[int]:
        return [i for i in indexes if i in self._replies]

    def restart(self, i: int) -> None:
        self.workers[i].env.close()
        self.workers[i] = EnvWorker(build_env(self.spec, self.env_kwargs, self.env_server))

    def pids(self) -> list[int]:
        import os

        return [os.getpid()] * len(self.workers)

    def close(self) -> None:
        for w in self.workers:
            w.env.close()
        self.workers = []

    def __enter__(self) -> LocalPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
