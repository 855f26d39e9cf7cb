"""`sage evaluate`: run a model or a scripted agent on an env panel over seeds (resumable)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from sage_cli.console import make_console

console = make_console()


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise typer.BadParameter(f"--seeds takes comma-separated integers such as 0,1,2, not {text!r}") from None


def evaluate(
    model: str = typer.Option(..., help="smollm2-135m, expert, random, a transformers folder (or hf:PATH), "
                                        "openai:NAME or vllm:PATH."),
    env: str = typer.Option(..., help="Env id (see `sage envs`)."),
    seeds: str = typer.Option("0", help="Comma-separated seeds, e.g. 0,1,2 (SPEC: report >= 3)."),
    workers: int = typer.Option(4, min=1, help="Env worker processes = episodes played at once."),
    limit: Optional[int] = typer.Option(None, min=1, help="Evaluate only the first K episodes of the panel."),
    out: Optional[Path] = typer.Option(None, help="Run folder; default runs/<model>__<env>. Rerun to resume."),
    data_dir: Optional[Path] = typer.Option(None, help="Env data folder (ALFWorld: holds json_2.1.1/)."),
    max_turns: Optional[int] = typer.Option(None, min=1, help="Override the env's turn cap."),
    history_window: Optional[int] = typer.Option(None, min=1, help="Keep only the last N turns in prompts."),
    temperature: float = typer.Option(0.4, min=0.0, help="Sampling temperature (0: greedy)."),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0, help="Nucleus sampling mass."),
    top_k: Optional[int] = typer.Option(None, min=1, help="Top-k sampling (default: disabled)."),
    max_new_tokens: int = typer.Option(4096, min=1, help="Most new tokens per turn (SPEC: 4096)."),
    max_context: Optional[int] = typer.Option(None, min=1, help="hf/vllm: most prompt + response tokens (default: "
                                              "the model's own window). A turn stops where the window is full; an "
                                              "episode whose next prompt does not fit ends (end_reason context_limit)."),
    system_prompt: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, readable=True,
                                                 help="A text file whose content replaces the env's system message "
                                                      "(keep the action format in it)."),
    fewshot: int = typer.Option(0, min=0, help="Prepend N worked example turns: the expert on the env's train "
                                               "split, in the env's own format."),
    base_url: Optional[str] = typer.Option(None, help="openai: the endpoint, e.g. http://127.0.0.1:8000/v1."),
    api_key: Optional[str] = typer.Option(None, help="openai: API key (default $OPENAI_API_KEY)."),
    device: Optional[str] = typer.Option(None, help="hf: cpu or cuda (default: cuda when available)."),
    batch_size: Optional[int] = typer.Option(None, min=1, help="hf: most rows per generate call."),
    env_server: Optional[str] = typer.Option(None, help="Use envs served at this URL (`sage serve`) instead of local ones."),
    retries: int = typer.Option(2, min=0, help="Retries of an episode whose env worker crashed."),
    progress: bool = typer.Option(True, help="Show the progress bar."),
    env_arg: List[str] = typer.Option(None, "--env-arg", help="Env option key=value (repeatable), e.g. topk=5, "
                                                               "prompt_format=search-r1, simplifications=easy."),
    max_error_share: float = typer.Option(0.1, min=0.0, max=1.0,
                                          help="Exit with code 3 when more than this share of episodes errored."),
) -> None:
    """Evaluate a model on an env panel: writes episodes.jsonl as it goes and summary.json at the end."""
    from sage_models import SCRIPTED
    from sage_models.policy import Decoding
    from sage_evals.runner import RunInterrupted, check_errors, default_out_dir, evaluate as run_evaluation

    if max_context is not None and (model.startswith("openai:") or model in SCRIPTED):
        raise typer.BadParameter("--max-context applies to local models (hf, vllm, smollm2-135m); an openai "
                                 "endpoint holds generation to its own window, and scripted agents generate nothing")
    if model.startswith("openai:"):
        opts = {"base_url": base_url, "api_key": api_key}
    elif model in SCRIPTED:
        opts = {}
    else:
        opts = {"device": device, "batch_size": batch_size, "max_context": max_context}
    out = out or default_out_dir(model, env)
    try:
        summary = run_evaluation(
            model, env, seeds=_seeds(seeds), workers=workers, limit=limit, out_dir=out,
            decoding=Decoding(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens),
            env_kwargs=_env_kwargs(env_arg or [], data_dir=data_dir, max_turns=max_turns,
                                   history_window=history_window),
            env_server=env_server, model_opts=opts, max_retries=retries, progress=progress,
            system_prompt=system_prompt.read_text(encoding="utf-8") if system_prompt else None, fewshot=fewshot)
    except RunInterrupted as err:  # name the exact command that resumes the run
        command = " ".join(shlex.quote(a) for a in ["sage", *sys.argv[1:]])
        err.args = (f"{err}: {command}",)
        raise
    _print_summary(summary, out)
    check_errors(summary, max_error_share)


def _env_kwargs(env_args: list[str], **options) -> dict:
    """--env-arg key=value pairs plus the dedicated options (--max-turns ...); a key given twice is refused."""
    from sage_gym.envargs import parse_env_arg

    kwargs: dict = {}
    for text in env_args:
        key, value = parse_env_arg(text)
        if key in kwargs:
            raise typer.BadParameter(f"--env-arg {key} is given twice")
        kwargs[key] = value
    for key, value in options.items():
        if value is None:
            continue
        if key in kwargs and kwargs[key] != value:
            raise typer.BadParameter(f"--env-arg {key}={kwargs[key]!r} contradicts --{key.replace('_', '-')} {value}")
        kwargs[key] = value
    return kwargs


def _print_summary(s: dict, out: Path) -> None:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    def headline(m: dict) -> str:
        if m["mean"] is None:
            return "-"
        std = f", std over seeds {100 * m['std_over_seeds']:.1f}" if m["std_over_seeds"] is not None else ""
        return f"{pct(m['mean'])} [{100 * m['ci95'][0]:.1f}, {100 * m['ci95'][1]:.1f}]{std}"

    table = Table(title=f"{s['settings']['model']} on {s['settings']['env_id']}",
                  caption=f"run folder: {out}; [..]: 95% interval, {s['success'].get('interval', '')}")
    table.add_column("metric")
    table.add_column("value")
    table.add_row("episodes (errors)", f"{s['n_episodes']} ({s['n_errors']})")
    table.add_row("success", headline(s["success"]))
    table.add_row("score", headline(s["score"]))
    for task_type, row in s["per_task_type"].items():
        table.add_row(f"  {task_type}", f"{pct(row['success'])} ({row['games']} games, {row['n']} episodes)")
    table.add_row("invalid turns", ", ".join(f"{k} {100 * v:.1f}%" for k, v in s["invalid_causes"].items()))
    cut = s["cut_at_token_limit"]
    table.add_row("cut at the token limit", f"{cut['turns']} turns ({100 * cut['rate']:.1f}%), {cut['invalid']} invalid")
    table.add_row("episodes ended by", ", ".join(f"{k} {v}" for k, v in sorted(s["end_reasons"].items())))
    table.add_row("turns (mean)", f"{s['turns_mean']:.1f}")
    table.add_row("episodes / minute", f"{s['timing'].get('episodes_per_minute', 0):.2f}")
    console.print(table)
    if s["n_errors"]:
        console.print(f"[bold red]{s['n_errors']} of {s['n_episodes']} episodes errored[/] (counted as failures):")
        for cause, n in s.get("errors_by_cause", {}).items():
            console.print(f"  [red]{n} x[/] {escape(cause)}")


def serve_model(
    model: str = typer.Argument(..., help="Any --model spec of `sage evaluate` backed by a model (e.g. smollm2-135m)."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8000, help="Port."),
    name: Optional[str] = typer.Option(None, help="Model name clients send (default: the spec)."),
) -> None:
    """Serve a model over an OpenAI-compatible API (/v1/chat/completions, /v1/models)."""
    from sage_models.server import serve

    console.print(f"serving {model} at http://{host}:{port}/v1 (Ctrl-C stops)")
    serve(model, host, port, name)
