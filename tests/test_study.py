"""The study's building blocks: labels, chat encoding for SFT, offline SFT, configs (fast, no env)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sage_models import chat_text
from sage_opd.config import ConfigError
from sage_opd.judge import JudgeConfig, JudgeTurn, TurnJudge
from sage_study import data as D
from sage_study.config import load_study_config
from sage_study.sft import ChatExample, SftConfig, encode, train_sft, turn_match

CONFIG = "configs/study/alfworld_cpu.yaml"


def _record(actions: list[tuple[str, str, str]]) -> dict:
    """An episode record as the runner writes it: (played action, expert's move, observation) per turn."""
    messages = [{"role": "system", "content": "rules"}, {"role": "user", "content": "Your task is to: put a mug."}]
    steps = []
    for t, (action, expert, obs) in enumerate(actions):
        response = f"Thought {t}.\n<action>{action}</action>"
        messages += [{"role": "assistant", "content": response}, {"role": "user", "content": obs}]
        steps.append({"turn": t + 1, "response": response, "action": action, "action_valid": True,
                      "invalid_reason": None, "observation": obs, "expert": {"action": expert, "thought": "x"}})
    return {"episode_id": "train/x/1", "seed": 0, "task": "put a mug.", "messages": messages, "steps": steps,
            "error": None, "success": False}


def test_labels_train_on_expert_moves_and_flag_the_others():
    record = _record([("go to desk 1", "go to desk 1", "You arrive at desk 1."),
                      ("go to bed 1", "take mug 1 from desk 1", "You arrive at bed 1."),
                      ("take mug 1 from bed 1", "take mug 1 from bed 1", "Nothing happens.")])
    (example,) = D.imitation_examples([record])
    assert example.train_turns == [2, 6]  # the assistant messages that played the expert's move
    labelled = D.judge_turns([record])
    assert [y for _, y in labelled] == [False, True, True]  # a detour, and a move that did nothing
    turn = labelled[1][0]
    assert turn.response == record["steps"][1]["response"] and turn.history == record["messages"][:4]
    assert turn.feedback == "You arrive at bed 1." and turn.task == "put a mug."


def test_corrections_answer_the_students_own_states_with_the_experts_move():
    record = _record([("go to desk 1", "go to desk 1", "You arrive at desk 1."),
                      ("go to desk 1", "take mug 1 from desk 1", "Nothing happens."),
                      ("go to desk 1", "take mug 1 from desk 1", "Nothing happens."),
                      ("go to bed 1", "take mug 1 from desk 1", "You arrive at bed 1.")])
    examples = D.correction_examples([record], per_episode=2)
    assert len(examples) == 2  # the first two mistakes; the agreeing first turn is no correction
    for example, k in zip(examples, (4, 6)):
        assert example.messages[:-1] == record["messages"][:k]  # the student's own history, up to that state
        assert example.messages[-1] == {"role": "assistant", "content": "x\n<action>take mug 1 from desk 1</action>"}
        assert example.train_turns == [k]  # trained on that answer only, never on the student's moves before it
    assert len(D.correction_examples([record], per_episode=5)) == 3
    assert D.correction_examples([{**record, "error": "env crashed"}], per_episode=5) == []


def test_judge_examples_are_the_exact_chat_the_trainers_judge_reads(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models["teacher"])
    record = _record([("go to desk 1", "go to bed 1", "You arrive at desk 1."), ("look", "look", "ok")])
    labelled = D.judge_turns([record])
    examples = D.judge_examples(labelled, history_messages=4)
    judge = TurnJudge(None, tok, JudgeConfig(history_messages=4))  # renders prompts; scoring needs no teacher here
    for (turn, _), ex in zip(labelled, examples):
        assert chat_text(tok, ex.messages[:-1]) == judge.render_text(turn)
    assert [ex.messages[-1]["content"] for ex in examples] == ["Yes", "No"]


def test_graded_labels_and_examples_match_the_graded_judge(tiny_models):
    """Skip for the expert's move, Weak for another move that did something, Strong for one that did nothing (the
    same turns Yes/No calls No, Yes, Yes), rendered in the graded judge's own prompt; balancing keeps both sides."""
    tok = AutoTokenizer.from_pretrained(tiny_models["teacher"])
    record = _record([("go to desk 1", "go to desk 1", "You arrive at desk 1."),
                      ("go to bed 1", "take mug 1 from desk 1", "You arrive at bed 1."),
                      ("take mug 1 from bed 1", "take mug 1 from bed 1", "Nothing happens.")])
    graded = D.judge_turns([record], graded=True)
    assert [y for _, y in graded] == ["Skip", "Weak", "Strong"]
    assert [y != "Skip" for _, y in graded] == [y for _, y in D.judge_turns([record])]
    examples = D.judge_examples(graded, history_messages=4, graded=True)
    judge = TurnJudge(None, tok, JudgeConfig(decision="graded", history_messages=4))
    for (turn, _), ex in zip(graded, examples):
        assert chat_text(tok, ex.messages[:-1]) == judge.render_text(turn)
        assert "Skip" in ex.messages[-2]["content"] and "Yes" not in ex.messages[-2]["content"].split()
    assert [ex.messages[-1]["content"] for ex in examples] == ["Skip", "Weak", "Strong"]
    kept = D.balance(graded, seed=0)
    assert sorted(y for _, y in kept) in (["Skip", "Strong"], ["Skip", "Weak"])  # one of each side


def test_a_graded_study_tokenizer_gives_each_grade_its_own_token():
    """Without the graded texts BPE splits Skip and Strong into pieces that both start with 'S', so the judge could
    not tell them apart; with them each answer (and its spelling after a space) is one token the judge reads."""
    from sage_study.models import train_tokenizer

    text = ["You arrive at desk 1. On the desk 1, you see a mug 1.", "Nothing happens."] * 200
    plain = train_tokenizer(text, 512)
    graded = train_tokenizer(text, 512, graded=True)
    assert plain.tokenize("Strong")[0] == plain.tokenize("Skip")[0]  # the collision the option prevents
    for word in ("Skip", "Weak", "Strong"):
        assert len(graded.tokenize(word)) == 1 and len(graded.tokenize(" " + word)) == 1
    judge = TurnJudge(None, graded, JudgeConfig(decision="graded"))
    firsts = [graded.tokenize(g)[0] for g in ("Skip", "Weak", "Strong")]
    assert all(graded.convert_tokens_to_ids(t) in judge.answer_ids[g] for t, g in zip(firsts, ("Skip", "Weak", "Strong")))


def test_encode_labels_exactly_the_trained_assistant_turns(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models["student"])
    messages = _record([("go to desk 1", "go to desk 1", "ok"), ("look", "look", "ok")])["messages"]
    ids, labels = encode(tok, ChatExample(messages, [4]))
    trained = tok.decode([i for i, y in zip(ids, labels) if y != -100])
    assert trained == messages[4]["content"] + "<|im_end|>\n"
    assert ids == tok(chat_text(tok, messages, add_generation_prompt=False), add_special_tokens=False)["input_ids"]
    # the trained tokens start right where generation starts after the chat's generation prompt
    prompt = tok(chat_text(tok, messages[:4]), add_special_tokens=False)["input_ids"]
    assert labels[:len(prompt)] == [-100] * len(prompt) and labels[len(prompt)] == ids[len(prompt)]
    _, all_labels = encode(tok, ChatExample(messages))
    assert sum(y != -100 for y in all_labels) > sum(y != -100 for y in labels)


def test_offline_sft_learns_the_trained_turns(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models["student"])
    model = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
    examples = [ChatExample(_record([("go to desk 1", "go to desk 1", "ok"), ("take mug 1 from desk 1",
                                                                             "take mug 1 from desk 1", "ok")])["messages"])]

    def nll() -> float:
        ids, labels = encode(tok, examples[0])
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1]
        return float(torch.nn.functional.cross_entropy(logits, torch.tensor(labels[1:]), ignore_index=-100))

    before = nll()
    result = train_sft(model, tok, examples, SftConfig(epochs=40, lr=1e-2, warmup=0.1))
    assert result.steps == 40 and len(result.losses) == 40
    assert nll() < 0.6 * before and result.losses[-1] < 0.6 * result.losses[0]


class _Oracle(torch.nn.Module):
    """Logits whose argmax is the given next token at every position (``wrong``: positions answered wrongly)."""

    def __init__(self, ids: list[int], wrong: set[int], vocab: int):
        super().__init__()
        self.ids, self.wrong, self.vocab, self.anchor = ids, wrong, vocab, torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=False):
        logits = torch.zeros(1, len(self.ids), self.vocab)
        for at, token in enumerate(self.ids[1:] + [0]):
            logits[0, at, (token + (at + 1 in self.wrong)) % self.vocab] = 1.0
        return type("Out", (), {"logits": logits})


def test_turn_match_counts_a_turn_right_only_when_every_token_of_it_is(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models["student"])
    example = ChatExample(_record([("go to desk 1", "go to desk 1", "ok"), ("look", "look", "ok"),
                                   ("take mug 1 from desk 1", "take mug 1 from desk 1", "ok")])["messages"], [2, 6])
    ids, labels = encode(tok, example)
    end = next(at for at, y in enumerate(labels) if y != -100)  # the first trained turn's last token
    while labels[end + 1] != -100:
        end += 1
    assert turn_match(_Oracle(ids, set(), len(tok)), tok, [example]) == (1.0, 2)
    assert turn_match(_Oracle(ids, {end}, len(tok)), tok, [example]) == (0.5, 2)  # one wrong token fails its turn
    assert turn_match(_Oracle(ids, {end + 1}, len(tok)), tok, [example]) == (1.0, 2)  # the env's text is not a turn


def test_full_10m_profile_builds_models_of_the_issues_sizes():
    """The `full-10m` profile is the study at the issue's sizes: a teacher of 10-30M parameters, a student of 1-5M,
    every SPEC method on 3 seeds and every ablation on at least one; what it does not name comes from `full`."""
    from sage_study.models import count_params, new_model

    full, sized = load_study_config(CONFIG), load_study_config(CONFIG, "full-10m")
    vocab = type("Vocab", (), {"__len__": lambda self: sized.tokenizer_vocab, "eos_token_id": 0, "pad_token_id": 1})()
    teacher, student = (count_params(new_model(vocab, m.arch, 0)) for m in (sized.teacher, sized.student))
    assert 10e6 <= teacher <= 30e6 and 1e6 <= student <= 5e6, (teacher, student)
    assert count_params(new_model(vocab, full.teacher.arch, 0)) < 10e6  # the full profile's are smaller (stated)
    seeds = {m.name: m.seeds for m in sized.methods}
    assert all(len(seeds[m]) == 3 for m in ("opd", "sage_opd", "guided_opd", "sft"))
    assert {m.name for m in full.methods} == set(seeds) and all(len(s) >= 1 for s in seeds.values())
    assert sized.out_dir != full.out_dir and sized.data == full.data and sized.train == full.train


def test_study_config_profiles_overrides_and_errors(tmp_path):
    full = load_study_config(CONFIG)
    quick = load_study_config(CONFIG, "quick", ["eval.seeds=[0, 1]", "train.optim.steps=3"])
    assert full.profile == "full" and quick.profile == "quick" and quick.out_dir != full.out_dir
    assert quick.data.expert < full.data.expert and quick.eval.seeds == [0, 1]
    # the quick profile's data block is merged into the full one's, not replaced: what it does not name comes from full
    assert (quick.data.pool, full.data.pool) == (6, 12) and quick.data.pool_max_turns == full.data.pool_max_turns == 6
    assert full.train["optim"]["steps"] == 60 and quick.train["optim"] == {**full.train["optim"], "steps": 3}
    assert "grad_accum" in quick.train["optim"]
    assert full.eval.seen_limit and full.eval.unseen_limit and not quick.eval.seen_limit
    assert {m.name for m in full.methods} >= {"opd", "sage_opd", "guided_opd", "sft"}
    with pytest.raises(ConfigError, match="Unknown profile 'nope'.*quick"):
        load_study_config(CONFIG, "nope")
    with pytest.raises(ConfigError, match="evall"):
        load_study_config(CONFIG, "quick", ["evall.seeds=[0]"])
    with pytest.raises(ConfigError, match="train.optim.stepz"):
        load_study_config(CONFIG, "quick", ["train.optim.stepz=3"])
    with pytest.raises(ConfigError, match="student.path"):
        load_study_config(CONFIG, "quick", ["teacher.path=/models/teacher"])
    with pytest.raises(ConfigError, match="sage_opd-graded use a graded judge.*teacher.graded_judge: true"):
        load_study_config(CONFIG, None, ["teacher.graded_judge=false"])
    assert full.teacher.graded_judge and not quick.teacher.graded_judge  # quick's teacher stays the measured one
    bad = tmp_path / "bad.yaml"
    bad.write_text("out_dir: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_study_config(bad)


def test_swapped_copies_rename_the_target_object_everywhere():
    import random

    record = _record([("go to desk 1", "go to desk 1", "On the desk 1, you see a mug 1."),
                      ("take mug 1 from desk 1", "take mug 1 from desk 1", "You pick up the mug 1.")])
    record["episode_id"] = "train/pick_and_place_simple-Mug-None-Desk-1/trial_T1"
    (example,) = D.imitation_examples([record])
    swapped = D.swap_object(example, record["episode_id"], random.Random(0))
    text = " ".join(m["content"] for m in swapped.messages)
    other = swapped.messages[-1]["content"].split()[-2]
    assert "mug" not in text and other != "mug" and other in D.object_names() and f"take {other} 1" in text
    assert swapped.train_turns == example.train_turns and len(swapped.messages) == len(example.messages)
    assert len(D.with_swaps([record], 3, seed=0)) == 4



def test_copy_warmup_makes_a_fresh_model_predict_a_span_better_the_second_time_it_reads_it():
    """On held-out spans of text, a model that only learnt the language would predict a span's repeat no better
    than its first reading; copy_warmup trains the repeat, so after it the repeat must cost clearly less than the
    first reading (measured: 3.3 against 3.8 nats per token after 120-200 steps; both 6.3 before)."""
    import torch.nn.functional as F

    from sage_models.tiny import _corpus, build_model, build_tokenizer
    from sage_study.sft import copy_warmup

    lines = _corpus(3000, seed=0)
    tok = build_tokenizer(512, lines)
    ids = [i for line in lines for i in tok(line, add_special_tokens=False)["input_ids"]]
    cut = int(0.8 * len(ids))
    texts = [ids[k:k + 300] for k in range(0, cut - 300, 300)]
    held_out = [ids[k:k + 40] for k in range(cut, len(ids) - 40, 40)][:16]
    sep = tok.eos_token_id

    def first_and_repeat(model) -> tuple[float, float]:
        first = repeat = 0.0
        with torch.no_grad():
            for span in held_out:
                row = torch.tensor([span + [sep] + span])
                ce = F.cross_entropy(model(input_ids=row).logits[0, :-1], row[0, 1:], reduction="none")
                first += float(ce[:len(span) - 1].mean()) / len(held_out)
                repeat += float(ce[len(span):].mean()) / len(held_out)
        return first, repeat

    model = build_model(tok, "student", seed=0, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)
    before = first_and_repeat(model)
    copy_warmup(model, texts, SftConfig(lr=2e-3, copy_steps=150, copy_batch=16), sep)
    model.eval()
    first, repeat = first_and_repeat(model)
    assert abs(before[0] - before[1]) < 0.1 and first < before[0] - 1.0, (before, first, repeat)
    assert repeat < first - 0.25, (before, first, repeat)


def test_study_episodes_come_in_one_order_whatever_order_the_workers_finished_in(tmp_path):
    """Workers append episodes as they finish; SFT data built in file order made the warm student differ from
    run to run (max weight difference 0.27 between two CI runs of the quick profile)."""
    from sage_evals.runner import RunFolder

    records = [{**_record([("look", "look", "ok")]), "episode_id": f"train/{g}/1", "seed": s}
               for g in ("b", "a", "c") for s in (1, 0)]
    orders = []
    for name, order in (("one", records), ("other", records[::-1])):
        folder = RunFolder(tmp_path / name)
        folder.path.mkdir()
        for r in order:
            folder.append(r)
        orders.append([(r["episode_id"], r["seed"]) for r in D.episodes(folder.path)])
    assert orders[0] == orders[1] == sorted(orders[0])
    examples = [D.imitation_examples(D.episodes(tmp_path / name)) for name in ("one", "other")]
    assert examples[0] == examples[1]


def test_rollout_success_averages_a_quarter_of_the_steps_not_one():
    from sage_study.report import rollout_success

    steps = [{"rollout_success": v} for v in (0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 1.0, 0.0)]
    # one step at each end would read 0 -> 0; the first and last quarters (2 steps) read 0.5 -> 0.5
    assert rollout_success(steps, last=False) == 0.5 and rollout_success(steps, last=True) == 0.5
    short = [{"rollout_success": 0.25}, {"rollout_success": 1.0}, {}]
    assert rollout_success(short, last=False) == 0.25 and rollout_success(short, last=True) is None


def test_progress_eta_of_a_phase_counts_only_its_own_steps(monkeypatch):
    import io
    import time

    from rich.console import Console

    from sage_study.stages import _StepBar

    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    bar = _StepBar("teacher SFT", every=0.0)
    bar.plain, bar.console = True, Console(file=io.StringIO(), width=200)
    for step in range(1, 11):  # a 10-step copying warm-up, 1 s a step
        now[0] = float(step)
        bar.update(step, 10, 1.0, phase="teacher copying warm-up")
    for step in (1, 2):  # then SFT steps of 2 s each
        now[0] = 10.0 + 2 * step
        bar.update(step, 100, 0.5)
    lines = bar.console.file.getvalue().splitlines()
    assert lines[9].startswith("teacher copying warm-up: step 10/10")
    # 2 SFT steps in the 4 s since the warm-up ended: 98 steps left at 0.5 step/s (counting the warm-up: 686 s)
    assert lines[-1] == "teacher SFT: step 2/100 loss 0.5000 (4 s, about 196 s left)"


def test_the_report_leaves_out_task_types_of_panels_that_neither_side_won():
    from sage_study.report import render_markdown

    def summary(success):
        return {"n_games": 2, "success": success, "ci95": [0.0, success], "std_over_seeds": 0.0, "std_over": "training seeds",
                "invalid_rate": 0.0, "turns_mean": 5.0}

    def comparison(model, panel, diff):
        t = {"n_games": 1, "diff": diff, "ci95": [diff, diff], "p_sign_flip": 1.0}
        return {"model": model, "panel": panel, "n_games": 2, "diff": diff, "ci95": [diff, diff], "p_sign_flip": 1.0,
                "mcnemar_p_min": 1.0, "by_task_type": {"pick_and_place_simple": t, "look_at_obj_in_light": t}}

    cfg = {"baseline": "opd", "envs": {"train": "alfworld-train", "seen": "alfworld-seen", "max_turns": 12},
           "eval": {"seeds": [0], "temperature": 0.4, "max_new_tokens": 48, "seen_limit": 2, "pool_limit": 2}}
    table = [{"model": m, "panel": p, "summary": summary(s)}
             for m, p, s in [("opd", "seen", 0.0), ("sage_opd", "seen", 0.0), ("opd", "pool", 0.5), ("sage_opd", "pool", 0.0)]]
    r = {"profile": "full", "config": cfg, "panels": ["seen", "pool"], "table": table,
         "comparisons": [comparison("sage_opd", "seen", 0.0), comparison("sage_opd", "pool", -0.5)],
         "judge": {}, "training": {}, "stage_seconds": {}, "figures": [], "version": "0", "commit": None}
    md = render_markdown(r)
    typed = md[md.index("Per task type"):md.index("## The judge")]
    # the seen panel, which neither model won, keeps its headline row but has no per-type rows; the pool keeps both
    assert "| sage_opd | seen | 2 | 0.0 |" in md
    assert "| sage_opd | seen | pick" not in typed and typed.count("| sage_opd | pool |") == 2


def test_a_limited_balance_keeps_both_answers_in_equal_numbers():
    """The teacher's judgment examples are cut to ``judge_share`` x its imitation examples; a cut of a list with all
    Yes turns first trained the judge on Yes alone (it then answered Yes to every turn)."""
    turns = [(f"turn {i}", i % 3 != 0) for i in range(60)]  # 40 Yes, 20 No
    kept = D.balance(turns, seed=0, limit=10)
    assert len(kept) == 10 and sum(y for _, y in kept) == 5
    assert [y for _, y in kept] != sorted((y for _, y in kept), reverse=True)  # shuffled, not all Yes first
    whole = D.balance(turns, seed=0)
    assert len(whole) == 40 and sum(y for _, y in whole) == 20 and len({t for t, _ in whole}) == 40
    assert D.balance(turns, seed=1, limit=10) != kept


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error for --device cuda on a machine without CUDA")
def test_sweep_sft_rejects_bad_input_with_a_one_line_error_and_exit_code(tmp_path):
    root = Path(__file__).resolve().parents[1]

    def sweep(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "bench/sweep_sft.py", *args], cwd=root, capture_output=True, text=True,
                              timeout=300)

    bad_field = sweep("--study-dir", str(tmp_path), "--recipe", '{"lrr": 1}')
    assert bad_field.returncode == 2 and "--recipe takes SftConfig fields" in bad_field.stderr and "lr," in bad_field.stderr
    not_json = sweep("--study-dir", str(tmp_path), "--recipe", "lr=1")
    assert not_json.returncode == 2 and "--recipe takes a JSON object" in not_json.stderr
    for args, message in [(["--profile", "nope"], "Unknown profile 'nope'"),
                          (["--config", str(tmp_path / "none.yaml")], "does not exist"),
                          (["--device", "cuda"], "torch sees no CUDA device")]:
        run = sweep("--study-dir", str(tmp_path), *args)
        assert run.returncode == 1 and message in run.stderr and "Traceback" not in run.stderr, (args, run.stderr)
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "games.json").write_text("{}")
    empty = sweep("--study-dir", str(tmp_path), "--profile", "quick")
    assert empty.returncode == 1 and "lacks the stages before the teacher's (expert, pool" in empty.stderr
    assert "games," not in empty.stderr  # a done stage is not reported missing


def test_a_report_before_the_study_ends_covers_only_finished_runs_and_is_written_again(tmp_path):
    import json

    from sage_study.driver import Study, atomic_json
    from sage_study.report import finished_runs

    cfg = load_study_config(CONFIG, "quick", [f"out_dir={tmp_path}"])
    study = Study(cfg)
    atomic_json(tmp_path / "games.json", {"pool": ["train/a", "train/b"]})
    for stage in ("train/opd/0", "eval/opd/0", "train/sage_opd/0"):  # sage_opd/0 trained, not yet evaluated
        atomic_json(study.record_path(stage), {"stage": stage, "seconds": 1.0})
    for method, seconds in (("opd", 2.0), ("sage_opd", 9.0)):
        run = study.run_dir(method, 0)
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "time/step": seconds, "rollout_success": 0.5,
                                                       "judge_calls": 4}) + "\n")
    assert finished_runs(study) == ({"opd": [0]}, ["sage_opd/0"])

    records = study.run(only=["report"])
    results = json.loads((tmp_path / "results.json").read_text())
    # the unfinished run's steps are in no table: only opd's 2.0 s/step, and no judge figures from sage_opd
    assert set(results["training"]) == {"opd"} and results["training"]["opd"]["seconds_per_step"] == 2.0
    assert results["missing_runs"] == ["sage_opd/0"] and results["judge"]["rollouts"] == {"judged_turns": 0}
    assert "Partial report: 1 training runs are not finished" in (tmp_path / "report.md").read_text()
    # the report ran (the CLI publishes it) but is not recorded, so the study's next run writes it again
    assert records["report"]["incomplete"] and study.done("report") is None

    atomic_json(study.record_path("eval/sage_opd/0"), {"stage": "eval/sage_opd/0", "seconds": 1.0})
    study.run(only=["report"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["training"]) == {"opd", "sage_opd"} and results["missing_runs"] == []
    assert "Partial report" not in (tmp_path / "report.md").read_text() and study.done("report") is not None
