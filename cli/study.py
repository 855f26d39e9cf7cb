"""`sage study`: the SAGE-OPD study (tiny ALFWorld teacher and student, every method, evaluation, report)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def study(
    config: Path = typer.Option(..., "--config", "-c", help="A study config (see configs/study/)."),
    profile: Optional[str] = typer.Option(
        None, help="A profile of the config, e.g. quick (minutes); default: the config's own (full)."),
    overrides: List[str] = typer.Argument(None, help="Dotted key=value overrides, e.g. eval.seeds=[0] out_dir=runs/x"),
    only: List[str] = typer.Option(None, "--only", help="Run only the stages whose name starts with this (repeatable)."),
    publish: Optional[Path] = typer.Option(None, help="Also copy the report (markdown and plots) to this .md file."),
) -> None:
    """Run the study's missing stages (each is skipped when its output exists), then write its report."""
    from sage_study.config import load_study_config
    from sage_study.driver import Study, check_ready

    cfg = load_study_config(config, profile, overrides or [])
    check_ready(cfg)
    records = Study(cfg).run(only=only or None)
    report = records.get("report")
    if report and publish:
        from sage_study.report import publish as copy_report

        copy_report(Path(cfg.out_dir), publish)
    typer.echo(f"study {cfg.profile}: {len(records)} stages done; report: {Path(cfg.out_dir) / 'report.md'}")
