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
    from sage_gym.agents import make_agent

    if agent not in ("human", "expert", "random"):
        raise typer.BadParameter(f"--agent must be human, expert or random, not {agent!r}")
    human = agent == "human"
    cap = max_turns or sage_gym.spec(env).max_turns
    # a human's free moves (menu answers) still step the env: each follows a paid turn, so 2x the cap suffices
    kwargs = {k: v for k, v in {"max_turns": 2 * cap if human else cap, "data_dir": data_dir}.items() if v is not None}
    game = sage_gym.make(env, **kwargs)
    try:
        obs, info = game.reset(seed=seed, options={"episode_id": episode} if episode else None)
        gold = info.get("golden_answers")
        bot = None if human else make_agent(agent) if agent == "expert" else make_agent(agent, seed=seed)
        if bot:
            bot.reset(game, info)
        console.print(Panel(Text(obs), title=escape(f"{env} · {info['episode_id']}"),
                            subtitle=escape(f"task type: {info['task_type']}")))
        if info["task"] and info["task"] not in obs:  # ScienceWorld's first observation does not state the task
            console.print(Text(f"Task: {info['task']}", style="bold"))
        terminated = truncated = quit_ = False
        used, menu = 0, False  # turns that count; whether the game awaits an answer to a numbered menu
        while not (terminated or truncated):
            _show_actions(game)
            free = False
            if bot:
                response = bot.act(game, info)
            else:
                typed = typer.prompt(f"turn {used + 1}/{cap} command (help, quit)").strip()
                if typed == "quit":
                    quit_ = True
                    break
                if typed == "help":
                    console.print(Panel(Text(game.unwrapped.rules), title="commands (help costs no turn)"))
                    continue
                free = menu and typed.isdigit()  # answering the game's numbered menu
                response = typed if "<action>" in typed else game.unwrapped.formatter.format_action(typed)
            obs, reward, terminated, truncated, info = game.step(response)
            used += not free
            if info["action_valid"]:  # an invalid turn never reached the game: a pending menu still waits
                menu = bool(info.get("ambiguous"))
            if human and used >= cap and not terminated:
                truncated = True
            valid = "[green]valid[/]" if info["action_valid"] else f"[red]invalid: {info['invalid_reason']}[/]"
            console.print(f"[bold]> {escape(info['parsed_action'] or response.strip())}[/]  ({valid}, reward {reward:g}"
                          + (", menu answer: no turn used" if free else "") + ")")
            if human and not info["action_valid"]:
                obs = HUMAN_FEEDBACK[info["invalid_reason"]].format(action=info["parsed_action"])
            console.print(Panel(Text(obs), title=f"turn {used}/{cap}"))
        outcome = "[green]won[/]" if info["won"] else "[red]not won[/]"
        ended = "quit" if quit_ else "terminated" if terminated else "turn cap reached"
        console.print(f"Result: {outcome}, score {info['score']:g}, {used} turns ({ended}).")
        if gold:
            console.print(Text(f"Gold answer{'s' if len(gold) > 1 else ''}: {' | '.join(gold)}"))
    finally:
        game.close()


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
