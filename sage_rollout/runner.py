"""The one episode runner: many episodes in lockstep over a pool of env workers, with model policies and
scripted agents, used by `sage evaluate`, the trainer's rollouts and `sage play`.

Each turn, the episodes whose next turn is a model's wait for one another and their conversations go
to that model in one ``generate`` call (one call per writer when several write, as in Guided-OPD);
turns of a scripted agent (which acts on the env) are played in the env's worker at once. A worker
that dies, hangs or raises is restarted and its episode retried from the start, up to ``max_retries``
times; then the episode is recorded as an error. Sampling seeds are ``turn_seed(job.seed, job.key,
turn)``: a response depends on nothing but its episode and turn.

    runner = EpisodeRunner(pool, {"model": policy}, decoding)
    runner.run(jobs, on_episode=lambda job, record: ...)     # record: the run format; job.turns: the turns
"""

from __future__ import annotations

import inspect
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from sage_models.policy import PROMPT_TOO_LONG, Decoding, Generation, Policy
from sage_models.scripted import ScriptedAgent
from sage_models.seeds import turn_seed
from sage_rollout.pool import CONTEXT_LIMIT, ERROR, WorkerFailed
from sage_gym.formatting import INVALID_REASONS


@dataclass
class EpisodeJob:
    """One episode to play. ``seed`` seeds the env reset and every sampled turn (with ``key``, default the
    episode id); ``index`` is its place in a batch (writers may use it)."""

    episode_id: str
    seed: int
    key: str | None = None
    index: int = 0
    attempt: int = 0
    turn: int = 0
    messages: list | None = None
    turns: list[TurnResult] = field(default_factory=list)  # this attempt's turns

    @property
    def seed_key(self) -> str:
        return self.episode_id if self.key is None else self.key


@dataclass
class TurnResult:
    """One played turn: who wrote it, the conversation it answered, the generation (None for a scripted agent)
    and the worker's step record (``action``, ``action_valid``, ``invalid_reason``, ``observation``, ...)."""

    turn: int
    writer: str
    messages: list[dict[str, str]]
    generation: Generation | None
    step: dict[str, Any]


class Observer(Protocol):
    """Progress hooks (``sage_evals``' progress display); every method is optional."""

    def in_flight(self, n: int) -> None: ...
    def started(self, job: EpisodeJob) -> None: ...
    def turn(self, job: EpisodeJob, result: TurnResult) -> None: ...
    def generating(self) -> None: ...
    def tokens(self, n: int) -> None: ...
    def turns_done(self, turns: int, new_tokens: int, seconds: float) -> None: ...
    def restarted(self, played: int) -> None: ...
    def finished(self, record: dict, played: int) -> None: ...


def error_cause(reason: str) -> str:
    """A short label of why an episode failed, for counting errors by cause: the exception line of an env's
    traceback (module path dropped), else the worker failure (``worker died (exit code 3)``)."""
    import re

    lines = [ln.strip() for ln in reason.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else "unknown error"
    if lines and lines[0].startswith("Traceback"):
        name, sep, message = last.partition(":")
        last = name.rsplit(".", 1)[-1] + sep + message
    return re.sub(r"^(no )?worker \d+ ", r"\1worker ", last)[:200]


def error_record(job: EpisodeJob, env_id: str, reason: str) -> dict:
    """The line of an episode that kept failing: recorded as a failure, never dropped."""
    return {"episode_id": job.episode_id, "seed": job.seed, "env_id": env_id, "task_type": "",
            "success": False, "score": 0.0, "metrics": {}, "turns": 0, "terminated": False, "truncated": False,
            "end_reason": ERROR, "invalid_turns": dict.fromkeys(INVALID_REASONS, 0), "finish_reasons": {},
            "cut_invalid_turns": dict.fromkeys(INVALID_REASONS, 0), "prompt_tokens": 0, "completion_tokens": 0,
            "seconds": 0.0, "gen_seconds": 0.0, "env_seconds": 0.0,
            "error": f"failed {job.attempt} times; last: {reason.strip()}", "error_cause": error_cause(reason),
            "messages": [], "steps": []}


def _params(fn) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


class EpisodeRunner:
    """Plays jobs on a pool (``EnvPool`` or ``LocalPool``) with ``writers`` (name -> a ``Policy`` or a
    ``ScriptedAgent``). ``choose(job, turn)`` names the writer of each turn (default: the only writer);
    ``prompt`` reshapes a conversation before a model reads it (the env's record keeps its own);
    ``observer`` gets progress hooks. ``env_wait`` and ``gen_seconds`` add up where the time went."""

    def __init__(self, pool, writers: dict[str, Policy | ScriptedAgent], decoding: Decoding,
                 choose: Callable[[EpisodeJob, int], str] | None = None, max_retries: int = 2,
                 prompt: Callable[[list[dict]], list[dict]] | None = None, observer: Observer | None = None):
        if not writers:
            raise ValueError("an episode runner needs at least one writer")
        if choose is None and len(writers) > 1:
            raise ValueError(f"several writers ({', '.join(writers)}) need a choose(job, turn) function")
        self.pool, self.writers, self.decoding, self.max_retries = pool, writers, decoding, max_retries
        self.choose = choose or (lambda job, turn, only=next(iter(writers)): only)
        self.prompt = prompt or (lambda messages: messages)
        self.observer = observer
        scripted = [w for w in writers.values() if isinstance(w, ScriptedAgent)]
        if len(scripted) > 1:
            raise ValueError("an episode can have one scripted agent at most")
        self.agent = scripted[0] if scripted else None
        self.stop = pool.info["stop"]
        self.env_id = pool.spec.env_id
        self._params = {name: _params(w.generate) for name, w in writers.items() if not isinstance(w, ScriptedAgent)}
        self.env_wait = self.gen_seconds = 0.0

    def _hook(self, name: str, *args) -> None:
        fn = getattr(self.observer, name, None) if self.observer is not None else None
        if fn is not None:
            fn(*args)

    # ---- the loop ------------------------------------------------------------------------------------
    def run(self, jobs: Iterable[EpisodeJob], on_episode: Callable[[EpisodeJob, dict], None]) -> None:
        """Play every job; ``on_episode(job, record)`` as each one ends (``job.turns`` holds its turns)."""
        self.jobs: deque[EpisodeJob] = deque(jobs)
        self.live: dict[int, EpisodeJob] = {}  # worker index -> its episode
        self.waiting: set[int] = set()  # workers a reply is expected from
        self.on_episode = on_episode
        while self.jobs or self.live:
            self._fill()
            ready = self._collect()
            if ready:
                self._generate(ready)

    def _fill(self) -> None:
        for i in range(len(self.pool.workers)):
            if i not in self.live and self.jobs:
                job = self.jobs.popleft()
                self.live[i] = job
                job.turn, job.turns = 0, []
                agent = (self.agent.name, self.agent.kwargs, job.seed_key) if self.agent is not None else None
                self._send(i, "reset", job.episode_id, job.seed, agent)
        self._hook("in_flight", len(self.live))

    def _send(self, i: int, *msg: Any) -> None:
        try:
            self.pool.send(i, *msg)
            self.waiting.add(i)
        except WorkerFailed as err:
            self._failed(i, err.reason)

    def _collect(self) -> list[int]:
        """Replies until every live episode awaits a model's turn; scripted turns and new episodes go on meanwhile."""
        t0 = time.perf_counter()
        ready: list[int] = []
        while self.waiting:
            try:
                got = self.pool.ready(sorted(self.waiting))
            except WorkerFailed as err:  # nobody answered within the timeout: fail the first silent one
                got = [err.index]
            for i in got:
                self.waiting.discard(i)
                try:
                    kind, payload, step = self.pool.recv(i, timeout=0)
                except WorkerFailed as err:
                    self._failed(i, err.reason)
                    continue
                if kind == "error":  # the env raised; its traceback is the reason
                    self._failed(i, payload)
                    continue
                job = self.live[i]
                if step is not None:
                    job.turns[-1].step = step
                    self._hook("turn", job, job.turns[-1])
                elif kind == "obs":
                    job.messages = payload
                    self._hook("started", job)
                if kind == "done":
                    self._record(payload, self.live.pop(i))
                    self._fill()
                    continue
                job.messages = payload
                writer = self.choose(job, job.turn)
                if isinstance(self.writers[writer], ScriptedAgent):
                    self._scripted(i, job, writer)
                else:
                    ready.append(i)
        self.env_wait += time.perf_counter() - t0
        return ready

    def _scripted(self, i: int, job: EpisodeJob, writer: str) -> None:
        job.turns.append(TurnResult(job.turn, writer, job.messages, None, {}))
        job.turn += 1
        self._send(i, "act")
        self._hook("turns_done", 1, 0, 0.0)

    def _failed(self, i: int, reason: str) -> None:
        """Restart worker ``i``; retry its episode from the start or, past the retries, record the error."""
        job = self.live.pop(i)
        self.waiting.discard(i)
        self.pool.restart(i)
        job.attempt += 1
        if job.attempt > self.max_retries:
            self._record(error_record(job, self.env_id, reason), job)
        else:
            self._hook("restarted", job.turn)
            self.jobs.appendleft(job)

    def _record(self, record: dict, job: EpisodeJob) -> None:
        self.on_episode(job, record)
        self._hook("finished", record, job.turn)

    def _generate(self, ready: list[int]) -> None:
        groups: dict[str, list[int]] = {}
        for i in ready:
            groups.setdefault(self.choose(self.live[i], self.live[i].turn), []).append(i)
        for writer, workers in groups.items():
            policy, params = self.writers[writer], self._params[writer]
            jobs = [self.live[i] for i in workers]
            kwargs: dict[str, Any] = {}
            if "seeds" in params:
                kwargs["seeds"] = [turn_seed(j.seed, j.seed_key, j.turn) for j in jobs]
            streams = self.observer is not None and "on_tokens" in params and hasattr(self.observer, "tokens")
            if streams:
                kwargs["on_tokens"] = self.observer.tokens
            self._hook("generating")
            t0 = time.perf_counter()
            generations = policy.generate([self.prompt(j.messages) for j in jobs], self.decoding, self.stop, **kwargs)
            seconds = time.perf_counter() - t0
            self.gen_seconds += seconds
            for i, job, g in zip(workers, jobs, generations):
                if g.finish_reason == PROMPT_TOO_LONG:  # the conversation outgrew the model's context window
                    self._send(i, "end", CONTEXT_LIMIT)
                    continue
                job.turns.append(TurnResult(job.turn, writer, job.messages, g, {}))
                job.turn += 1
                self._send(i, "step", g.text, g.n_prompt_tokens, g.n_completion_tokens, seconds, g.finish_reason)
            played = [g for g in generations if g.finish_reason != PROMPT_TOO_LONG]
            self._hook("turns_done", len(played), 0 if streams else sum(g.n_completion_tokens for g in played), seconds)
