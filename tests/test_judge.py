"""The intervention judge with a tiny real teacher: short circuits, p_yes, and every mode."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from sage_opd.judge import JudgeConfig, JudgeTurn, TurnJudge
from sage_opd.teacher import HFTeacher

WORDS = "go to take put open close the desk drawer fridge mug apple cabinet heat cool".split()


def make_turns(n: int, invalid: dict[int, str] | None = None) -> list[JudgeTurn]:
    invalid = invalid or {}
    return [JudgeTurn(task=f"put a {WORDS[k % 15]} in the {WORDS[(3 * k) % 15]}",
                      history=[{"role": "system", "content": "rules"}, {"role": "user", "content": "you see a desk"},
                               {"role": "assistant", "content": f"<action>go to {WORDS[k % 7]} {k}</action>"},
                               {"role": "user", "content": "nothing happens"}][: 2 + k % 3],
                      response=f"Think: {' '.join(WORDS[k:k + 4])}.\n<action>open {WORDS[(k * 5) % 15]} {k}</action>",
                      feedback=f"You open the {WORDS[(k * 2) % 15]} {k}.", invalid_reason=invalid.get(k))
            for k in range(n)]


@pytest.fixture(scope="module")
def teacher(tiny_models):
    teacher = HFTeacher(tiny_models["teacher"], batch_size=4)
    teacher.calls = 0

    def count(*_):
        teacher.calls += 1
    teacher.model.get_decoder().register_forward_hook(count)
    return teacher


@pytest.fixture(scope="module")
def tok(tiny_models):
    return AutoTokenizer.from_pretrained(tiny_models["teacher"])


def test_every_short_circuit_reason_bypasses_the_teacher(teacher, tok):
    judge = TurnJudge(teacher, tok, JudgeConfig(tau=1.0))  # the judge itself would never intervene
    turns = make_turns(5, {0: "empty", 1: "unparseable", 2: "schema_violation", 4: "empty"})
    before = teacher.calls
    result = judge(turns)
    assert teacher.calls - before == 1  # one forward pass, for the single valid turn
    assert result.stats.judge_calls == 1
    assert result.stats.short_circuit == {"empty": 2, "unparseable": 1, "schema_violation": 1}
    assert result.interventions == [1.0, 1.0, 1.0, 0.0, 1.0]
    assert result.p_yes[3] is not None and all(result.p_yes[k] is None for k in (0, 1, 2, 4))
    before = teacher.calls
    only_invalid = judge(make_turns(3, {0: "empty", 1: "unparseable", 2: "schema_violation"}))
    assert teacher.calls == before and only_invalid.interventions == [1.0] * 3
    with pytest.raises(ValueError, match="accepted: None, empty"):
        judge(make_turns(1, {0: "too_long"}))


def test_p_yes_matches_a_hand_computation(teacher, tok):
    judge = TurnJudge(teacher, tok)
    turns = make_turns(6)
    got = judge.p_yes(turns)
    spellings = {"yes": ("Yes", "yes", " Yes", " yes"), "no": ("No", "no", " No", " no")}
    for ids, words in ((judge.yes_ids, spellings["yes"]), (judge.no_ids, spellings["no"])):
        assert ids and all(any(w.startswith(tok.decode([i])) for w in words) for i in ids)  # spelling prefixes
    for k, turn in enumerate(turns):
        text = judge.render_text(turn)
        assert text.endswith("<|im_start|>assistant\n")  # the answer follows the assistant generation prompt
        for part in (turn.task, turn.response, turn.feedback, turn.history[-1]["content"]):
            assert part in text
        with torch.no_grad():
            logits = teacher.model(torch.tensor([tok(text)["input_ids"]])).logits[0, -1]
        q = logits.softmax(-1)
        yes, no = q[judge.yes_ids].sum(), q[judge.no_ids].sum()
        assert got[k].item() == pytest.approx((yes / (yes + no)).item(), abs=1e-5)
    assert len(set(round(p, 6) for p in got.tolist())) > 1  # prompts differ, so do the judgments


def test_modes_behave_as_defined(teacher, tok):
    turns = make_turns(8, {2: "schema_violation"})
    valid = [k for k in range(8) if k != 2]
    p = TurnJudge(teacher, tok).p_yes([turns[k] for k in valid]).tolist()
    tau = sorted(p)[len(p) // 2]  # a threshold that splits the valid turns
    hard = [float(x >= tau) for x in p]
    assert 0 < sum(hard) < len(hard)

    def run(**cfg):
        out = TurnJudge(teacher, tok, JudgeConfig(tau=tau, **cfg))(turns)
        assert out.interventions[2] == 1.0  # short circuit in every mode
        return out, [out.interventions[k] for k in valid]

    out, i = run(mode="judge", decision="hard")
    assert i == hard and out.stats.judge_rate == pytest.approx(sum(hard) / len(hard))
    assert out.stats.intervention_rate == pytest.approx((sum(hard) + 1) / 8)
    _, i = run(mode="judge", decision="soft")
    assert i == pytest.approx(p, abs=1e-6)
    _, i = run(mode="inverted", decision="hard")
    assert i == [1.0 - d for d in hard]
    _, i = run(mode="inverted", decision="soft")
    assert i == pytest.approx([1.0 - x for x in p], abs=1e-6)
    before = teacher.calls
    out, i = run(mode="all")
    assert i == [1.0] * 7 and teacher.calls == before and out.stats.judge_calls == 0
    _, i = run(mode="judge", decision="hard", floor=0.25)  # skipped turns keep weight 0.25, flagged ones 1
    assert i == [max(0.25, d) for d in hard] and 0.25 in i
    _, i = run(mode="judge", decision="soft", floor=0.25)
    assert i == pytest.approx([max(0.25, x) for x in p], abs=1e-6)


def test_random_mode_draws_at_the_judges_running_rate_not_the_batch_rate(teacher, tok):
    """A batch the judge flags entirely, then batches it flags none of: a running rate (over every judged turn so
    far) keeps drawing interventions in the later batches at 8/16, 8/24, ...; a per-batch rate would draw none."""
    pool = make_turns(16)
    p = TurnJudge(teacher, tok).p_yes(pool).tolist()
    order = sorted(range(16), key=lambda k: p[k])
    tau = (p[order[7]] + p[order[8]]) / 2
    flagged, passed = [pool[k] for k in order[8:]], [pool[k] for k in order[:8]]
    judge = TurnJudge(teacher, tok, JudgeConfig(mode="random", tau=tau, seed=3))
    first = judge(flagged)
    assert first.stats.judge_rate == 1.0 and first.interventions == [1.0] * 8
    draws, expected, variance = [], 0.0, 0.0
    for batch in range(1, 12):
        out = judge(passed)
        rate = 8 / (8 * (batch + 1))  # running: the 8 flagged turns over all turns judged so far
        assert out.stats.judge_rate == pytest.approx(rate) and out.stats.judge_calls == 8
        assert set(out.interventions) <= {0.0, 1.0}
        draws.append(out.interventions)
        expected, variance = expected + 8 * rate, variance + 8 * rate * (1 - rate)
    ones = sum(map(sum, draws))
    # expected ~16.8 ones (std ~3.4); a per-batch rate gives 0 in every one of these batches
    assert abs(ones - expected) < 4 * variance ** 0.5 and ones >= 6
    twin = TurnJudge(teacher, tok, JudgeConfig(mode="random", tau=tau, seed=3))
    twin(flagged)
    assert twin(passed).interventions == draws[0]  # seeded


def test_config_is_validated():
    with pytest.raises(ValueError, match="accepted: judge, all, random, inverted"):
        JudgeConfig(mode="oracle")
    with pytest.raises(ValueError, match="accepted: hard, soft"):
        JudgeConfig(decision="medium")
    with pytest.raises(ValueError, match="tau"):
        JudgeConfig(tau=1.5)
    with pytest.raises(ValueError, match=r"floor must be in \[0, 1\], got -0.1"):
        JudgeConfig(floor=-0.1)


def test_prompt_shows_only_the_recent_history(teacher, tok):
    turn = JudgeTurn("task", [{"role": "system", "content": "RULES"}, {"role": "user", "content": "OLD observation"},
                              {"role": "assistant", "content": "OLD action"}, {"role": "user", "content": "NEW observation"}],
                     "resp", "fb")
    text = TurnJudge(teacher, tok, JudgeConfig(history_messages=2)).render_text(turn)
    assert "NEW observation" in text and "OLD action" in text
    assert "OLD observation" not in text and "RULES" not in text


def test_answer_spellings_with_the_real_smollm2_tokenizer():
    """SmolLM2's tokenizer has four first tokens for each answer; p_yes sums them (not only 'Yes' = 10539)."""
    from sage_models import smollm2_path

    smol = HFTeacher(smollm2_path())
    judge = TurnJudge(smol, smol.tokenizer)
    decode = smol.tokenizer.decode
    assert [decode([i]) for i in judge.yes_ids] == ["Yes", "yes", " Yes", " yes"] and 10539 in judge.yes_ids
    assert [decode([i]) for i in judge.no_ids] == ["No", "no", " No", " no"]
    turns = [JudgeTurn("put a clean mug in the coffee machine", [{"role": "user", "content": "You are in the kitchen."}],
                       "The mug is on countertop 1. <action>go to countertop 1</action>",
                       "You arrive at countertop 1. On it you see a mug 1.")]
    got = judge.p_yes(turns)[0].item()
    with torch.no_grad():
        q = smol.model(torch.tensor([judge.render(turns[0])])).logits[0, -1].float().softmax(-1)
    yes, no = q[judge.yes_ids].sum(), q[judge.no_ids].sum()
    assert got == pytest.approx((yes / (yes + no)).item(), abs=1e-5)
    one_token = (q[10539] / (q[10539] + q[judge.no_ids[0]])).item()
    assert abs(got - one_token) > 1e-3  # the other spellings carry probability the old judge ignored


# ---- the graded judge (Skip / Weak / Strong) ----------------------------------------------------------------------
FEEDBACK_GRADE = {"Nothing happens.": "strong", "You see a drawer 3 and a desk 1.": "weak"}  # else: skip


def graded_turns(n: int, start: int = 0) -> list[JudgeTurn]:
    """Turns whose feedback says which answer a graded teacher trained on them should give."""
    feedbacks = [*FEEDBACK_GRADE, "You open the drawer 2. It is empty."]
    history = [{"role": "user", "content": "you see a desk"}]
    return [JudgeTurn(f"put a {WORDS[k % 15]} in the {WORDS[(7 * k) % 15]}", history,
                      f"<action>open {WORDS[(k * 5) % 15]} {k % 9 + 1}</action>", feedbacks[k % 3])
            for k in range(start, start + n)]


@pytest.fixture(scope="module")
def graded_teacher(tiny_models, tok):
    """The tiny teacher fine-tuned here to answer the graded judgment prompt: strong after 'Nothing happens.', weak
    after a look-around, skip after a successful action (assistant answers in lower case, as the study's teacher)."""
    import copy

    from sage_models import chat_ids
    from sage_opd.judge import GRADED_TEMPLATE, judgment_messages

    teacher = HFTeacher(tiny_models["teacher"], batch_size=8)
    model = copy.deepcopy(teacher.model).train().requires_grad_(True)
    rows = []
    for turn in graded_turns(12):
        messages = judgment_messages(turn, 6, GRADED_TEMPLATE)
        prompt = chat_ids(tok, messages)
        answer = FEEDBACK_GRADE.get(turn.feedback, "skip")
        full = chat_ids(tok, messages + [{"role": "assistant", "content": answer}], add_generation_prompt=False)
        assert full[:len(prompt)] == prompt
        rows.append((full, len(prompt)))
    width = max(len(r) for r, _ in rows)
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r, _ in rows])
    labels = torch.full_like(ids, -100)
    for b, (r, n) in enumerate(rows):
        labels[b, n:len(r)] = ids[b, n:len(r)]
    attention = (torch.arange(width)[None] < torch.tensor([len(r) for r, _ in rows])[:, None]).long()
    torch.manual_seed(0)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(100):
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        optim.zero_grad()
        loss.backward()
        optim.step()
    assert loss.item() < 0.05, f"the graded teacher did not learn its answers (loss {loss.item():.3f})"
    return HFTeacher(model.eval(), tokenizer=tok)


def test_graded_answer_probabilities_match_a_hand_computation(teacher, tok):
    judge = TurnJudge(teacher, tok, JudgeConfig(decision="graded"))
    assert judge.answers == ("Skip", "Weak", "Strong")
    spellings = {a: (a, a.lower(), " " + a, " " + a.lower()) for a in judge.answers}
    ids = judge.answer_ids
    for answer, words in spellings.items():
        assert ids[answer] and all(any(w.startswith(tok.decode([i])) for w in words) for i in ids[answer])
        assert not set(ids[answer]) & {i for a in judge.answers if a != answer for i in ids[a]}  # no shared id
    turns = make_turns(5)
    got = judge.answer_probs(turns)
    for k, turn in enumerate(turns):
        text = judge.render_text(turn)
        assert text.endswith("<|im_start|>assistant\n") and "Answer Skip (not at all), Weak" in text
        with torch.no_grad():
            q = teacher.model(torch.tensor([tok(text)["input_ids"]])).logits[0, -1].softmax(-1)
        mass = torch.stack([q[ids[a]].sum() for a in judge.answers])
        assert got[k].tolist() == pytest.approx((mass / mass.sum()).tolist(), abs=1e-5)
    result = judge(turns)
    assert result.interventions == pytest.approx((got @ torch.tensor([0.0, 0.5, 1.0])).tolist(), abs=1e-6)
    assert result.p_yes == pytest.approx((1 - got[:, 0]).tolist(), abs=1e-6)  # any correction = 1 - p_skip
    assert [len(p) for p in result.p_answers] == [3] * 5


def test_graded_judge_reads_a_teacher_trained_to_grade(graded_teacher, tok):
    turns = graded_turns(9, start=12)  # strong, weak, skip, ... (other tasks and actions than the training turns)
    want = [FEEDBACK_GRADE.get(t.feedback, "skip") for t in turns]
    judge = TurnJudge(graded_teacher, tok, JudgeConfig(decision="graded", weak_weight=0.3))
    probs = judge.answer_probs(turns)
    for p, grade in zip(probs.tolist(), want):
        assert p[("skip", "weak", "strong").index(grade)] > 0.9
    soft = judge(turns).interventions
    for i, grade in zip(soft, want):
        assert i == pytest.approx({"strong": 1.0, "weak": 0.3, "skip": 0.0}[grade], abs=0.08)
    hard = TurnJudge(graded_teacher, tok, JudgeConfig(decision="graded_hard", weak_weight=0.3))(turns).interventions
    assert hard == [{"strong": 1.0, "weak": 0.3, "skip": 0.0}[g] for g in want]
    inverted = TurnJudge(graded_teacher, tok, JudgeConfig(mode="inverted", decision="graded_hard", weak_weight=0.3))
    assert inverted(turns).interventions == pytest.approx([1.0 - i for i in hard])
    # the Yes/No judge on the same teacher and turns knows nothing of the grades: the graded prompt is what it learnt
    yes_no = TurnJudge(graded_teacher, tok, JudgeConfig(decision="soft"))(turns).interventions
    assert max(abs(a - b) for a, b in zip(yes_no, soft)) > 0.3


def test_graded_judge_keeps_short_circuits_and_the_random_ablation(graded_teacher, tok):
    turns = graded_turns(6, start=12)
    turns[1].invalid_reason, turns[3].invalid_reason = "unparseable", "empty"
    judge = TurnJudge(graded_teacher, tok, JudgeConfig(mode="random", decision="graded_hard", seed=5))
    out = judge(turns)
    assert out.interventions[1] == out.interventions[3] == 1.0 and out.p_answers[1] is None
    assert out.stats.judge_calls == 4 and out.stats.short_circuit == {"unparseable": 1, "empty": 1}
    # judged: strong (turn 0), skip (2), weak (4: 0.5), skip (5) -> running rate 1.5 / 4
    assert out.stats.judge_rate == pytest.approx(1.5 / 4)
    draws = [i for _ in range(40) for i in judge([turns[k] for k in (0, 2, 4, 5)]).interventions]
    assert set(draws) <= {0.0, 1.0} and 0.2 < sum(draws) / len(draws) < 0.55  # Bernoulli(0.375), not the grades


def test_graded_config_is_validated():
    with pytest.raises(ValueError, match="accepted: hard, soft, graded, graded_hard"):
        JudgeConfig(decision="graded_soft")
    with pytest.raises(ValueError, match="weak_weight"):
        JudgeConfig(decision="graded", weak_weight=1.5)
