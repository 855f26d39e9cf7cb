"""`sage leaderboard`, `sage compare` and `sage report`: read run folders written by `sage evaluate`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from sage_cli.console import make_console

console = make_console()
FORMATS = ("table", "markdown", "csv", "json")


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise typer.BadParameter(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")


def leaderboard(
    dirs: List[Path] = typer.Argument(..., help="Run folders, or folders holding run folders."),
    fmt: str = typer.Option("table", "--format", help="table (terminal), markdown, csv or json."),
) -> None:
    """One row per run: success (mean over games), its 95% game-bootstrap interval, std over seeds, score,
    invalid and cut-at-limit rates."""
    from dataclasses import asdict

    from sage_evals.leaderboard import COLUMNS, find_runs, leaderboard as rows_of, leaderboard_csv, row_cells, to_markdown

    _check_format(fmt)
    rows = rows_of(find_runs(dirs))
    if fmt == "markdown":
        typer.echo(to_markdown(COLUMNS, [row_cells(r) for r in rows]), nl=False)
    elif fmt == "csv":
        typer.echo(leaderboard_csv(rows), nl=False)
    elif fmt == "json":
        typer.echo(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        # the run folder is shown only when it tells two rows apart
        pairs = [(r.label, r.env_id) for r in rows]
        keep = [c for c in COLUMNS if c != "run" or len(set(pairs)) < len(pairs)]
        table = Table(title="SAGE leaderboard (success, score and rates in %)",
                      caption="success and score: mean over games of per-game means over seeds; 95% CI: bootstrap "
                              "over games (seeds kept together); cut at limit: turns cut by max_new_tokens or the "
                              "context window")
        for column in keep:
            table.add_column(column, justify="right" if column in ("success", "score", "games", "errors") else "left",
                             no_wrap=column in ("model", "env", "success", "95% CI"))
        for r in rows:
            table.add_row(*[cell for column, cell in zip(COLUMNS, row_cells(r)) if column in keep])
        console.print(table)


def compare(
    run_a: Path = typer.Argument(..., help="Run folder A (the baseline)."),
    run_b: Path = typer.Argument(..., help="Run folder B (compared against A: differences are B - A)."),
    resamples: int = typer.Option(10_000, min=1, help="Bootstrap resamples."),
    seed: int = typer.Option(0, help="Bootstrap seed."),
    fmt: str = typer.Option("table", "--format", help="table (terminal), markdown, csv or json."),
) -> None:
    """Paired comparison over games: exact McNemar per seed, sign-flip test and game-bootstrap CI of B - A."""
    import csv
    import sys

    from sage_evals.leaderboard import COMPARE_COLUMNS, compare as compare_runs, comparison_cells, comparison_json, load_run, to_markdown

    _check_format(fmt)
    result = compare_runs(load_run(run_a), load_run(run_b), n_resamples=resamples, seed=seed)
    cells = [comparison_cells(r) for r in result.results]
    if fmt == "json":
        typer.echo(json.dumps(comparison_json(result), indent=2))
    elif fmt == "markdown":
        typer.echo(to_markdown(COMPARE_COLUMNS, cells), nl=False)
    elif fmt == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(COMPARE_COLUMNS)
        writer.writerows(cells)
    else:
        table = Table(title=f"{result.run_b} (B) vs {result.run_a} (A) on {result.env_id}",
                      caption="success and score in %, means over games of per-game means over the shared seeds; "
                              "95% CI: paired bootstrap over games; p: sign-flip permutation test on per-game means "
                              "(exact up to 20 differing games); McNemar: exact, per seed, one outcome per game "
                              "(b: only A succeeded, c: only B)")
        for column in COMPARE_COLUMNS:
            table.add_column(column, justify="left" if column == "group" else "right",
                             no_wrap=column in ("group", "95% CI"))
        for row in cells:
            table.add_row(*row)
        console.print(table)
        if result.only_a or result.only_b:
            console.print(f"[yellow]not paired:[/] {result.only_a} episodes only in A, {result.only_b} only in B")
        for warning in result.warnings:
            console.print(f"[yellow]not like for like:[/] {escape(warning)}")


def report(
    dirs: List[Path] = typer.Argument(..., help="Run folders, folders holding run folders, or `sage train` output "
                                               "folders (learning curves, and the evaluations of each step)."),
    out: Path = typer.Option(Path("report.html"), "--out", help="The HTML file to write."),
    baseline: Optional[str] = typer.Option(None, help="The run every other run is compared with (its folder path "
                                                      "or name as listed); default: the first run of each group."),
    max_trajectories: int = typer.Option(200, min=0, help="Most episodes per run embedded in the trajectory viewer."),
) -> None:
    """Write one self-contained HTML page: leaderboard, paired comparisons, plots, trajectory viewer."""
    from sage_evals.report import load_sources, write_report

    runs, trainings = load_sources(dirs)
    path = write_report(runs, out, max_trajectories=max_trajectories, baseline=baseline, trainings=trainings)
    console.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
