"""Run a model (or a scripted agent) on an env panel over seeds: `sage evaluate` as a library call.

Episodes are played by the project's one episode runner (``sage_rollout``) over env worker
processes: every worker is kept busy with one episode and the turns of all live episodes are
generated in one ``policy.generate`` batch. Finished episodes are appended to ``episodes.jsonl``
(fsynced) as they finish, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import time
from dataclasses import fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from sage_evals.prompting import PromptOptions
from sage_evals.summary import summarize
from sage_models import SCRIPTED, ScriptedAgent, load_policy, policy_kind
from sage_models.policy import Decoding, Policy
from sage_rollout import EnvPool, EpisodeJob, EpisodeRunner
from sage_gym.durable import (FolderLock, RunFileError, append_jsonl, atomic_write_json, read_json_object,
                              read_jsonl)
from sage_gym.errors import SageError
from sage_gym.formatting import INVALID_REASONS

# settings that must match for a run folder to be resumed (env_kwargs compared as effective options;
# panel_sha256 covers --limit)
RESUME_KEYS = ("model", "model_kind", "env_id", "env_kwargs", "panel_sha256", "seeds", "decoding",
               "max_turns", "history_window", "max_context", "prompt")
MAX_ERROR_SHARE = 0.1  # `sage evaluate` exits non-zero when more than this share of episodes errored


class RunSettingsMismatch(SageError):
    """Resuming a run folder with settings other than the ones it was started with."""


class RunSettingsError(SageError, ValueError):
    """Settings that cannot make a run (seeds, limit, output folder)."""


class RunErrorsError(SageError):
    """A run that finished but whose episodes errored past the allowed share: its numbers measure nothing."""

    exit_code = 3


class RunInterrupted(SageError):
    """Ctrl-C during a run: what is saved, and how to resume (the CLI exits 130, as shells do for SIGINT)."""

    exit_code = 130

    def __init__(self, done: int, total: int, in_flight: int, folder: Path):
        self.done, self.total, self.in_flight, self.folder = done, total, in_flight, folder
        super().__init__(f"interrupted: {done} of {total} episodes are saved in {folder / 'episodes.jsonl'}"
                         + (f" ({in_flight} in flight are redone on resume)" if in_flight else "")
                         + "; rerun the same command (same settings and --out) to resume")


def git_commit() -> str | None:
    """The commit of the source tree this package runs from, when it is a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def default_out_dir(model: str, env_id: str) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model.rstrip("/")).name if "/" in model else model)
    return Path("runs") / f"{name}__{env_id}"


class RunFolder:
    """``run.json`` + ``episodes.jsonl`` + ``summary.json`` of one run (docs/run-format.md), written
    atomically and durably; ``lock()`` keeps a second writer out."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.episodes_file = self.path / "episodes.jsonl"
        if self.path.exists() and not self.path.is_dir():
            raise RunSettingsError(f"the run folder {self.path} is a file; pass a folder (it is created if missing)")

    def lock(self) -> FolderLock:
        return FolderLock(self.path, "sage evaluate")

    def start(self, settings: dict[str, Any], effective=lambda env_kwargs: env_kwargs) -> dict[str, Any]:
        """Write ``run.json``, or check that an existing one has the same settings (then resume).
        ``effective`` maps recorded env options to those in effect (defaults filled in) for the comparison."""
        run_file = self.path / "run.json"
        if run_file.exists():
            old = read_json_object(run_file, "delete that file (or the folder) to start over, or pass another --out")
            mine = {**old, "env_kwargs": effective(old.get("env_kwargs") or {})}
            diff = [k for k in RESUME_KEYS if mine.get(k) != settings.get(k)]
            if diff:
                details = "; ".join(f"{k}: run has {mine.get(k)!r}, now {settings.get(k)!r}"
                                    for k in diff if k != "panel_sha256")
                if "panel_sha256" in diff:
                    details += "; panel: the episode list differs"
                raise RunSettingsMismatch(
                    f"{self.path} holds a run with other settings ({', '.join(diff)} differ: {details}). "
                    "Rerun with the same settings to resume it, or pass another --out folder.")
            return old
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_file, settings)
        return settings

    def records(self) -> list[dict]:
        """Finished episode records; a torn last line (killed mid-write) is cut off the file."""
        records = read_jsonl(self.episodes_file)
        for n, r in enumerate(records, 1):
            if "episode_id" not in r or "seed" not in r:
                raise RunFileError(f"{self.episodes_file}: record {n} has no episode_id or seed; "
                                   "see docs/run-format.md, fix or remove it")
        return records

    def append(self, record: dict) -> None:
        append_jsonl(self.episodes_file, record)

    def write_summary(self, summary: dict) -> None:
        atomic_write_json(self.path / "summary.json", summary)


def check_errors(summary: dict, max_share: float = MAX_ERROR_SHARE) -> None:
    """Raise ``RunErrorsError`` when more than ``max_share`` of the run's episodes errored."""
    n, errors = summary["n_episodes"], summary["n_errors"]
    if n and errors / n > max_share:
        causes = "; ".join(f"{k} ({v})" for k, v in summary.get("errors_by_cause", {}).items())
        raise RunErrorsError(f"{errors} of {n} episodes failed with errors, more than the allowed share "
                             f"{max_share:g} (--max-error-share): {causes}. The success rate above does not "
                             "measure the model.")


def evaluate(policy: str | Policy, env_id: str, seeds: Sequence[int] = (0,), workers: int = 4,
             limit: int | None = None, out_dir: str | Path | None = None, decoding: Decoding | None = None,
             env_kwargs: dict[str, Any] | None = None, env_server: str | None = None, model_opts: dict | None = None,
             max_retries: int = 2, timeout: float = 600.0, progress: bool = True,
             episode_ids: Sequence[str] | None = None, system_prompt: str | None = None,
             fewshot: int = 0) -> dict[str, Any]:
    """Evaluate ``policy`` (a model spec string or a live Policy) on the panel of ``env_id`` for each seed.

    The panel is the env's ``episode_ids[:limit]``, or the given ``episode_ids`` (ids of that env, in
    that order, e.g. a seeded sample of a train split). Writes the run folder ``out_dir``
    (docs/run-format.md), resuming it when it already holds part of this run, and returns the summary.
    ``env_kwargs`` go to the env (e.g. ``max_turns``, ``history_window``, ``data_dir``); ``timeout``
    bounds one env reply before its worker counts as hung. A worker that dies or raises is
    restarted and its episode retried ``max_retries`` times, then recorded as an error line.
    ``system_prompt`` replaces the env's system message and ``fewshot`` prepends that many worked
    example turns from the env's train split (``sage_evals.prompting``). Ctrl-C raises ``RunInterrupted``.
    """
    import sage_gym
    from sage_gym.envargs import check_env_kwargs, check_seed, effective_env_kwargs

    decoding = decoding or Decoding()
    seeds = [check_seed(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise RunSettingsError(f"seeds must be distinct integers >= 0, e.g. 0,1,2; got {seeds or 'none'}")
    if limit is not None and limit < 1:
        raise RunSettingsError(f"limit must be a positive number of episodes, got {limit}")
    env_kwargs = {k: v for k, v in (env_kwargs or {}).items() if v is not None}
    if env_kwargs.get("data_dir") is not None:
        sage_gym.registry.discover(env_kwargs["data_dir"])  # e.g. searchqa-<name> folders under --data-dir
    spec = sage_gym.spec(env_id)
    env_kwargs = check_env_kwargs(spec, env_kwargs)
    model_name = policy if isinstance(policy, str) else getattr(policy, "name", type(policy).__name__)
    folder = RunFolder(out_dir or default_out_dir(model_name, env_id))
    owned = isinstance(policy, str)
    if owned and policy in SCRIPTED and (system_prompt or fewshot):
        raise RunSettingsError(f"--system-prompt and --fewshot shape a model's prompt; the scripted agent "
                               f"{policy!r} reads no prompt. Drop them, or evaluate a model.")
    prompt = PromptOptions.build(env_id, system_prompt, fewshot, env_kwargs)
    lock = folder.lock().acquire()  # a second writer of this folder is refused here
    pool = loaded = None
    try:
        loaded = load_policy(policy, **(model_opts or {})) if owned else policy
        most = limit * len(seeds) if limit else None  # no more workers than episodes
        pool = EnvPool(spec, max(1, min(workers, most or workers)), env_kwargs, env_server, timeout)
        panel = pool.info["episode_ids"][:limit] if episode_ids is None else list(episode_ids)[:limit]
        unknown = sorted(set(panel) - set(pool.info["episode_ids"]))
        if unknown or not panel:
            raise SageError(f"episode_ids must be a non-empty list of {env_id} episode ids; not in its panel: "
                            f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
        settings = {
            "model": model_name, "model_kind": policy_kind(loaded), "env_id": env_id,
            "env_kwargs": effective_env_kwargs(spec, env_kwargs),
            "panel": panel, "panel_sha256": hashlib.sha256("\n".join(panel).encode()).hexdigest(),
            "seeds": seeds, "decoding": {f.name: getattr(decoding, f.name) for f in fields(decoding) if f.name != "seed"},
            "max_turns": pool.info["max_turns"], "history_window": pool.info["history_window"], "limit": limit,
            "max_context": getattr(loaded, "max_context", None), "prompt": prompt.settings(),
            "sage_version": sage_gym.__version__, "git_commit": git_commit(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        settings = folder.start(settings, lambda recorded: effective_env_kwargs(spec, recorded))
        records = folder.records()
        done = {(r["episode_id"], r["seed"]) for r in records}
        jobs = [EpisodeJob(ep, s) for s in seeds for ep in panel if (ep, s) not in done]
        t0 = time.perf_counter()
        total = len(panel) * len(seeds)
        with _Progress(progress, total, records, pool.info["max_turns"]) as bar:
            def on_episode(job: EpisodeJob, record: dict) -> None:
                folder.append(record)
                records.append(record)

            runner = EpisodeRunner(pool, {"model": loaded}, decoding, max_retries=max_retries, prompt=prompt.apply,
                                   observer=bar)
            try:
                runner.run(jobs, on_episode)
            except KeyboardInterrupt:
                raise RunInterrupted(len(records), total, len(runner.live), folder.path) from None
        wall = time.perf_counter() - t0
        new = len(jobs)
        timing = {"seconds": wall, "episodes_this_session": new,
                  "episodes_per_minute": 60 * new / wall if wall > 0 else 0.0,
                  "env_wait_share": runner.env_wait / wall if wall > 0 else 0.0,
                  "gen_share": runner.gen_seconds / wall if wall > 0 else 0.0,
                  "workers": len(pool.workers)}
        summary = summarize(records, settings, timing)
        folder.write_summary(summary)
        return summary
    finally:
        if pool is not None:
            pool.close()
        if owned and loaded is not None and not isinstance(loaded, ScriptedAgent):
            loaded.close()
        lock.release()


class _Progress:
    """A rich progress display (or nothing): episodes done, turns done, episodes in flight, tokens per
    second, the running success rate and an ETA that counts turns still to play, so it moves while
    long episodes are in flight. Remaining turns per episode: the mean of the episodes finished so far
    (the turn cap until one finishes, so the first ETA is an upper bound)."""

    def __init__(self, enabled: bool, total: int, records: list[dict], max_turns: int):
        self.enabled, self.total, self.max_turns = enabled, total, max_turns
        self.n, self.wins, self.errors = len(records), sum(bool(r["success"]) for r in records), 0
        self.turns = self.turns_at_start = sum(int(r.get("turns", 0)) for r in records)
        self.finished_turns, self.n_finished = self.turns, self.n
        self.live, self.live_turns = 0, 0  # episodes being played, turns they have played
        self.new_tokens, self.gen_seconds, self.gen_started = 0, 0.0, None
        self.t0, self.shown, self.plain = time.perf_counter(), 0.0, False

    def __enter__(self) -> _Progress:
        from rich.console import Console

        console = Console(stderr=True)
        self.plain = self.enabled and not console.is_terminal  # a log: one line per episode
        if self.enabled and not self.plain:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("[bold]episodes"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                                transient=False)
            self.bar.start()
            self.task = self.bar.add_task(self._text(), total=self.total, completed=self.n)
        return self

    def rate(self) -> float:
        """Generated tokens per second of generation time, the call in flight included."""
        busy = self.gen_seconds + (time.perf_counter() - self.gen_started if self.gen_started else 0.0)
        return self.new_tokens / busy if busy > 0 else 0.0

    def eta(self) -> float | None:
        """Seconds left: turns still to play over the turn rate of this session (None before the first turn)."""
        played = self.turns - self.turns_at_start
        if played <= 0:
            return None
        per_episode = self.finished_turns / self.n_finished if self.n_finished else self.max_turns
        live_left = max(0.0, self.live * per_episode - self.live_turns)
        unstarted = max(0, self.total - self.n - self.live)
        return (live_left + unstarted * per_episode) * (time.perf_counter() - self.t0) / played

    def _text(self) -> str:
        eta = self.eta()
        parts = [f"turns {self.turns}", f"{self.live} in flight" if self.live else "",
                 f"{self.rate():.1f} tok/s" if self.new_tokens else "",
                 f"success {self.wins / self.n:.1%}" if self.n else "success -",
                 f"[red]errors {self.errors}[/]" if self.errors else "",
                 f"ETA {_clock(eta)}" if eta is not None and self.n < self.total else ""]
        return " · ".join(p for p in parts if p)

    def _refresh(self) -> None:
        if self.enabled and not self.plain:
            self.bar.update(self.task, completed=self.n, description=self._text())

    def in_flight(self, n: int) -> None:
        self.live = n

    def generating(self) -> None:
        self.gen_started = time.perf_counter()

    def tokens(self, n: int) -> None:
        """``n`` tokens were just generated (a policy's on_tokens callback)."""
        self.new_tokens += n
        if self.enabled and not self.plain and time.perf_counter() - self.shown > 0.5:
            self.shown = time.perf_counter()
            self._refresh()

    def turns_done(self, turns: int, new_tokens: int, seconds: float) -> None:
        """Turns went to the envs: a generate call ended (``new_tokens`` not streamed already), or a scripted turn."""
        self.gen_seconds += seconds
        self.gen_started = None
        self.turns += turns
        self.live_turns += turns
        self.new_tokens += new_tokens
        self._refresh()

    def restarted(self, played: int) -> None:
        """An episode is retried from its start: the turns it had played are no longer live."""
        self.live_turns -= played

    def finished(self, record: dict, played: int) -> None:
        """An episode finished; ``played``: the turns the runner saw of it."""
        turns = int(record.get("turns", 0))
        self.n += 1
        self.wins += bool(record["success"])
        self.errors += bool(record.get("error"))
        self.n_finished += 1
        self.finished_turns += turns
        self.turns += max(0, turns - played)
        self.live_turns -= played
        self.live = max(0, self.live - 1)
        if self.plain:
            print(f"episode {self.n}/{self.total} {record['episode_id']} seed {record['seed']}: "
                  f"{'success' if record['success'] else 'failure'} in {turns} turns · "
                  + re.sub(r"\[/?[a-z]*\]", "", self._text()), file=sys.stderr, flush=True)
        self._refresh()

    def __exit__(self, *exc) -> None:
        if self.enabled and not self.plain:
            self.bar.stop()


def _clock(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}"


__all__ = ["RunErrorsError", "RunFolder", "RunInterrupted", "RunSettingsError", "RunSettingsMismatch", "check_errors",
           "evaluate", "summarize"]
