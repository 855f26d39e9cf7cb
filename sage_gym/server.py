"""An HTTP env server: any registered env, stepped remotely, so agent code in any language or
process can use the gym (``sage serve``; the Python client is ``sage_gym.remote.RemoteEnv``).

Endpoints (JSON): ``GET /health``, ``GET /envs``, ``POST /sessions {env_id, kwargs}``,
``GET /sessions/{id}``, ``POST /sessions/{id}/reset {seed, options}``,
``POST /sessions/{id}/step {response}``, ``GET /sessions/{id}/expert_actions``,
``GET /sessions/{id}/admissible_actions``, ``DELETE /sessions/{id}``. Errors are
``{"error": message}`` with a 4xx status for every client mistake (5xx only for a failing env);
replies, the body size limit and error handling come from ``sage_gym.webapi``. Endpoints are sync, so FastAPI runs them in a
thread pool and one slow env does not block the others; each session is stepped by one
request at a time. Env classes are not assumed thread-safe (textworld, under ALFWorld, shares
one parser per process): calls into envs of one entry point are serialised unless its class
sets ``thread_safe = True``. For CPU-bound envs, more throughput comes from more processes
(several servers, or the evaluation runner's workers), not threads.
"""

from __future__ import annotations

import secrets
import threading
import time
import uuid
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from sage_gym.core import describe
from sage_gym.envargs import MAX_SEED, check_env_kwargs
from sage_gym.errors import EnvCrashedError, SageError, UnknownEnvError
from sage_gym.registry import list_envs, make, spec
from sage_gym.webapi import SafeJSONResponse, body_limit_for, json_app, jsonable


@dataclass
class ServerConfig:
    """Limits and access control of the env server."""

    token: str | None = None  # when set, every request needs ``Authorization: Bearer <token>``
    max_sessions: int = 64
    idle_timeout: float = 900.0  # seconds without a request before a session's env is closed
    max_response_chars: int = 65_536
    threads: int = 32  # worker threads that step envs
    max_body_bytes: int | None = None  # None: room for max_response_chars in any JSON escaping (webapi)


class ApiError(Exception):
    """An error answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Session:
    """One env owned by the server; ``lock`` serialises the requests that use it."""

    session_id: str
    env_id: str
    env: Any
    kwargs: dict[str, Any]
    engine_lock: Any = field(default_factory=nullcontext)  # shared by sessions of a non-thread-safe env class
    started: bool = False  # an episode was reset: step and the action lists need one
    last_used: float = field(default_factory=time.monotonic)
    busy: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def metadata(self, max_response_chars: int) -> dict[str, Any]:
        return {**describe(self.env), "max_response_chars": max_response_chars, "session_id": self.session_id,
                "env_id": self.env_id, "kwargs": jsonable(self.kwargs)}


class Sessions:
    """The live sessions, with a size limit and idle expiry (expired envs are closed)."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self._lock = threading.Lock()
        self._live: dict[str, Session] = {}
        self._pending = 0  # sessions being created (their env is being built)
        self._gone: OrderedDict[str, str] = OrderedDict()  # recently ended ids -> why, for clear 404s
        self._engine_locks: dict[str, threading.Lock] = {}

    def engine_lock(self, env_id: str):
        """The lock that serialises calls into envs of ``env_id``'s entry point (a no-op if thread-safe)."""
        s = spec(env_id)
        if getattr(s.load(), "thread_safe", False):
            return nullcontext()
        with self._lock:
            return self._engine_locks.setdefault(s.entry_point, threading.Lock())

    def __len__(self) -> int:
        return len(self._live)

    def create(self, env_id: str, kwargs: dict[str, Any]) -> Session:
        self.reap()
        with self._lock:
            if len(self._live) + self._pending >= self.config.max_sessions:
                raise ApiError(429, f"session limit reached ({self.config.max_sessions} sessions); close sessions "
                                    "with DELETE /sessions/{id} or wait for idle ones to expire "
                                    f"(idle timeout {self.config.idle_timeout:g} s)")
            self._pending += 1
        try:
            kwargs = check_env_kwargs(spec(env_id), kwargs)  # plain values within stated bounds, before make()
            engine_lock = self.engine_lock(env_id)
            with engine_lock:
                env = make(env_id, **kwargs)
        finally:
            with self._lock:
                self._pending -= 1
        session = Session(uuid.uuid4().hex, env_id, env, kwargs, engine_lock)
        with self._lock:
            self._live[session.session_id] = session
        return session

    def acquire(self, session_id: str) -> Session:
        """The session, marked busy (call ``release`` after use)."""
        with self._lock:
            session = self._live.get(session_id)
            if session is None:
                raise self.missing(session_id)
            session.busy += 1
            session.last_used = time.monotonic()
            return session

    def missing(self, session_id: str) -> ApiError:
        why = self._gone.get(session_id, "it does not exist")
        return ApiError(404, f"unknown session {session_id!r}: {why}; create one with POST /sessions")

    def is_live(self, session_id: str) -> bool:
        return session_id in self._live

    def snapshot(self) -> list[Session]:
        with self._lock:
            return list(self._live.values())

    def release(self, session: Session) -> None:
        with self._lock:
            session.busy -= 1
            session.last_used = time.monotonic()

    def close(self, session_id: str, why: str) -> bool:
        with self._lock:
            session = self._live.pop(session_id, None)
            if session is None:
                return False
            self._gone[session_id] = why
            while len(self._gone) > 10_000:
                self._gone.popitem(last=False)
        with session.lock, session.engine_lock:  # wait for a request still using it
            _close_env(session.env)
        return True

    def reap(self) -> int:
        """Close sessions idle for longer than the idle timeout; returns how many."""
        now, timeout = time.monotonic(), self.config.idle_timeout
        with self._lock:
            expired = [s.session_id for s in self._live.values() if not s.busy and now - s.last_used > timeout]
        return sum(self.close(sid, f"it expired after {timeout:g} s idle") for sid in expired)

    def close_all(self) -> None:
        for sid in [s.session_id for s in self.snapshot()]:
            self.close(sid, "the server shut down")


def _close_env(env: Any) -> None:
    try:
        env.close()
    except Exception:  # closing must never take the server down
        pass


def _env_error(err: Exception) -> ApiError:
    """The HTTP status for an exception raised by an env or ``make``."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, UnknownEnvError):
        return ApiError(404, str(err))
    if isinstance(err, EnvCrashedError):
        return ApiError(502, f"the environment crashed: {err}")
    if isinstance(err, KeyError):  # e.g. an episode id outside the panel
        return ApiError(400, str(err.args[0]) if err.args else repr(err))
    if isinstance(err, SageError):  # written for users: says what was wrong and what is accepted
        return ApiError(400, str(err))
    if isinstance(err, (ValueError, TypeError)):
        return ApiError(400, f"{type(err).__name__}: {err}")
    if isinstance(err, NotImplementedError):
        return ApiError(501, f"not supported by this environment: {err}" if str(err) else "not supported by this environment")
    if isinstance(err, RuntimeError):  # protocol misuse, e.g. step() before reset()
        return ApiError(409, str(err))
    return ApiError(500, f"{type(err).__name__}: {err}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateRequest(_Strict):
    env_id: str
    kwargs: dict[str, Any] = Field(default_factory=dict)


class ResetOptions(BaseModel):
    """``reset`` options: ``episode_id`` must be a string; other keys go to the env as they are."""

    model_config = ConfigDict(extra="allow", strict=True)
    episode_id: str | None = None


class ResetRequest(_Strict):
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    options: ResetOptions | None = None


class StepRequest(_Strict):
    response: str


def create_app(config: ServerConfig | None = None):
    """Build the FastAPI app of the env server."""
    from contextlib import asynccontextmanager

    import anyio.to_thread
    from fastapi import Request

    config = config or ServerConfig()
    sessions = Sessions(config)
    stop = threading.Event()

    def reaper() -> None:
        interval = min(max(config.idle_timeout / 4, 0.05), 5.0)
        while not stop.wait(interval):
            try:
                sessions.reap()
            except Exception:  # the reaper must outlive any one bad env
                pass

    @asynccontextmanager
    async def lifespan(app):
        anyio.to_thread.current_default_thread_limiter().total_tokens = config.threads
        thread = threading.Thread(target=reaper, name="sage-session-reaper", daemon=True)
        thread.start()
        yield
        stop.set()
        sessions.close_all()

    app = json_app("SAGE env server", "error", config.max_body_bytes or body_limit_for(config.max_response_chars),
                   description="sage_gym environments over HTTP", lifespan=lifespan)
    app.state.sessions = sessions

    @app.middleware("http")
    async def check_token(request: Request, call_next):
        if config.token is not None:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), config.token.encode()):
                return SafeJSONResponse({"error": "missing or wrong token: send the header 'Authorization: Bearer "
                                                  "<token>' with the token the server was started with (--token)"},
                                        status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return SafeJSONResponse({"error": err.message}, status_code=err.status)

    def use(session_id: str, fn, starts_episode: bool = False):
        """Run ``fn(env)`` on a session's env, one request at a time per session; before the first
        successful reset (``starts_episode``) only a reset may run (409 otherwise)."""
        session = sessions.acquire(session_id)
        try:
            with session.lock:
                if not sessions.is_live(session_id):  # closed while this request waited
                    raise sessions.missing(session_id)
                if not (starts_episode or session.started):
                    raise ApiError(409, f"session {session_id} has no episode yet: call POST /sessions/{session_id}"
                                        "/reset before step, admissible_actions or expert_actions")
                try:
                    with session.engine_lock:
                        out = fn(session.env)
                except Exception as err:
                    raise _env_error(err) from err
                session.started = session.started or starts_episode
                return out
        finally:
            sessions.release(session)

    @app.get("/health")
    def health():
        from sage_gym import __version__

        return {"status": "ok", "version": __version__, "sessions": len(sessions),
                "max_sessions": config.max_sessions, "idle_timeout": config.idle_timeout,
                "max_response_chars": config.max_response_chars}

    @app.get("/envs")
    def envs():
        return {"envs": [{"env_id": s.env_id, "family": s.family, "split": s.split, "max_turns": s.max_turns,
                          "num_episodes": s.num_episodes, "has_train_split": s.has_train_split}
                         for s in list_envs()]}

    @app.post("/sessions", status_code=201)
    def create_session(request: CreateRequest):
        try:
            session = sessions.create(request.env_id, request.kwargs)
        except Exception as err:
            raise _env_error(err) from err
        return session.metadata(config.max_response_chars)

    @app.get("/sessions")
    def list_sessions():
        now = time.monotonic()
        return {"sessions": [{"session_id": s.session_id, "env_id": s.env_id, "idle_seconds": now - s.last_used}
                             for s in sessions.snapshot()]}

    @app.get("/sessions/{session_id}")
    def get_session(session_id: str):
        session = sessions.acquire(session_id)
        sessions.release(session)
        return session.metadata(config.max_response_chars)

    @app.post("/sessions/{session_id}/reset")
    def reset(session_id: str, request: ResetRequest):
        def run(env):
            options = request.options.model_dump(exclude_none=True) if request.options else None
            observation, info = env.reset(seed=request.seed, options=options)
            return {"observation": observation, "info": info}

        return use(session_id, run, starts_episode=True)

    @app.post("/sessions/{session_id}/step")
    def step(session_id: str, request: StepRequest):
        if len(request.response) > config.max_response_chars:
            raise ApiError(413, f"response is {len(request.response)} characters long; this server accepts at most "
                                f"{config.max_response_chars} (--max-response-chars)")

        def run(env):
            observation, reward, terminated, truncated, info = env.step(request.response)
            return {"observation": observation, "reward": float(reward), "terminated": bool(terminated),
                    "truncated": bool(truncated), "info": info}

        return use(session_id, run)

    @app.get("/sessions/{session_id}/expert_actions")
    def expert_actions(session_id: str):
        return use(session_id, lambda env: {"actions": list(env.unwrapped.expert_actions())})

    @app.get("/sessions/{session_id}/admissible_actions")
    def admissible_actions(session_id: str):
        return use(session_id, lambda env: {"actions": list(env.unwrapped.admissible_actions())})

    @app.delete("/sessions/{session_id}")
    def delete_session(session_id: str):
        if not sessions.close(session_id, "it was closed with DELETE /sessions/{id}"):
            raise sessions.missing(session_id)
        return {"closed": True, "session_id": session_id}

    return app


def serve(host: str = "127.0.0.1", port: int = 8765, config: ServerConfig | None = None,
          log_level: str = "info") -> None:
    """Serve the env server with uvicorn until interrupted; sessions' envs are closed on shutdown."""
    import uvicorn

    uvicorn.run(create_app(config), host=host, port=port, log_level=log_level)
