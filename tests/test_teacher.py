"""Teacher scoring on the student's own token ids: in-process model and a real HTTP server (vLLM format)."""

from __future__ import annotations

import pytest
import torch
from logprob_server import serve_logprobs
from transformers import AutoModelForCausalLM, AutoTokenizer

from sage_models.tiny import build_tokenizer
from sage_opd.losses import SparseTeacher, opd_loss
from sage_opd.teacher import (HFTeacher, RemoteTeacher, TokenizerMismatchError, TurnIds, check_same_tokenizer,
                              lm_hidden_states, make_batch)


@pytest.fixture(scope="module")
def setup(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models["student"])
    chat = [{"role": "user", "content": "your task is to put a mug in the fridge"}]
    prompt = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)["input_ids"]
    g = torch.Generator().manual_seed(0)
    turns = [TurnIds(prompt, torch.randint(3, len(tok), (7,), generator=g).tolist()),  # ids no re-tokenisation gives
             TurnIds(prompt[:5], torch.randint(3, len(tok), (12,), generator=g).tolist()),
             TurnIds(prompt + [5, 6], [9])]
    return tok, turns, make_batch(turns, tok.pad_token_id)


def direct_logprobs(model, turn):
    ids = turn.prompt_ids + turn.token_ids
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    return torch.stack([logprobs[j - 1, ids[j]] for j in range(len(turn.prompt_ids), len(ids))])


def test_make_batch_marks_the_positions_predicting_response_tokens(setup):
    tok, turns, batch = setup
    for row, turn in enumerate(turns):
        assert batch.target_ids[row][batch.response_mask[row]].tolist() == turn.token_ids
        assert int(batch.attention_mask[row].sum()) == len(turn.prompt_ids) + len(turn.token_ids)
    assert batch.num_response_tokens == sum(len(t.token_ids) for t in turns)
    with pytest.raises(ValueError, match="prompt_ids"):
        make_batch([TurnIds([], [1, 2])], tok.pad_token_id)


def test_hf_teacher_logprobs_match_a_direct_forward(setup, tiny_models):
    _, turns, batch = setup
    teacher = HFTeacher(tiny_models["teacher"], batch_size=2)  # two micro-batches with different lengths
    got = teacher.token_logprobs(batch, chunk_size=5)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"]).eval()
    for row, turn in enumerate(turns):
        torch.testing.assert_close(got[row][batch.response_mask[row]], direct_logprobs(model, turn), rtol=1e-4, atol=1e-5)
    assert (got[~batch.response_mask] == 0).all()


def test_lm_hidden_states_reproduce_the_logits(setup, tiny_models):
    _, _, batch = setup
    model = AutoModelForCausalLM.from_pretrained(tiny_models["student"]).eval()
    with torch.no_grad():
        hidden, weight = lm_hidden_states(model, batch)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    m = batch.attention_mask.bool()
    torch.testing.assert_close((hidden @ weight.T)[m], logits[m], rtol=1e-4, atol=1e-5)


def test_tokenizer_check_refuses_a_different_tokenizer(tiny_models):
    student = AutoTokenizer.from_pretrained(tiny_models["student"])
    check_same_tokenizer(student, AutoTokenizer.from_pretrained(tiny_models["teacher"]))  # shared: accepted
    with pytest.raises(TokenizerMismatchError, match="share a tokenizer"):
        check_same_tokenizer(student, build_tokenizer(vocab_size=400))
    other = AutoTokenizer.from_pretrained(tiny_models["student"])
    other.pad_token = "<|im_start|>"
    with pytest.raises(TokenizerMismatchError, match="pad_token"):
        check_same_tokenizer(student, other)


def test_remote_teacher_over_http_matches_the_model(setup, tiny_models):
    tok, turns, batch = setup
    model = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"]).eval()
    with serve_logprobs(str(tiny_models["teacher"])) as url:
        remote = RemoteTeacher(url, "teacher", top_k=8, concurrency=2)
        try:
            remote.check_tokenizer(tok)
            with pytest.raises(TokenizerMismatchError):
                remote.check_tokenizer(build_tokenizer(vocab_size=400))
            scored = remote.score(batch)
            cand = remote.next_token_logprobs([turns[0].prompt_ids, turns[1].prompt_ids], [7, 11])
            wrong = RemoteTeacher(url, "no-such-model")
            with pytest.raises(Exception, match="404"):
                wrong.score(batch)
            wrong.close()
        finally:
            remote.close()
    assert isinstance(scored, SparseTeacher) and scored.ids.shape == (*batch.input_ids.shape, 8)
    hidden, weight = lm_hidden_states(model, batch)
    with torch.no_grad():
        full = torch.log_softmax(hidden @ weight.T, -1)
    m = batch.response_mask
    for row, turn in enumerate(turns):
        torch.testing.assert_close(scored.token_logprobs[row][m[row]], direct_logprobs(model, turn), rtol=1e-4, atol=1e-5)
    top = full[m].topk(8, -1)
    torch.testing.assert_close(scored.logprobs[m], top.values, rtol=1e-4, atol=1e-5)
    assert (scored.ids[m] == top.indices).all()
    torch.testing.assert_close(cand, full.new_tensor([[full[0, len(turns[0].prompt_ids) - 1, c] for c in (7, 11)],
                                                      [full[1, 4, c] for c in (7, 11)]]), rtol=1e-4, atol=1e-5)
    # the scored output plugs into the loss directly
    student = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
    s_hidden, s_weight = lm_hidden_states(student, batch)
    out = opd_loss(s_hidden, s_weight, scored, mask=m, target_ids=batch.target_ids)
    out.loss.backward()
    assert out.num_tokens == batch.num_response_tokens and out.loss.item() > 0
    assert student.get_output_embeddings().weight.grad.abs().sum() > 0


def test_packed_turns_score_exactly_like_separate_turns(tiny_models):
    """Turns of one episode whose contexts extend each other share one row, with the same teacher log-probs
    and losses as one row per turn, and far fewer tokens; a turn that breaks the chain starts a new row."""
    from sage_opd.objective import micro_batch_loss
    from sage_opd.teacher import pack_turns

    g = torch.Generator().manual_seed(1)
    rand = lambda n: torch.randint(3, 300, (n,), generator=g).tolist()  # noqa: E731
    prompt, turns = rand(20), []
    for _ in range(4):  # context grows by the last response plus some feedback tokens
        turns.append(TurnIds(list(prompt), rand(6)))
        prompt = prompt + turns[-1].token_ids + rand(5)
    turns.append(TurnIds(rand(15), rand(4)))  # another episode
    assert pack_turns(turns) == [[0, 1, 2, 3], [4]]
    packed, separate = make_batch(turns, 0), make_batch(turns, 0, pack=False)
    assert packed.input_ids.shape[0] == 2 and packed.attention_mask.sum() < separate.attention_mask.sum() / 2
    teacher = HFTeacher(tiny_models["teacher"])
    torch.testing.assert_close(teacher.token_logprobs(packed)[packed.response_mask],
                               teacher.token_logprobs(separate)[separate.response_mask], rtol=1e-4, atol=1e-5)
    student = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
    interventions, imitated = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0]), torch.tensor([False, False, True, False, False])
    sums = []
    for batch in (packed, separate):
        hidden, weight = lm_hidden_states(student, batch)
        res = micro_batch_loss(hidden, weight, teacher.score(batch), batch.turn_index, batch.target_ids,
                               interventions, imitated)
        sums.append((float(res.weighted_loss), res.weight_sum, res.opd_tokens, res.ce_tokens))
    assert sums[0][2:] == sums[1][2:] == (16, 6)  # turn 1 skipped (i=0), turn 2 imitated (6 tokens)
    assert sums[0][0] == pytest.approx(sums[1][0], rel=1e-4) and sums[0][1] == pytest.approx(sums[1][1], rel=1e-4)
