"""On-policy rollouts: a fixed-size batch of episodes from an env's train split, run in lockstep.

Each played turn becomes a ``sage_opd.records.TurnRecord`` (context, ids, text, validity, feedback,
writer). Generation is batched across the episodes still running; everything random is seeded
from ``(seed, step, episode)`` so a resumed run collects the same batch.
"""

from __future__ import annotations

import random
from typing import Any

import sage_gym
from sage_gym.errors import EnvCrashedError, SageError
from sage_models import derive_seed
from sage_models.policy import Decoding, Policy
from sage_opd.records import EpisodeRecord, RolloutBatch, TurnRecord


def _coin(*parts: int) -> float:
    """A uniform draw in [0, 1) fixed by its arguments (who writes a turn in Guided-OPD)."""
    return random.Random(derive_seed(*parts, 23)).random()


def check_train_split(env_id: str) -> None:
    """Training samples episodes from a train split; refuse an eval-only env clearly.

    ``alfworld-train`` / ``scienceworld-train`` are train splits themselves; a search QA id such
    as ``searchqa-nq`` names a dataset whose train questions the collector loads with ``split="train"``."""
    spec = sage_gym.spec(env_id)
    if not spec.has_train_split:
        train = [s.env_id for s in sage_gym.list_envs() if s.has_train_split]
        raise SageError(f"Env {env_id!r} has no train split (its split is {spec.split!r}); rollouts need one. "
                        f"Env ids with a train split: {', '.join(train) or 'none registered'}")


class RolloutCollector:
    """Keeps ``n_envs`` envs of one env id and plays batches of episodes on them with the project's episode runner
    (``sage_rollout``), generation batched over the episodes still running.

    ``processes``: run each env in its own worker process, so game steps and resets of the batch run in parallel
    (ALFWorld resets take about a second); generation stays in this process. A worker that fails is restarted
    and its episode replayed; an episode that keeps failing stops the step with ``EnvCrashedError``."""

    def __init__(self, env_id: str, n_envs: int, max_turns: int | None = None, history_window: int | None = None,
                 check_split: bool = True, processes: bool = False, episode_ids: list[str] | None = None,
                 env_kwargs: dict[str, Any] | None = None):
        from sage_rollout import EnvPool, LocalPool

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
        self.pool = (EnvPool if processes else LocalPool)(sage_gym.spec(env_id), n_envs, kwargs)
        self.episode_ids = list(self.pool.info["episode_ids"])
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
        from sage_models.scripted import ScriptedAgent
        from sage_rollout import EpisodeJob, EpisodeRunner

        if len(episode_ids) > len(self.pool.workers):
            raise ValueError(f"{len(episode_ids)} episodes but only {len(self.pool.workers)} envs in this collector")
        indices = list(range(len(episode_ids))) if indices is None else list(indices)
        if expert:
            writers: dict[str, Any] = {"expert": ScriptedAgent("expert")}
        else:
            writers = {"student": student, **({"teacher": teacher} if teacher is not None else {})}
        for name, policy in writers.items():
            if policy is None:
                raise ValueError(f"a {name} turn was requested but no {name} policy was given")

        def choose(job, turn: int) -> str:
            if expert:
                return "expert"
            return "teacher" if teacher is not None and _coin(seed, job.index, turn) < teacher_prob else "student"

        # the env reset and every sampled turn are seeded by (step seed, place in the global batch, episode, turn)
        jobs = [EpisodeJob(eid, derive_seed(seed, k), index=k) for eid, k in zip(episode_ids, indices)]
        records: dict[int, tuple[Any, dict]] = {}
        runner = EpisodeRunner(self.pool, writers, decoding, choose=choose, max_retries=2)
        runner.run(jobs, lambda job, record: records.__setitem__(job.index, (job, record)))
        episodes = []
        for i, k in enumerate(indices):
            job, record = records[k]
            if record.get("error"):
                raise EnvCrashedError(f"episode {job.episode_id} of the rollout failed: {record['error']}")
            episodes.append(_episode(i, job, record))
        return RolloutBatch(episodes)

    def close(self) -> None:
        if getattr(self, "pool", None) is not None:
            self.pool.close()
            self.pool = None


def _episode(i: int, job, record: dict) -> EpisodeRecord:
    """The trainer's view of one played episode: each turn's context, ids, text, validity and the env's answer."""
    episode = EpisodeRecord(job.episode_id, record["task"], record["task_type"], bool(record["success"]),
                            float(record["score"]))
    for t in job.turns:
        g, step = t.generation, t.step
        expert = step.get("expert")
        episode.turns.append(TurnRecord(
            episode=i, turn=t.turn, task=record["task"], messages=t.messages,
            prompt_ids=list(g.prompt_ids or []) if g is not None else [],
            token_ids=list(g.token_ids or []) if g is not None else [],
            text=g.text if g is not None else step["response"], action_valid=bool(step["action_valid"]),
            invalid_reason=step["invalid_reason"], feedback=step["observation"], source=t.writer,
            finish_reason=g.finish_reason if g is not None else "stop", action=step["action"],
            expert_action=expert["action"] if expert else None))
    return episode
