"""The stages of the study (see ``driver.Study.stages`` for their order). Each returns what it made."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sage_models.policy import Decoding
from sage_study import data as D
from sage_study.config import MethodConfig

if TYPE_CHECKING:
    from sage_study.driver import Study


def _records(study: Study, name: str) -> list[dict]:
    return D.episodes(study.data_dir(name))


def _play_info(records: list[dict]) -> dict[str, Any]:
    n = len(records)
    return {"episodes": n, "success": sum(r["success"] for r in records) / max(n, 1),
            "turns_mean": sum(r["turns"] for r in records) / max(n, 1),
            "errors": sum(bool(r.get("error")) for r in records)}


def _noisy(study: Study) -> list[dict]:
    """Noisy expert play of the teacher's games: the noisy games, and the pool games' noisy plays if any."""
    return _records(study, "noisy") + (_records(study, "noisy-pool") if study.cfg.data.noisy_pool else [])


def _history_messages(study: Study) -> int:
    from sage_opd.config import TrainConfig, build

    return 2 * build(TrainConfig, study.cfg.train).loss.judge_history_turns


# ---- data --------------------------------------------------------------------------------------------
def pick_games(study: Study) -> dict[str, Any]:
    """Disjoint seeded samples of train games for every data set, written to games.json."""
    from sage_study.driver import atomic_json

    cfg, d = study.cfg, study.cfg.data
    build = cfg.teacher.path is None
    sizes = {"expert": d.expert, "noisy": d.noisy, "judge": d.judge, "heldout": d.heldout} if build else {}
    if d.pool_source == "fresh":
        sizes["pool"] = d.pool
    games = D.split_games(D.panel_ids(cfg.envs.train), sizes, d.seed)
    if build or cfg.student.path is None:
        games["warm"] = games["expert"][len(games["expert"]) - d.warm:]  # disjoint from a pool taken from the front
    atomic_json(study.out / "games.json", games)
    return {name: len(ids) for name, ids in games.items()}


def pick_pool(study: Study) -> dict[str, Any]:
    """``pool_source: expert``: the rollout pool is the first ``data.pool`` expert games that the expert won within
    the turn cap, or within ``data.pool_max_turns`` (and that are not warm-start games), so that the teacher,
    trained on them, can win them."""
    from sage_study.driver import atomic_json

    games, cap = study.games(), study.cfg.data.pool_max_turns
    won = {r["episode_id"] for r in _records(study, "expert") if r["success"] and (cap is None or r["turns"] <= cap)}
    warm = set(games.get("warm", []))
    games["pool"] = [g for g in games["expert"] if g in won and g not in warm][:study.cfg.data.pool]
    if study.cfg.data.warm_from_pool:
        games["warm"] = (games["pool"] + games["warm"])[:len(games["warm"])]
    atomic_json(study.out / "games.json", games)
    return {"pool": len(games["pool"]), "warm": len(games["warm"])}


def play_expert(study: Study, games: str, folder: str, epsilon: float, plays: int = 1) -> dict[str, Any]:
    """The hand-coded expert (with ``epsilon`` random mistakes) on the ``games`` list, ``plays`` seeds each,
    expert labels on, into ``data/<folder>``."""
    cfg = study.cfg
    records = D.play("handcoded", cfg.envs.train, study.games()[games], study.data_dir(folder),
                     seeds=range(plays), workers=cfg.data.workers, max_turns=cfg.envs.max_turns,
                     model_opts={"epsilon": epsilon} if epsilon else None)
    return _play_info(records)


def train_tokenizer(study: Study) -> dict[str, Any]:
    """Byte-level BPE on the text of the expert and noisy episodes (train split only) plus the prompts."""
    from sage_study.models import train_tokenizer as train

    records = _records(study, "expert") + _noisy(study)
    tokenizer = train(D.corpus(records), study.cfg.tokenizer_vocab, graded=study.cfg.teacher.graded_judge)
    tokenizer.save_pretrained(study.tokenizer_path)
    return {"vocab": len(tokenizer)}


def _sft(study: Study, which: str, examples: list, dest: str) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from sage_study.models import count_params, new_model
    from sage_study.sft import save_model, train_sft

    spec = getattr(study.cfg, which)
    tokenizer = AutoTokenizer.from_pretrained(study.tokenizer_path)
    model = new_model(tokenizer, spec.arch, seed=spec.sft.seed)
    with _StepBar(f"{which} SFT") as bar:
        result = train_sft(model, tokenizer, examples, spec.sft, on_step=bar.update,
                           on_copy_step=lambda *a: bar.update(*a, phase=f"{which} copying warm-up"))
    save_model(model, tokenizer, dest)
    return {"params": count_params(model), "examples": len(examples), "steps": result.steps,
            "tokens_trained": result.tokens_trained, "dropped": result.dropped, "epoch_losses": result.losses,
            "sft_seconds": round(result.seconds, 1), "copy_warmup_seconds": round(result.copy_seconds, 1)}


def warm_student(study: Study) -> dict[str, Any]:
    """The student trained briefly on a few expert episodes, so that it writes valid actions."""
    warm = set(study.games()["warm"])
    records = [r for r in _records(study, "expert") if r["episode_id"] in warm]
    examples = D.with_swaps(records, study.cfg.student.swaps, study.cfg.data.seed)
    return {**_sft(study, "student", examples, study.student_path), "warm_games": len(records)}


def student_rollouts(study: Study) -> dict[str, Any]:
    """The warm student on the judge and held-out games (expert labels on): realistic turns to judge."""
    cfg, games = study.cfg, study.games()
    records = D.play(study.student_path, cfg.envs.train, games["judge"] + games["heldout"], study.data_dir("student"),
                     workers=cfg.eval.workers, max_turns=cfg.envs.max_turns,
                     decoding=Decoding(temperature=1.0, max_new_tokens=cfg.eval.max_new_tokens))
    return _play_info(records)


def student_pool(study: Study) -> dict[str, Any]:
    """The warm student on the pool games at the training rollout temperature, ``data.dagger_plays`` times each
    (expert labels on): the states distillation visits, whose mistakes the expert corrects for the teacher."""
    from sage_opd.config import RolloutConfig

    cfg = study.cfg
    temperature = cfg.train.get("rollout", {}).get("temperature", RolloutConfig.temperature)
    records = D.play(study.student_path, cfg.envs.train, study.games()["pool"], study.data_dir("student-pool"),
                     seeds=range(cfg.data.dagger_plays), workers=cfg.eval.workers, max_turns=cfg.envs.max_turns,
                     decoding=Decoding(temperature=temperature, max_new_tokens=cfg.eval.max_new_tokens))
    return _play_info(records)


def _judge_data(study: Study, games: set[str], graded: bool = False) -> list:
    """Labelled judge turns of the noisy expert and the student on ``games`` (graded: Skip/Weak/Strong labels)."""
    records = [r for r in _noisy(study) + _records(study, "heldout-noisy") + _records(study, "student")
               if r["episode_id"] in games]
    return D.judge_turns(records, graded)


def train_teacher(study: Study) -> dict[str, Any]:
    """The teacher, trained on ``teacher_examples``."""
    examples, counts = teacher_examples(study)
    return {**_sft(study, "teacher", examples, study.teacher_path), **counts}


def teacher_examples(study: Study) -> tuple[list, dict[str, int]]:
    """The teacher's SFT examples and their counts by kind: imitation of the expert (and of its recoveries in noisy
    play), the expert's corrections of the warm student's mistakes on the pool (``data.dagger_plays``), plus judgment
    examples (Yes/No, and Skip/Weak/Strong on the same turns when ``teacher.graded_judge``)."""
    cfg, games = study.cfg, study.games()
    imitation = D.with_swaps(_records(study, "expert") + _noisy(study), cfg.teacher.swaps, cfg.data.seed)
    corrections = (D.correction_examples(_records(study, "student-pool"), cfg.data.dagger_turns)
                   if cfg.data.dagger_plays else [])
    judged = set(games["noisy"]) | set(games["judge"]) | (set(games["pool"]) if cfg.data.noisy_pool else set())
    limit = None if cfg.teacher.judge_share is None else int(cfg.teacher.judge_share * len(imitation))
    labelled = D.balance(_judge_data(study, judged), cfg.data.seed, limit)
    examples = imitation + corrections + D.judge_examples(labelled, _history_messages(study))
    graded = []
    if cfg.teacher.graded_judge:
        graded = D.balance(_judge_data(study, judged, graded=True), cfg.data.seed, limit)
        examples += D.judge_examples(graded, _history_messages(study), graded=True)
    return examples, {"imitation_examples": len(imitation), "correction_examples": len(corrections),
                      "judge_examples": len(labelled), "graded_judge_examples": len(graded)}


def judge_eval(study: Study) -> dict[str, Any]:
    """The teacher's judge on held-out games' turns (noisy expert and student), through the trainer's judge."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sage_evals.stats import auroc
    from sage_opd.judge import JudgeConfig, TurnJudge
    from sage_opd.teacher import HFTeacher

    labelled = _judge_data(study, set(study.games()["heldout"]))
    if not labelled:
        return {"turns": 0}
    tokenizer = AutoTokenizer.from_pretrained(study.teacher_path)
    teacher = HFTeacher(AutoModelForCausalLM.from_pretrained(study.teacher_path), tokenizer=tokenizer)
    labels = [y for _, y in labelled]

    def measured(decision: str) -> dict[str, Any]:  # p_yes: q(Yes) (graded: 1 - q(Skip)) against the Yes/No label
        judge = TurnJudge(teacher, tokenizer, JudgeConfig(decision=decision, history_messages=_history_messages(study)))
        p_yes = []
        for lo in range(0, len(labelled), 32):
            p_yes += judge.p_yes([t for t, _ in labelled[lo:lo + 32]]).tolist()
        correct = sum((p >= 0.5) == y for p, y in zip(p_yes, labels))
        return {"accuracy": correct / len(labels), "auroc": auroc(p_yes, labels),
                "judged_yes_rate": sum(p >= 0.5 for p in p_yes) / len(p_yes)}

    out = {"turns": len(labels), "yes_rate": sum(labels) / len(labels), **measured("hard")}
    if study.cfg.teacher.graded_judge:
        out["graded"] = measured("graded")
    return out


# ---- evaluation and training --------------------------------------------------------------------------
def evaluate_model(study: Study, name: str, model_path: str) -> dict[str, Any]:
    """``model_path`` on each evaluation panel (fixed prefixes) with the evaluation seeds, through sage_evals."""
    from sage_evals.runner import check_errors, evaluate

    cfg, ecfg, out = study.cfg, study.cfg.eval, {}
    for panel, env_id, limit, ids in study.panels():
        summary = evaluate(model_path, env_id, seeds=ecfg.seeds, workers=ecfg.workers, limit=limit,
                           episode_ids=ids, out_dir=study.out / "evals" / name / panel,
                           decoding=Decoding(temperature=ecfg.temperature, max_new_tokens=ecfg.max_new_tokens),
                           env_kwargs={"max_turns": cfg.envs.max_turns})
        check_errors(summary)
        out[panel] = {"success": summary["success"]["mean"], "score": summary["score"]["mean"],
                      "invalid_rate": sum(summary["invalid_rate"].values()), "turns_mean": summary["turns_mean"],
                      "episodes": summary["n_episodes"], "errors": summary["n_errors"]}
    return out


def train_config(study: Study, method: MethodConfig, seed: int):
    """The `sage train` config of one run: the shared ``train`` section, the method, the seed and the study's
    models, rollout game pool and paths."""
    from sage_opd.config import TrainConfig, build, parse_overrides, set_dotted, validate

    data = copy.deepcopy(study.cfg.train)
    for key, value in {"algorithm": method.algorithm, "student.path": study.student_path,
                       "teacher.path": study.teacher_path, "optim.seed": seed,
                       "rollout.env_id": study.cfg.envs.train, "rollout.max_turns": study.cfg.envs.max_turns,
                       "rollout.episode_ids": study.games()["pool"],
                       "rollout.env_kwargs": {"expert_labels": True}, "log.out_dir": str(study.run_dir(method.name, seed)),
                       "log.judge_turns": True, "eval.every": 0}.items():
        set_dotted(data, key, value)
    for key, value in parse_overrides(method.overrides):
        set_dotted(data, key, value)
    cfg = build(TrainConfig, data)
    validate(cfg)
    return cfg


def train_run(study: Study, method: MethodConfig, seed: int) -> dict[str, Any]:
    """One `sage train` run (resumed from its last checkpoint if it was interrupted)."""
    from sage_opd.trainer import Trainer

    cfg = train_config(study, method, seed)
    trainer = Trainer(cfg, resume=Path(cfg.log.out_dir).exists())  # the study owns the folder: continue it
    with _StepBar(f"train {method.name} seed {seed}", total=cfg.optim.steps, done=trainer.step) as bar:
        history = trainer.train(on_step=lambda m: bar.update(m["step"], cfg.optim.steps, m.get("loss")))
    steps = [m["time/step"] for m in history]
    return {"steps": cfg.optim.steps, "seconds_per_step": sum(steps) / len(steps) if steps else None}


def evaluate_run(study: Study, method: MethodConfig, seed: int) -> dict[str, Any]:
    """The run's final checkpoint on the evaluation panels."""
    folder = study.run_dir(method.name, seed) / "checkpoints"
    final = sorted(folder.glob("step-*[0-9]"))
    if not final:
        raise FileNotFoundError(f"{folder} holds no checkpoint: run the train/{method.name}/{seed} stage first")
    return evaluate_model(study, f"{method.name}-seed{seed}", str(final[-1] / "model"))


def report(study: Study) -> dict[str, Any]:
    from sage_study.report import write_report

    return write_report(study)


class _StepBar:
    """Progress of a loop of steps (``update(step, total, loss)``): a rich bar with ETA on a terminal, a plain
    line at most every ``every`` seconds (and at the end) when the output goes to a log. ``update(..., phase=label)``
    reports a phase before the main loop (a warm-up): each phase gets its own bar, and its ETA counts only its own
    steps and time."""

    def __init__(self, label: str, total: int | None = None, done: int = 0, every: float = 10.0):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        from sage_study.driver import console

        self.main, self.every, self.console = label, every, console
        self.plain = not console.is_terminal
        self.progress = Progress(TextColumn("[bold blue]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
                                 console=console)
        self.last, self.task = time.perf_counter(), None
        self._phase(label, total, done)

    def _phase(self, label: str, total: int | None, done: int) -> None:
        """Start a phase: its clock starts where the previous phase's last step ended (or now); a bar that never
        moved (the main one, before a warm-up) makes way."""
        if self.task is not None and not self.moved:
            self.progress.remove_task(self.task)
        self.label, self.first, self.start, self.moved = label, done, self.last, False
        self.shown = time.perf_counter()
        self.task = self.progress.add_task(label, total=total, completed=done, status="")

    def __enter__(self) -> _StepBar:
        if not self.plain:
            self.progress.start()
        return self

    def update(self, step: int, total: int, loss: float | None = None, phase: str | None = None) -> None:
        if (phase or self.main) != self.label:
            self._phase(phase or self.main, total, 0)
        now, status = time.perf_counter(), f"loss {loss:.4f}" if loss is not None else ""
        self.last, self.moved = now, True
        if not self.plain:
            self.progress.update(self.task, completed=step, total=total, status=status)
            return
        if now - self.shown < self.every and step < total:
            return
        self.shown, elapsed = now, now - self.start
        rate = (step - self.first) / elapsed if elapsed > 0 else 0.0
        eta = f", about {(total - step) / rate:.0f} s left" if rate > 0 and step < total else ""
        self.console.print(f"{self.label}: step {step}/{total} {status} ({elapsed:.0f} s{eta})", highlight=False)

    def __exit__(self, *exc) -> None:
        if not self.plain:
            self.progress.stop()
