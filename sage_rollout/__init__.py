"""Episodes at scale: a pool of env workers (processes, or envs in this process) and the one episode
runner that plays model policies and scripted agents on it, for evaluation, training rollouts and play.

    from sage_rollout import EnvPool, EpisodeJob, EpisodeRunner
    with EnvPool(sage_gym.spec("alfworld-unseen"), n=4) as pool:
        EpisodeRunner(pool, {"model": policy}, decoding).run([EpisodeJob(e, seed=0) for e in ids], on_episode)
"""

from sage_rollout.pool import CONTEXT_LIMIT, ERROR, TERMINATED, TURN_CAP, EnvPool, LocalPool, WorkerFailed
from sage_rollout.runner import EpisodeJob, EpisodeRunner, TurnResult, error_cause, error_record

__all__ = ["CONTEXT_LIMIT", "ERROR", "TERMINATED", "TURN_CAP", "EnvPool", "EpisodeJob", "EpisodeRunner", "LocalPool",
           "TurnResult", "WorkerFailed", "error_cause", "error_record"]
