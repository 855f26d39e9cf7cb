"""Sweep a study's teacher SFT recipe over seed draws: per-epoch loss and the share of trained turns it fits.

Reads the teacher's examples from a study folder whose data stages have run, trains the profile's teacher
architecture once per (recipe, seed) and prints one JSON line per run (appended to --jsonl as it goes). A teacher
that fits its data reproduces most of its trained turns token for token (``turn_match``); measured on the
full-10m data: 37% won 42% of the pool, 62% won 89%. Runs on a GPU when there is one (or --device):

    .venv/bin/python bench/sweep_sft.py --profile full-10m --study-dir runs/study/alfworld-cpu-10m \\
        --recipe '{"lr": 5e-4}' --recipe '{"lr": 1e-3}' --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from sage_opd.config import ConfigError
from sage_study.config import load_study_config
from sage_study.driver import Study
from sage_study.models import new_model
from sage_study.sft import SftConfig, train_sft, turn_match
from sage_study.stages import teacher_examples

console = Console(stderr=True)


def recipe(text: str) -> dict:
    """A JSON object of SftConfig fields, checked against them."""
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--recipe takes a JSON object such as '{{\"lr\": 5e-4}}': {e}") from None
    known = {f.name for f in dataclasses.fields(SftConfig)} - {"seed"}
    if not isinstance(fields, dict) or set(fields) - known:
        raise argparse.ArgumentTypeError(f"--recipe takes SftConfig fields ({', '.join(sorted(known))}); got {text}")
    return fields


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/study/alfworld_cpu.yaml")
    parser.add_argument("--profile", default=None, help="the study profile (its teacher architecture and SFT recipe)")
    parser.add_argument("--study-dir", required=True, help="a study folder whose data stages have run")
    parser.add_argument("--recipe", type=recipe, action="append", help="SftConfig fields over the profile's (repeatable)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="teacher.sft.seed draws")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--jsonl", default=None, help="append each run's JSON line to this file too")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"error: --device {args.device}, but torch sees no CUDA device here; use --device cpu")
    try:
        study = Study(load_study_config(args.config, args.profile, [f"out_dir={args.study_dir}"]))
    except (ConfigError, OSError) as e:
        sys.exit(f"error: {e}")
    names = [stage.name for stage in study.stages()]
    if "teacher" not in names:
        sys.exit("error: this profile loads its teacher from teacher.path; there is no teacher SFT to sweep")
    missing = [name for name in names[:names.index("teacher")] if study.done(name) is None]
    if missing:
        sys.exit(f"error: {args.study_dir} lacks the stages before the teacher's ({', '.join(missing)}): run `sage "
                 f"study` with this config and profile and out_dir={args.study_dir} until its teacher stage starts")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(study.tokenizer_path)
    examples, counts = teacher_examples(study)
    console.print(f"{len(examples)} teacher examples {counts} on {args.device}")
    rows = []
    for fields in args.recipe or [{}]:
        for seed in args.seeds:
            cfg = dataclasses.replace(study.cfg.teacher.sft, **fields, seed=seed)
            model = new_model(tokenizer, study.cfg.teacher.arch, seed=seed).to(args.device)
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn())
            with Progress(*columns, console=console) as progress:
                task = progress.add_task(f"{json.dumps(fields)} seed {seed}", total=None, loss=float("nan"))
                result = train_sft(model, tokenizer, examples, cfg,
                                   on_step=lambda step, total, loss: progress.update(task, completed=step, total=total,
                                                                                     loss=loss))
            fit, turns = turn_match(model, tokenizer, examples)
            row = {"recipe": fields, "seed": seed, "epoch_losses": [round(x, 4) for x in result.losses],
                   "turn_match": round(fit, 4), "turns": turns, "seconds": round(result.seconds, 1),
                   "device": args.device}
            print(json.dumps(row), flush=True)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(row) + "\n")
            rows.append(row)
    table = Table("recipe", "seed", "final loss", "turns fit", "s")
    for r in rows:
        table.add_row(json.dumps(r["recipe"]), str(r["seed"]), f"{r['epoch_losses'][-1]:.3f}",
                      f"{100 * r['turn_match']:.1f}%", f"{r['seconds']:.0f}")
    console.print(table)


if __name__ == "__main__":
    main()
