"""Each phase of the trainer alone (sage_opd.build, rollout_phase, score_phase, loss_phase, optim_phase,
checkpoint, run_log, evaluation), on tiny real models and a fixed rollout batch of real ALFWorld turns
(``batches`` in conftest.py: the random student's invalid turns and the expert's valid turns)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sage_opd.algorithm import ALGORITHMS, algorithm_for, guided_beta
from sage_opd.build import Student, build, check_models
from sage_opd.config import ConfigError, LogConfig, load_config
from sage_opd.parallel import DistInfo
from sage_opd.records import RolloutBatch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_sage_opd_alfworld.yaml"


def config(tiny_models, out_dir, *extra: str):
    return load_config(TINY, [f"student.path={tiny_models['student']}", f"teacher.path={tiny_models['teacher']}",
                              f"log.out_dir={out_dir}", "log.tensorboard=false", *extra])


def built(tiny_models, tmp_path, *extra: str):
    cfg = config(tiny_models, tmp_path, *extra)
    algorithm = algorithm_for(cfg.algorithm, cfg.sft.source)
    loss = algorithm.loss_options(cfg.loss)
    plan = check_models(cfg, algorithm, DistInfo(), torch.float32)
    return cfg, algorithm, loss, build(cfg, algorithm, loss, plan, DistInfo(), torch.float32)


# ---- the dependency direction and the algorithm table ---------------------------------------------------
def test_the_loss_layer_loads_no_env_rollout_or_config():
    code = ("import sys, sage_opd.objective, sage_opd.losses, sage_opd.xtok_losses, sage_opd.algorithm, "
            "sage_opd.records; print('\\n'.join(sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert "sage_opd.objective" in loaded
    assert not [m for m in loaded if m.split(".")[0] in ("sage_gym", "sage_rollout", "sage_models", "sage_evals",
                                                         "alfworld", "textworld", "scienceworld")
                or m in ("sage_opd.rollout", "sage_opd.config", "sage_opd.teacher", "sage_opd.xtok")]


def test_algorithms_say_who_writes_what_is_imitated_and_which_loss(tiny_models, tmp_path):
    cfg = config(tiny_models, tmp_path, "loss.intervention=random", "loss.confidence=maxprob",
                 "loss.normalization=none")
    for name in ("opd", "guided_opd"):  # standard OPD's options whatever the config says
        forced = ALGORITHMS[name].loss_options(cfg.loss)
        assert (forced.intervention, forced.confidence, forced.normalization) == ("all", "none", "standard")
        assert forced.token_loss == cfg.loss.token_loss and not ALGORITHMS[name].judges(cfg.loss)
    assert ALGORITHMS["sage_opd"].loss_options(cfg.loss) is cfg.loss and ALGORITHMS["sage_opd"].judges(cfg.loss)
    assert not ALGORITHMS["sage_opd"].judges(ALGORITHMS["opd"].loss_options(cfg.loss))  # intervention all
    assert [ALGORITHMS[a].imitates("student") for a in ("opd", "sage_opd", "guided_opd", "sft")] == \
        [False, False, False, True]
    assert all(ALGORITHMS[a].imitates("teacher") and ALGORITHMS[a].imitates("expert") for a in ALGORITHMS)
    expert, teacher = algorithm_for("sft", "expert"), algorithm_for("sft", "teacher")
    assert not expert.needs_teacher and teacher.needs_teacher and teacher.teacher_writes
    assert all(ALGORITHMS[a].needs_teacher for a in ("opd", "sage_opd", "guided_opd"))
    # a teacher with its own tokenizer (loss.cross_tokenizer) only where it never writes a turn
    assert [ALGORITHMS[a].any_teacher_tokenizer for a in ("opd", "sage_opd", "guided_opd")] == [True, True, False]
    assert not teacher.any_teacher_tokenizer
    guided = ALGORITHMS["guided_opd"]
    assert guided.teacher_prob(0, 10, 0.5) == 1.0 and guided.teacher_prob(5, 10, 0.5) == 0.0
    assert guided.teacher_prob(3, 10, 0.8) == guided_beta(3, 10, 0.8) and 0 < guided_beta(3, 10, 0.8) < 1
    assert teacher.teacher_prob(7, 10, 0.8) == 1.0 and ALGORITHMS["opd"].teacher_prob(0, 10, 0.8) == 0.0
    with pytest.raises(ConfigError, match="guided_opd needs the teacher to generate turns"):
        config(tiny_models, tmp_path, "algorithm=guided_opd", "teacher.server_url=http://127.0.0.1:9/v1")
    with pytest.raises(ValueError, match="unknown algorithm 'ppo'"):
        algorithm_for("ppo")


# ---- build ------------------------------------------------------------------------------------------
def test_build_gives_each_algorithm_its_parts(tiny_models, tmp_path):
    _, _, _, sage = built(tiny_models, tmp_path / "a")
    assert sage.judge is not None and sage.judge.teacher is sage.teacher and sage.teacher is not None
    _, _, _, opd = built(tiny_models, tmp_path / "b", "algorithm=opd")
    assert opd.judge is None and opd.teacher is not None
    _, _, _, sft = built(tiny_models, tmp_path / "c", "algorithm=sft", "teacher.path=null")
    assert sft.teacher is None and sft.judge is None
    _, _, _, lora = built(tiny_models, tmp_path / "d", "algorithm=opd", "student.lora.enabled=true", "student.lora.r=2")
    (group,) = lora.optimizer.param_groups
    trained = {id(p) for p in group["params"]}
    names = [n for n, p in lora.student.model.named_parameters() if id(p) in trained]
    assert names and all("lora_" in n for n in names) and len(names) == len(lora.student.parameters())


# ---- rollout ----------------------------------------------------------------------------------------
def test_rollout_phase_writers_follow_the_algorithm(tiny_models, tmp_path, batches):
    from sage_opd.rollout_phase import RolloutPhase

    common = ("rollout.max_turns=2", "rollout.max_new_tokens=6", "optim.steps=10", "guided.rho=0.5")
    cfg, algorithm, _, parts = built(tiny_models, tmp_path / "g", "algorithm=guided_opd", *common)
    phase = RolloutPhase(cfg, algorithm, parts.student, parts.teacher, DistInfo(), tmp_path / "g")
    try:
        first, late = phase.collect(0), phase.collect(5)  # beta 1, then 0
    finally:
        phase.close()
    assert {t.source for t in first.turns} == {"teacher"} and {t.source for t in late.turns} == {"student"}
    assert len(first.episodes) == 2 and all(t.token_ids and t.prompt_ids for t in first.turns + late.turns)
    cfg, algorithm, _, parts = built(tiny_models, tmp_path / "s", "algorithm=sft", "teacher.path=null", *common)
    phase = RolloutPhase(cfg, algorithm, parts.student, None, DistInfo(), tmp_path / "s")
    try:
        expert = phase.collect(0)
    finally:
        phase.close()
    assert {t.source for t in expert.turns} == {"expert"} and all(t.action_valid for t in expert.turns)
    # a fixed batch: rank r of w gets episodes r, r + w, ...
    cfg = config(tiny_models, tmp_path / "f", f"rollout.from_file={batches['train']}")
    saved = RolloutBatch.load(batches["train"])
    share = RolloutPhase(cfg, algorithm_for("opd"), parts.student, None, DistInfo(rank=1, world=2), tmp_path).collect(0)
    assert [ep.episode_id for ep in share.episodes] == [ep.episode_id for ep in saved.episodes[1::2]]


# ---- score ------------------------------------------------------------------------------------------
def test_score_phase_judges_valid_turns_and_short_circuits_invalid_ones(tiny_models, tmp_path, batches):
    from sage_models import chat_ids
    from sage_opd.judge import JudgeTurn
    from sage_opd.score_phase import ScorePhase

    _, algorithm, _, parts = built(tiny_models, tmp_path, "loss.judge_mode=hard", "loss.tau=0.5")
    turns = RolloutBatch.load(batches["train"]).turns
    valid = [t for t in turns if t.invalid_reason is None]
    assert valid and len(valid) < len(turns)
    seen = []
    scorer = ScorePhase(algorithm, parts.judge, parts.student.tokenizer, seed=0,
                        on_judged=lambda step, judged, result: seen.append((step, judged, result)))
    scores = scorer(turns, step=3)
    p_yes = parts.judge.p_yes([JudgeTurn(t.task, t.messages, t.text, t.feedback) for t in valid]).tolist()
    decided = iter(float(p >= 0.5) for p in p_yes)
    assert scores.interventions == [1.0 if t.invalid_reason else next(decided) for t in turns]
    assert scores.imitated == [False] * len(turns)
    assert scores.stats["judge_calls"] == len(valid)
    assert scores.stats["short_circuit/unparseable"] == sum(t.invalid_reason == "unparseable" for t in turns)
    assert seen[0][0] == 3 and seen[0][1] == turns  # every distilled turn went to the judge (invalid ones short)
    # inverted: 1 - the judge's decision on the valid turns, still 1 on invalid ones
    parts.judge.config.mode = "inverted"
    inverted = scorer(turns, step=3).interventions
    assert [i for i, t in zip(inverted, turns) if t.invalid_reason is None] == [1.0 - float(p >= 0.5) for p in p_yes]
    # Guided-OPD teacher turns (no ids yet) are imitated: i = 1, no judge call, ids from the chat template
    for t in turns[:2]:
        t.source, t.prompt_ids, t.token_ids = "teacher", [], []
    guided = ScorePhase(algorithm_for("guided_opd"), None, parts.student.tokenizer, seed=0)(turns, step=0)
    assert guided.imitated[:2] == [True, True] and guided.interventions == [1.0] * len(turns)
    assert turns[0].prompt_ids == chat_ids(parts.student.tokenizer, turns[0].messages)
    assert parts.student.tokenizer.decode(turns[0].token_ids) == turns[0].text


# ---- loss -------------------------------------------------------------------------------------------
def test_loss_phase_sums_and_gradients_equal_the_reference_loss(tiny_models, tmp_path, batches):
    """sum(w l) over distilled turns (reference_opd_loss on full logits, one turn at a time) plus the imitated
    turn's cross-entropy; the skipped turn (i = 0) counts in N only; gradients equal the reference's."""
    from sage_opd.loss_phase import LossPhase
    from sage_opd.losses import reference_opd_loss
    from sage_opd.score_phase import Scores, ScorePhase
    from sage_opd.teacher import lm_hidden_states, make_batch

    _, _, loss, parts = built(tiny_models, tmp_path, "loss.judge_mode=soft")
    student, teacher = parts.student, parts.teacher
    turns = RolloutBatch.load(batches["train"]).turns  # 2 invalid student turns, 2 valid expert turns
    ScorePhase(algorithm_for("opd"), None, student.tokenizer, seed=0).tokenize(turns)  # the expert turns' ids
    interventions, imitated = [1.0, 0.0, 0.6, 1.0], [False, False, False, True]
    sums = LossPhase(student, teacher, loss, grad_accum=2)(turns, Scores(interventions, imitated))
    got = {n: p.grad.clone() for n, p in student.model.named_parameters()}

    student.model.zero_grad(set_to_none=True)
    total, weight_sum, ce_tokens, opd_tokens = 0.0, 0.0, 0, 0
    for t, i, im in zip(turns, interventions, imitated):
        batch = make_batch([t], student.pad_id, pack=False)
        hidden, weight = lm_hidden_states(student.model, batch)
        logits = (hidden @ weight[:student.vocab].T)[batch.response_mask]
        targets = batch.target_ids[batch.response_mask]
        if im:
            part = F.cross_entropy(logits, targets, reduction="sum")
            weight_sum, ce_tokens = weight_sum + len(targets), ce_tokens + len(targets)
        elif i > 0:
            with torch.no_grad():
                t_hidden, t_weight = lm_hidden_states(teacher.model, batch)
                t_logits = (t_hidden @ t_weight[:student.vocab].T)[batch.response_mask]
            ref = reference_opd_loss(logits, t_logits, intervention=torch.full((len(targets),), i),
                                     confidence=loss.confidence, normalization="none")
            part, weight_sum, opd_tokens = ref.weighted_sum, weight_sum + ref.weight_sum, opd_tokens + len(targets)
        else:
            continue
        part.backward()
        total += float(part.detach())
    assert sums["tokens"] == sum(len(t.token_ids) for t in turns) > opd_tokens + ce_tokens  # the skipped turn
    assert (sums["opd_tokens"], sums["ce_tokens"]) == (opd_tokens, ce_tokens)
    assert sums["weighted_loss"] == pytest.approx(total, rel=1e-4)
    assert sums["weight_sum"] == pytest.approx(weight_sum, rel=1e-5)
    for n, p in student.model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-3, atol=1e-6)


# ---- optimiser step ---------------------------------------------------------------------------------
@pytest.mark.parametrize("normalization, denominator", [("preserve", 4.0), ("none", 10.0), ("standard", 10.0)])
def test_optimizer_step_divides_by_sum_of_weights_or_tokens(normalization, denominator):
    from sage_opd.optim_phase import optimizer_step

    param = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    grad = torch.tensor([0.4, 0.8, -1.2])
    param.grad = grad.clone()
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    sums = {"tokens": 10, "weight_sum": 4.0, "weighted_loss": 2.0, "opd_tokens": 8, "kl_sum": 4.0,
            "confidence_sum": 6.0, "ce_tokens": 2, "ce_sum": 3.0}
    out = optimizer_step(sums, [param], optimizer, scheduler, normalization, max_grad_norm=100.0)
    torch.testing.assert_close(param.data, torch.tensor([1.0, -2.0, 3.0]) - grad / denominator)
    assert out["loss"] == pytest.approx(2.0 / denominator) and out["no_update"] == 0
    assert out["grad_norm"] == pytest.approx(float(grad.norm()) / denominator, rel=1e-6)
    assert (out["kl"], out["confidence_mean"], out["ce"]) == (0.5, 0.75, 1.5) and param.grad is None


def test_optimizer_step_with_no_selected_turn_makes_no_update_but_counts_the_step():
    from sage_opd.optim_phase import optimizer_step

    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.ones(3)
    optimizer = torch.optim.AdamW([param], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 4))
    out = optimizer_step({"tokens": 5, "weight_sum": 0.0, "weighted_loss": 0.0}, [param], optimizer, scheduler,
                         "preserve", max_grad_norm=1.0)
    assert out["no_update"] == 1 and out["loss"] == 0.0 and torch.equal(param.data, torch.ones(3))
    assert scheduler.last_epoch == 1 and not optimizer.state  # the schedule moved on, AdamW never stepped


def test_lr_schedule_warms_up_then_holds_or_decays_to_zero():
    from sage_opd.build import lr_factor

    assert [lr_factor(s, 4, 10, "constant") for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = [lr_factor(s, 4, 10, "cosine") for s in range(12)]
    assert cosine[:4] == [0.25, 0.5, 0.75, 1.0] and cosine[7] == pytest.approx(0.5)  # halfway from step 4 to 10
    assert cosine[4] == 1.0 and all(a > b for a, b in zip(cosine[4:10], cosine[5:11]))
    assert cosine[10] == cosine[11] == pytest.approx(0.0)
    assert lr_factor(0, 0, 10, "cosine") == 1.0 and lr_factor(5, 0, 10, "cosine") == pytest.approx(0.5)


# ---- checkpoint -------------------------------------------------------------------------------------
def test_checkpoint_round_trip_restores_optimizer_schedule_rng_and_judge(tiny_models, tmp_path):
    from sage_opd.build import build_optimizer
    from sage_opd.checkpoint import Checkpoints, OutputExistsError

    cfg, _, _, parts = built(tiny_models, tmp_path, "optim.warmup_steps=5", "log.keep_checkpoints=2")
    for p in parts.student.parameters():
        p.grad = torch.randn_like(p)
    parts.optimizer.step()
    parts.scheduler.step()
    parts.judge.judged_total, parts.judge.judged_sum = 7, 2.5
    checkpoints = Checkpoints(tmp_path, DistInfo(), keep=2)
    for step in (1, 2, 3):
        checkpoints.save(step, parts.student, parts.optimizer, parts.scheduler, parts.judge, cfg.to_dict())
    draws = (random.random(), float(np.random.rand()), float(torch.rand(())))
    assert [p.name for p in sorted(checkpoints.folder.iterdir())] == ["step-000002", "step-000003"]
    assert checkpoints.latest().name == "step-000003"

    _, _, _, fresh = built(tiny_models, tmp_path / "fresh", "optim.warmup_steps=5")
    assert fresh.judge.judged_total == 0 and not fresh.optimizer.state
    step = checkpoints.load(checkpoints.latest(), cfg, fresh.student, fresh.optimizer, fresh.scheduler, fresh.judge)
    assert step == 3 and (fresh.judge.judged_total, fresh.judge.judged_sum) == (7, 2.5)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == draws
    assert fresh.scheduler.last_epoch == parts.scheduler.last_epoch == 1
    assert fresh.scheduler.get_last_lr() == parts.scheduler.get_last_lr()
    for a, b in zip(parts.optimizer.state.values(), fresh.optimizer.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in ("exp_avg", "exp_avg_sq"))
    from safetensors.torch import load_file

    saved = load_file(str(checkpoints.latest() / "model" / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in parts.student.model.state_dict().items() if k in saved)
    assert build_optimizer(cfg, fresh.student.parameters())[0].state == {}  # a new optimiser starts empty
    with pytest.raises(OutputExistsError, match="checkpoints up to step-000003.*--resume"):
        checkpoints.refuse_existing_run(tmp_path / "metrics.jsonl")


# ---- log --------------------------------------------------------------------------------------------
def test_run_log_appends_metrics_and_drops_steps_past_a_checkpoint(tmp_path):
    from sage_opd.run_log import RunLog

    log = RunLog(tmp_path, LogConfig(tensorboard=True, judge_turns=False))
    for step in (1, 2, 3):
        log.log({"step": step, "loss": 1.0 / step, "kl": None})
    log.close()
    with open(log.metrics_path, "a") as f:
        f.write('{"step": 4, "lo')  # a kill mid-write
    log.truncate(2)
    assert [json.loads(ln)["step"] for ln in log.metrics_path.read_text().splitlines()] == [1, 2]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    log.judged(0, [], None)  # log.judge_turns=false: nothing written
    assert not log.judge_path.exists()
    RunLog(tmp_path, LogConfig(tensorboard=False), main=False).log({"step": 9})  # other ranks write nothing
    assert len(log.metrics_path.read_text().splitlines()) == 2


# ---- evaluate ---------------------------------------------------------------------------------------
def test_evaluate_phase_runs_the_live_student_on_a_panel(tiny_models, tmp_path):
    from sage_opd.evaluation import evaluate_student

    cfg, _, _, parts = built(tiny_models, tmp_path, "eval.limit=1", "eval.workers=1", "eval.max_turns=1",
                             "eval.max_new_tokens=4", "eval.unseen=null")
    student = Student(parts.student.model, parts.student.tokenizer, parts.student.path, DistInfo())
    out = evaluate_student(student, cfg.eval, "tiny", tmp_path, step=4)
    assert set(out) == {f"eval/seen/{k}" for k in ("success", "score", "turns", "invalid_rate")}
    assert out["eval/seen/turns"] == 1.0 and student.model.training
    run = json.loads((tmp_path / "evals" / "step-000004" / "seen" / "run.json").read_text())
    assert "tiny @ step 4" in json.dumps(run)
