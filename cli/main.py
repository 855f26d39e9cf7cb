"""The `sage` command: parses arguments and calls the library (no logic of its own)."""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.markup import escape

from sage_gym.errors import SageError

app = typer.Typer(help="SAGE: multi-turn text-agent gym, evaluation service and SAGE-OPD trainer.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
console = Console(stderr=True)


def main() -> None:
    """Entry point of the console script: user errors print one clear line, not a traceback, and exit
    non-zero (2, or the error's own ``exit_code``: 3 for a run whose episodes errored, 130 after Ctrl-C)."""
    try:
        app()
    except SageError as err:
        fail(str(err), getattr(err, "exit_code", 2))
    except OSError as err:
        if err.filename is None:  # not about a file the user named: a bug, keep its traceback
            raise
        fail(f"{err.strerror or err}: {err.filename}", 2)


def fail(message: str, code: int) -> None:
    # escape: messages name extras like [pyserini]; soft_wrap: one line, whatever the terminal width
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    sys.exit(code)



# Command modules import their heavy dependencies (torch, textworld, ...) inside the commands,
# so `sage --help` stays fast.
from sage_cli import evaluate as _evaluate, gym as _gym, report as _report, serve as _serve, study as _study  # noqa: E402
from sage_cli import train as _train  # noqa: E402
from sage_cli.retriever import retriever_app as _retriever_app  # noqa: E402

app.command("envs")(_gym.envs)
app.command("play")(_gym.play)
app.add_typer(_gym.data_app, name="data")
app.command("evaluate")(_evaluate.evaluate)
app.command("serve-model")(_evaluate.serve_model)
app.command("leaderboard")(_report.leaderboard)
app.command("compare")(_report.compare)
app.command("report")(_report.report)
app.command("serve")(_serve.serve)
app.add_typer(_retriever_app, name="retriever")
app.command("train")(_train.train)
app.command("study")(_study.study)
