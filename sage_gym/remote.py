"""``RemoteEnv``: a gymnasium env whose game runs in a ``sage serve`` env server.

>>> env = RemoteEnv("http://127.0.0.1:8765", "alfworld-unseen", token="T")
>>> obs, info = env.reset(seed=0)
>>> obs, reward, terminated, truncated, info = env.step("<action>look</action>")
>>> env.close()

It has the in-process API (``episode_ids``, ``max_turns``, ``stop``, ``messages``,
``formatter``, ``expert_actions()``, ``admissible_actions()``), so agents and the evaluation
runner use it unchanged. It holds only a URL and plain values, so a worker process can build
its own from ``(url, env_id, **kwargs)``.
"""

from __future__ import annotations

import os
from typing import Any

import gymnasium as gym
from gymnasium import spaces

from sage_gym.core import MAX_TEXT, text_space
from sage_gym.errors import SageError
from sage_gym.formatting import ReActFormatter


class RemoteEnvError(SageError, RuntimeError):
    """The env server refused a request or could not be reached; ``status`` is the HTTP status (0: no answer)."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


class RemoteEnv(gym.Env):
    """A session of ``env_id`` on the env server at ``url``; ``env_kwargs`` go to the server's ``make``.

    ``token`` defaults to ``$SAGE_SERVER_TOKEN`` (so worker processes need only the URL).
    """

    metadata = {"render_modes": []}

    def __init__(self, url: str, env_id: str, token: str | None = None, timeout: float = 600.0, **env_kwargs: Any):
        import httpx

        token = token if token is not None else os.environ.get("SAGE_SERVER_TOKEN")
        self.url = url.rstrip("/")
        self.env_id = env_id
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout, connect=10.0))
        self.session_id: str | None = None
        try:
            meta = self._request("POST", "/sessions", {"env_id": env_id, "kwargs": env_kwargs})
        except BaseException:
            self._client.close()
            raise
        self.session_id = meta["session_id"]
        self._meta = {k: meta.get(k) for k in ("env_id", "episode_ids", "max_turns", "stop", "rules", "history_window")}
        self.episode_ids: list[str] = list(meta["episode_ids"])
        self.max_turns: int = int(meta["max_turns"])
        self.stop: list[str] = list(meta["stop"])
        self.rules: str = meta.get("rules", "")
        self.formatter = ReActFormatter(meta.get("history_window"))  # to format scripted actions client-side
        self.observation_space = text_space()
        # the server refuses longer responses, so the space says so
        self.action_space = spaces.Text(max_length=min(MAX_TEXT, int(meta["max_response_chars"])), min_length=0,
                                        charset=text_space().character_set)
        self._messages: list[dict[str, str]] | None = None

    def describe(self) -> dict[str, Any]:
        """The served env's ``TextEnv.describe()``, as the server reported it."""
        return {**self._meta, "episode_ids": list(self._meta["episode_ids"]), "stop": list(self._meta["stop"])}

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        import httpx

        try:
            answer = self._client.request(method, path, json=body)
        except httpx.HTTPError as err:
            raise RemoteEnvError(f"cannot reach the env server at {self.url} ({type(err).__name__}: {err}); "
                                 "is `sage serve` running there?") from None
        if answer.status_code >= 400:
            try:
                message = answer.json().get("error") or answer.text
            except ValueError:
                message = answer.text
            raise RemoteEnvError(f"env server {self.url} answered {answer.status_code} to {method} {path}: {message}",
                                 answer.status_code)
        return answer.json()

    def _session(self, suffix: str = "") -> str:
        if self.session_id is None:
            raise RemoteEnvError("this RemoteEnv is closed; build a new one")
        return f"/sessions/{self.session_id}{suffix}"

    # ---- gymnasium API -------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        answer = self._request("POST", self._session("/reset"), {"seed": seed, "options": options})
        self._messages = answer["info"].get("messages")
        return answer["observation"], answer["info"]

    def step(self, response: str):
        answer = self._request("POST", self._session("/step"), {"response": response if isinstance(response, str) else ""})
        self._messages = answer["info"].get("messages")
        return answer["observation"], answer["reward"], answer["terminated"], answer["truncated"], answer["info"]

    def close(self) -> None:
        """Close the server session (its env is closed there) and the HTTP client; safe to call twice."""
        if self.session_id is not None:
            try:
                self._request("DELETE", self._session())
            except RemoteEnvError:
                pass  # already expired or the server is gone: nothing left to close
            self.session_id = None
        self._client.close()
        super().close()

    # ---- the in-process helpers ---------------------------------------------------------
    @property
    def messages(self) -> list[dict[str, str]]:
        """The chat so far, as of the last reset/step."""
        if self._messages is None:
            raise RuntimeError("call reset() first")
        return self._messages

    def expert_actions(self) -> list[str]:
        return self._request("GET", self._session("/expert_actions"))["actions"]

    def admissible_actions(self) -> list[str]:
        return self._request("GET", self._session("/admissible_actions"))["actions"]

    def __repr__(self) -> str:
        return f"RemoteEnv({self.url!r}, {self.env_id!r}, session={self.session_id})"
