"""`sage envs`, `sage play` and `sage data`: browse, play and install environments."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from sage_cli.console import make_console

console = make_console()
data_app = typer.Typer(help="Install and inspect environment data.", no_args_is_help=True)


def envs() -> None:
    """List env ids with their split, episode count, turn cap and data status."""
    import sage_gym

    table = Table(title="sage_gym environments", caption="gymnasium ids: sage/<env id>-v0")
    table.add_column("env id", no_wrap=True)
    for column in ("family", "split", "episodes", "turn cap"):
        table.add_column(column, no_wrap=True)
    table.add_column("data")
    for s in sage_gym.list_envs():
        table.add_row(s.env_id, s.family, s.split, str(s.num_episodes or "?"), str(s.max_turns), s.status())
    console.print(table)


HUMAN_FEEDBACK = {  # an invalid turn, told to a person rather than to a model
    "empty": "You typed nothing. That still counts as a turn.",
    "unparseable": "Type one command, without tags. That still counts as a turn.",
    "schema_violation": "{action!r} is not a command this game knows; nothing happened, but the turn counts. "
                        "Type help to see the commands.",
}


class _Stop(Exception):
    """The human quit, or used up the turn cap (menu answers are free, so the env's own cap is doubled)."""


class _Terminal:
    """``sage play``'s view of the one episode runner: it shows each turn (an observer) and, for a human, asks for
    each response (a policy). ``help`` and answers to a numbered menu cost no turn."""

    name = "human"

    def __init__(self, pool, env_id: str, cap: int, human: bool):
        self.pool, self.env_id, self.cap, self.human = pool, env_id, cap, human
        self.used, self.menu, self.free, self.score, self.ended, self.gold = 0, False, False, 0.0, "", None
        self.env = pool.workers[0].env  # in this process: the terminal shows what the env knows

    def info(self) -> dict:
        return self.pool.workers[0].episode.info

    def started(self, job) -> None:
        info = self.info()
        self.gold = info.get("golden_answers")
        obs = self.pool.workers[0].episode.observation
        console.print(Panel(Text(obs), title=escape(f"{self.env_id} · {info['episode_id']}"),
                            subtitle=escape(f"task type: {info['task_type']}")))
        if info["task"] and info["task"] not in obs:  # ScienceWorld's first observation does not state the task
            console.print(Text(f"Task: {info['task']}", style="bold"))
        _show_actions(self.env)

    def generate(self, conversations, decoding, stop, **_):
        from sage_models.policy import Generation

        while True:
            typed = typer.prompt(f"turn {self.used + 1}/{self.cap} command (help, quit)").strip()
            if typed == "quit":
                self.ended = "quit"
                raise _Stop
            if typed != "help":
                break
            console.print(Panel(Text(self.env.unwrapped.rules), title="commands (help costs no turn)"))
        self.free = self.menu and typed.isdigit()  # answering the game's numbered menu
        response = typed if "<action>" in typed else self.env.unwrapped.formatter.format_action(typed)
        return [Generation(text=response)]

    def turn(self, job, result) -> None:
        step, info = result.step, self.info()  # the record of the step and the env's info after it
        free = self.human and self.free
        self.used += not free
        self.score = step["score"]
        if step["action_valid"]:  # an invalid turn never reached the game: a pending menu still waits
            self.menu = bool(info.get("ambiguous"))
        valid = "[green]valid[/]" if step["action_valid"] else f"[red]invalid: {step['invalid_reason']}[/]"
        shown = info.get("parsed_action") or step["response"].strip()
        console.print(f"[bold]> {escape(shown)}[/]  ({valid}, reward {step['reward']:g}"
                      + (", menu answer: no turn used" if free else "") + ")")
        obs = step["observation"]
        if self.human and not step["action_valid"]:
            obs = HUMAN_FEEDBACK[step["invalid_reason"]].format(action=info.get("parsed_action"))
        console.print(Panel(Text(obs), title=f"turn {self.used}/{self.cap}"))
        over = self.pool.workers[0].episode.done
        if self.human and self.used >= self.cap and not over:
            self.ended = "turn cap reached"
            raise _Stop
        if not over:
            _show_actions(self.env)


def play(
    env: str = typer.Option("alfworld-unseen", help="Env id (see `sage envs`)."),
    episode: Optional[str] = typer.Option(None, help="Episode id; default: chosen by --seed."),
    agent: str = typer.Option("human", help="human (you type actions), expert or random."),
    seed: int = typer.Option(0, help="Seed that picks the episode when --episode is not given."),
    max_turns: Optional[int] = typer.Option(None, help="Override the env's turn cap."),
    data_dir: Optional[Path] = typer.Option(None, help="Data folder (ALFWorld: holds json_2.1.1/)."),
) -> None:
    """Play an episode in the terminal: observation, admissible actions, validity and result.

    As a human, `help` lists the commands and answering a numbered menu (ScienceWorld's ambiguous
    commands) is free: neither costs a turn."""
    import sage_gym
    from gymnasium.utils.seeding import np_random

    from sage_gym.errors import SageError
    from sage_models.policy import Decoding
    from sage_models.scripted import ScriptedAgent
    from sage_rollout import EpisodeJob, EpisodeRunner, LocalPool

    if agent not in ("human", "expert", "random"):
        raise typer.BadParameter(f"--agent must be human, expert or random, not {agent!r}")
    human = agent == "human"
    spec = sage_gym.spec(env)
    cap = max_turns or spec.max_turns
    # a human's free moves (menu answers) still step the env: each follows a paid turn, so 2x the cap suffices
    kwargs = {k: v for k, v in {"max_turns": 2 * cap if human else cap, "data_dir": data_dir}.items() if v is not None}
    with LocalPool(spec, 1, kwargs) as pool:
        ids = pool.info["episode_ids"]
        if episode is None:  # as TextEnv.reset(seed=...) picks one
            episode = ids[int(np_random(seed)[0].integers(len(ids)))]
        elif episode not in ids:
            raise SageError(f"episode {episode!r} is not in the {env} panel ({len(ids)} episodes, e.g. {ids[0]!r})")
        terminal = _Terminal(pool, env, cap, human)
        writer = terminal if human else ScriptedAgent(agent)
        records = []
        try:
            EpisodeRunner(pool, {agent: writer}, Decoding(), max_retries=0, observer=terminal).run(
                [EpisodeJob(episode, seed)], lambda job, record: records.append(record))
        except _Stop:
            pass
        if records and records[0].get("error"):
            raise SageError(f"the episode failed: {records[0]['error']}")
        won = bool(records and records[0]["success"])
        ended = terminal.ended or ("terminated" if records and records[0]["terminated"] else "turn cap reached")
        outcome = "[green]won[/]" if won else "[red]not won[/]"
        console.print(f"Result: {outcome}, score {terminal.score:g}, {terminal.used} turns ({ended}).")
        gold = terminal.gold
        if gold:
            console.print(Text(f"Gold answer{'s' if len(gold) > 1 else ''}: {' | '.join(gold)}"))


def _show_actions(game) -> None:
    actions = game.unwrapped.admissible_actions()
    shown = ", ".join(actions[:40]) + (f", ... ({len(actions)} in all)" if len(actions) > 40 else "")
    console.print(Text(f"admissible: {shown}", style="dim"))


@data_app.command("fetch")
def data_fetch(
    name: str = typer.Argument(..., help="Dataset to install: alfworld."),
    archive: Optional[Path] = typer.Option(None, help="Install from a local archive instead of downloading."),
    data_dir: Optional[Path] = typer.Option(None, help="Destination; default $ALFWORLD_DATA or ~/.cache/alfworld."),
) -> None:
    """Install environment data (ALFWorld games: online with alfworld-download, or from --archive)."""
    from sage_gym.data import alfworld_candidates, fetch_alfworld_online, install_alfworld_archive

    if name != "alfworld":
        raise typer.BadParameter(f"unknown dataset {name!r}; `sage data fetch` installs: alfworld "
                                 "(ScienceWorld ships inside its package; search-QA data: see `sage retriever --help`)")
    dest = data_dir or alfworld_candidates()[0][1]
    with console.status(f"Installing ALFWorld games into {dest} ..."):
        if archive:
            counts = install_alfworld_archive(archive, dest)
        else:
            fetch_alfworld_online(dest)
            counts = None
    console.print(f"[green]ALFWorld installed[/] at {dest}" + (f": {counts}" if counts else ""))


@data_app.command("status")
def data_status(data_dir: Optional[Path] = typer.Option(None, help="Check this folder first.")) -> None:
    """Show what data is installed and where."""
    from sage_gym.data import ALFWORLD_COUNTS, alfworld_candidates, alfworld_status

    status = alfworld_status(data_dir)
    table = Table(title="ALFWorld data")
    for column in ("split", "games", "expected"):
        table.add_column(column)
    for folder, expected in ALFWORLD_COUNTS.items():
        got = status["counts"].get(folder)
        table.add_row(folder, "-" if got is None else str(got), str(expected))
    console.print(table)
    console.print(f"searched: {', '.join(f'{o}={p}' for o, p in alfworld_candidates(data_dir))}")
    console.print(f"using: {status['root'] or '-'} ({status['message']})")
