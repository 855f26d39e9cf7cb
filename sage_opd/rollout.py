"""On-policy rollouts: a fixed-size batch of episodes from an env's train split, run in lockstep.

Each turn keeps what the trainer needs: the context (messages and ``prompt_ids``), the
generated ``token_ids`` exactly as sampled, the response text, its validity, the env
feedback after it, the task and who wrote it (``student``, ``teacher`` or ``expert``).
Generation is batched across the episodes still running; everything random is seeded
from ``(seed, step, rank)`` so a resumed run collects the same batch.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import sage_gym
from sage_models import derive_seed, turn_seed
from sage_models.policy import PROMPT_TOO_LONG, Decoding, Policy
from sage_gym.agents import ExpertAgent
from sage_gym.errors import EnvCrashedError, SageError
from sage_gym.procs import fixed_hash_seed


@dataclass
class TurnRecord:
    """One agent turn of a rollout."""

    episode: int  # index of the episode in its batch
    turn: int
    task: str
    messages: list[dict[str, str]]  # the context the response answered
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    action_valid: bool
    invalid_reason: str | None
    feedback: str  # the env's answer to this turn
    source: str = "student"  # student | teacher | expert
    finish_reason: str = "stop"
    action: str | None = None  # the parsed action (None when invalid)
    expert_action: str | None = None  # the env's expert move from this state (envs made with expert_labels)


@dataclass
class EpisodeRecord:
    episode_id: str
    task: str
    task_type: str
    won: bool = False
    score: float = 0.0
    turns: list[TurnRecord] = field(default_factory=list)


@dataclass
class RolloutBatch:
    """The episodes one rank collected in one step."""

    episodes: list[EpisodeRecord]

    @property
    def turns(self) -> list[TurnRecord]:
        return [t for ep in self.episodes for t in ep.turns]

    def success_rate(self) -> float:
        return sum(ep.won for ep in self.episodes) / max(len(self.episodes), 1)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps([asdict(ep) for ep in self.episodes]))

    @classmethod
    def load(cls, path: str | Path) -> RolloutBatch:
        episodes = []
        for ep in json.loads(Path(path).read_text()):
            turns = [TurnRecord(**t) for t in ep.pop("turns")]
            episodes.append(EpisodeRecord(**ep, turns=turns))
        return cls(episodes)


def _coin(*parts: int) -> float:
    """A uniform draw in [0, 1) fixed by its arguments (who writes a turn in Guided-OPD)."""
    return random.Random(derive_seed(*parts, 23)).random()


def guided_beta(step: int, total_steps: int, rho: float = 0.8) -> float:
    """Guided-OPD teacher probability: 0.5 (1 + cos(pi min(s / (rho S), 1))), from 1 down to 0."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step / (rho * total_steps), 1.0)))


def check_train_split(env_id: str) -> None:
    """Training samples episodes from a train split; refuse an eval-only env clearly.

    ``alfworld-train`` / ``scienceworld-train`` are train splits themselves; a search QA id such
    as ``searchqa-nq`` names a dataset whose train questions the collector loads with ``split="train"``."""
    spec = sage_gym.spec(env_id)
    if not spec.has_train_split:
        train = [s.env_id for s in sage_gym.list_envs() if s.has_train_split]
        raise SageError(f"Env {env_id!r} has no train split (its split is {spec.split!r}); rollouts need one. "
                        f"Env ids with a train split: {', '.join(train) or 'none registered'}")


class EnvSlot:
    """One env answering commands: ``reset``, ``step``, ``expert`` (the expert's next response).

    Runs in this process, or (``EnvProcess``) in a worker process so that the game engines of a
    batch step in parallel. Commands are split into ``send`` and ``recv`` so a caller can send to
    every slot before waiting for any."""

    def __init__(self, env_id: str, kwargs: dict[str, Any]):
        self.env = sage_gym.make(env_id, **kwargs)
        self.expert = ExpertAgent()
        self.info: dict[str, Any] = {}
        self._reply: Any = None

    def episode_ids(self) -> list[str]:
        return list(self.env.unwrapped.episode_ids)

    def handle(self, cmd: str, *args: Any) -> Any:
        env = self.env
        if cmd == "reset":
            episode_id, seed, with_expert = args
            _, self.info = env.reset(seed=seed, options={"episode_id": episode_id})
            if with_expert:
                self.expert.reset(env, self.info)
            return self.info["task"], self.info["task_type"], env.unwrapped.messages, env.unwrapped.stop
        if cmd == "step":
            expert = self.info.get("expert")  # the label of the state this response answers
            feedback, _, terminated, truncated, self.info = env.step(args[0])
            keep = {k: self.info[k] for k in ("action_valid", "invalid_reason", "won", "score", "action")}
            keep["expert_action"] = expert["action"] if expert else None
            return feedback, terminated, truncated, keep, env.unwrapped.messages
        if cmd == "expert":
            return self.expert.act(env, self.info)
        raise ValueError(f"unknown env command {cmd!r}")

    def send(self, cmd: str, *args: Any) -> None:
        self._reply = self.handle(cmd, *args)

    def recv(self) -> Any:
        return self._reply

    def close(self) -> None:
        self.env.close()


def _serve(conn, env_id: str, kwargs: dict[str, Any]) -> None:
    """Worker process loop: answer commands until the pipe closes; errors go back as text."""
    import traceback

    slot = None
    try:
        slot = EnvSlot(env_id, kwargs)
        conn.send(("ok", slot.episode_ids()))
        while True:
            try:
                cmd, args = conn.recv()
            except EOFError:
                break
            try:
                conn.send(("ok", slot.handle(cmd, *args)))
            except Exception:  # noqa: BLE001  (reported to the trainer, which raises it)
                conn.send(("error", traceback.format_exc()))
    except Exception:  # noqa: BLE001
        conn.send(("error", traceback.format_exc()))
    finally:
        if slot is not None:
            slot.close()
        conn.close()


class EnvProcess:
    """An ``EnvSlot`` in its own (spawned, daemon) process."""

    def __init__(self, env_id: str, kwargs: dict[str, Any]):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, env_id, kwargs), daemon=True)
        with fixed_hash_seed():
            self.proc.start()
        child.close()
        self._ids = self.recv()

    def episode_ids(self) -> list[str]:
        return self._ids

    def send(self, cmd: str, *args: Any) -> None:
        self.conn.send((cmd, args))

    def recv(self) -> Any:
        try:
            status, value = self.conn.recv()
        except EOFError as err:
            raise EnvCrashedError(f"the env worker process {self.proc.pid} died (exit code "
                                  f"{self.proc.exitcode})") from err
        if status == "error":
            raise EnvCrashedError(f"the env worker process {self.proc.pid} failed:\n{value}")
        return value

    def close(self) -> None:
        self.conn.close()
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


class RolloutCollector:
    """Keeps ``n_envs`` envs of one env id and plays batches of episodes on them in lockstep.

    ``processes``: run each env in its own worker process, so game steps and resets of the batch
    run in parallel (ALFWorld resets take about a second); generation stays in this process."""

    def __init__(self, env_id: str, n_envs: int, max_turns: int | None = None, history_window: int | None = None,
                 check_split: bool = True, processes: bool = False, episode_ids: list[str] | None = None,
                 env_kwargs: dict[str, Any] | None = None):
        if check_split:
            check_train_split(env_id)
        kwargs: dict[str, Any] = dict(env_kwargs or {})
        if check_split and sage_gym.spec(env_id).split != "train":
            kwargs["split"] = "train"  # e.g. searchqa-nq: the id names a dataset whose train split is a kwarg
        if max_turns is not None:
            kwargs["max_turns"] = max_turns
        if history_window is not None:
            kwargs["history_window"] = history_window
        self.env_id = env_id
        self.envs: list[EnvSlot | EnvProcess] = []
        try:
            for _ in range(n_envs):
                self.envs.append(EnvProcess(env_id, kwargs) if processes else EnvSlot(env_id, kwargs))
        except BaseException:
            self.close()
            raise
        self.episode_ids = self.envs[0].episode_ids()
        if episode_ids is not None:
            unknown = sorted(set(episode_ids) - set(self.episode_ids))
            if unknown or not episode_ids:
                self.close()
                raise SageError(f"rollout.episode_ids must be a non-empty list of {env_id} episode ids; unknown: "
                                f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
            self.episode_ids = list(episode_ids)

    def sample_episode_ids(self, n: int, seed: int, step: int) -> list[str]:
        """The step's global batch of episode ids (the same on every rank)."""
        rng = random.Random(derive_seed(seed, step, 17))
        return rng.sample(self.episode_ids, n) if n <= len(self.episode_ids) else rng.choices(self.episode_ids, k=n)

    def collect(self, episode_ids: list[str], student: Policy | None, decoding: Decoding, seed: int,
                teacher: Policy | None = None, teacher_prob: float = 0.0, expert: bool = False,
                indices: list[int] | None = None) -> RolloutBatch:
        """Play one episode per id. Each turn the teacher writes with probability ``teacher_prob``
        (Guided-OPD; 1.0 for teacher SFT data), the env's expert agent when ``expert``, else the student.
        ``indices``: each episode's position in the step's global batch (seeds depend on it, not on the rank)."""
        if len(episode_ids) > len(self.envs):
            raise ValueError(f"{len(episode_ids)} episodes but only {len(self.envs)} envs in this collector")
        envs = self.envs[: len(episode_ids)]
        indices = list(range(len(episode_ids))) if indices is None else list(indices)
        for i, (env, eid) in enumerate(zip(envs, episode_ids)):
            env.send("reset", eid, derive_seed(seed, indices[i]), expert)
        episodes, messages, stop = [], {}, []
        for i, (env, eid) in enumerate(zip(envs, episode_ids)):
            task, task_type, messages[i], stop = env.recv()
            episodes.append(EpisodeRecord(eid, task, task_type))
        active = list(range(len(envs)))
        turn = 0
        while active:
            sources = {i: "expert" if expert else
                       ("teacher" if teacher is not None and _coin(seed, indices[i], turn) < teacher_prob else "student")
                       for i in active}
            outputs: dict[int, tuple[str, list[int], list[int], str]] = {}
            for source, policy in (("student", student), ("teacher", teacher)):
                group = [i for i in active if sources[i] == source]
                if not group:
                    continue
                if policy is None:
                    raise ValueError(f"a {source} turn was requested but no {source} policy was given")
                # one seed per (step seed, episode, turn): a response does not depend on the batch or the rank
                seeds = [turn_seed(seed, f"{indices[i]}:{episode_ids[i]}", turn) for i in group]
                gens = policy.generate([messages[i] for i in group], decoding, stop, seeds=seeds)
                for i, gen in zip(group, gens):
                    if gen.token_ids is None or gen.prompt_ids is None:
                        raise SageError(f"the {source} policy {policy.name!r} returned no token ids; training "
                                        "needs a backend that returns the sampled ids (hf, vllm)")
                    outputs[i] = (gen.text, list(gen.prompt_ids), list(gen.token_ids), gen.finish_reason)
            experts = [i for i in active if sources[i] == "expert"]
            for i in experts:
                envs[i].send("expert")
            for i in experts:
                outputs[i] = (envs[i].recv(), [], [], "stop")
            # a conversation that outgrew the model's context window ends here: nothing was generated
            active = [i for i in active if outputs[i][3] != PROMPT_TOO_LONG]
            for i in active:
                envs[i].send("step", outputs[i][0])
            still = []
            for i in active:
                text, prompt_ids, token_ids, finish = outputs[i]
                context = messages[i]
                feedback, terminated, truncated, info, messages[i] = envs[i].recv()
                episodes[i].turns.append(TurnRecord(
                    episode=i, turn=turn, task=episodes[i].task, messages=context, prompt_ids=prompt_ids,
                    token_ids=token_ids, text=text, action_valid=bool(info["action_valid"]),
                    invalid_reason=info["invalid_reason"], feedback=feedback,
                    source=sources[i], finish_reason=finish, action=info["action"],
                    expert_action=info["expert_action"]))
                episodes[i].won, episodes[i].score = bool(info["won"]), float(info["score"])
                if not (terminated or truncated):
                    still.append(i)
            active = still
            turn += 1
        return RolloutBatch(episodes)

    def close(self) -> None:
        for env in self.envs:
            env.close()
        self.envs = []
