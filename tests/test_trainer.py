"""The SAGE-OPD trainer on tiny real models and the real ALFWorld engine.

Most tests train on a fixed rollout batch collected once (student turns, which the random tiny
student never gets valid, plus expert turns relabelled as student turns so the judge has valid
turns to read), so they do not depend on sampling; the resume and CLI tests run real rollouts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sage_models.policy import Decoding
from sage_opd.algorithm import algorithm_for, guided_beta
from sage_opd.build import ModelTooLargeError, check_fits
from sage_opd.config import ConfigError, load_config
from sage_opd.rollout import RolloutBatch, RolloutCollector
from sage_gym.durable import FolderInUseError
from sage_gym.errors import SageError
from sage_opd.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_sage_opd_alfworld.yaml"
SPEC_KEYS = {"loss", "kl", "intervention_rate", "short_circuit/empty", "short_circuit/unparseable",
             "short_circuit/schema_violation", "judge_calls", "confidence_mean", "response_tokens",
             "rollout_success", "time/rollout", "time/judge", "time/teacher", "time/loss", "time/optim"}


def overrides(tiny_models, out_dir, *extra: str) -> list[str]:
    return [f"student.path={tiny_models['student']}", f"teacher.path={tiny_models['teacher']}",
            f"log.out_dir={out_dir}", "log.tensorboard=false", *extra]


@pytest.fixture(scope="module")
def collector():
    col = RolloutCollector("alfworld-train", 2, max_turns=2)
    yield col
    col.close()


# ---- configs and clear errors --------------------------------------------------------------------
def test_config_overrides_and_errors(tmp_path):
    cfg = load_config(TINY, ["optim.lr=1e-5", "loss.judge_mode=soft", "student.lora.enabled=true",
                             "eval.seeds=[0, 1, 2]"])
    assert (cfg.optim.lr, cfg.loss.judge_mode, cfg.student.lora.enabled, cfg.eval.seeds) == (1e-5, "soft", True,
                                                                                              [0, 1, 2])
    with pytest.raises(ConfigError, match=r"optim\.lrr.*Did you mean 'lr'.*Valid keys under 'optim'"):
        load_config(TINY, ["optim.lrr=1e-5"])
    with pytest.raises(ConfigError, match="optim.steps must be an integer"):
        load_config(TINY, ["optim.steps=ten"])
    with pytest.raises(ConfigError, match="loss.intervention must be one of judge, all, random, inverted"):
        load_config(TINY, ["loss.intervention=oracle"])
    with pytest.raises(ConfigError, match="optim.lr_schedule must be one of constant, cosine; got 'linear'"):
        load_config(TINY, ["optim.lr_schedule=linear"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("algorithm: opd\nrollout:\n  episodes: 4\n")
    with pytest.raises(ConfigError, match=r"rollout\.episodes'.*episodes_per_step"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad.write_text("algorithm: opd\nrollout: [episodes: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml' is not valid YAML at line 3, column 1"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"optim.lr=\[1': the value is not valid YAML"):
        load_config(TINY, ["optim.lr=[1"])
    with pytest.raises(ConfigError, match="normalization=standard .* is what algorithm=opd uses; sage_opd accepts"):
        load_config(TINY, ["loss.normalization=standard"])
    with pytest.raises(ConfigError, match=r"loss.judge_floor must be in \[0, 1\], got 2"):
        load_config(TINY, ["loss.judge_floor=2"])
    with pytest.raises(ConfigError, match="log.kl_by_turn needs an in-process teacher .*'sft' with no teacher"):
        load_config(TINY, ["algorithm=sft", "log.kl_by_turn=true"])
    opd = load_config(TINY, ["algorithm=opd", "loss.normalization=standard"])
    assert algorithm_for(opd.algorithm).loss_options(opd.loss).normalization == "standard"


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_shipped_config_loads(name):
    cfg = load_config(ROOT / "configs" / name)
    assert name.startswith(cfg.algorithm) or name.startswith(f"tiny_{cfg.algorithm}")


def test_env_without_train_split_is_refused(tiny_models, tmp_path):
    cfg = load_config(TINY, overrides(tiny_models, tmp_path, "rollout.env_id=alfworld-unseen"))
    with pytest.raises(Exception, match="alfworld-unseen.*no train split.*alfworld-train"):
        Trainer(cfg)


def test_tokenizer_mismatch_is_refused(tiny_models, tmp_path):
    from sage_models.tiny import build_tiny_models
    from sage_opd.teacher import TokenizerMismatchError

    other = build_tiny_models(tmp_path / "other", vocab_size=384)
    cfg = load_config(TINY, overrides(tiny_models, tmp_path, f"teacher.path={other['teacher']}"))
    with pytest.raises(TokenizerMismatchError, match="share a tokenizer"):
        Trainer(cfg)


def test_model_that_does_not_fit_is_refused():
    gib = 1 << 30
    with pytest.raises(ModelTooLargeError, match=r"8\.00B.*GiB.*lora"):
        check_fits(8_000_000_000, 32_000_000_000, 8_000_000_000, torch.bfloat16, torch.device("cpu"),
                   available=64 * gib)
    check_fits(1_000_000, 4_000_000, 1_000_000, torch.float32, torch.device("cpu"), available=gib)


# ---- the per-micro-batch objective ----------------------------------------------------------------
def test_micro_batch_loss_is_the_spec_objective():
    """sum(w l) / sum(w) of ``micro_batch_loss`` equals the unchunked reference; imitated rows add their CE."""
    import torch.nn.functional as F

    from sage_opd.losses import DenseTeacher, reference_opd_loss
    from sage_opd.objective import micro_batch_loss

    torch.manual_seed(0)
    v, h, ht = 40, 8, 12
    s_hidden = torch.randn(3, 7, h, requires_grad=True)
    s_weight, t_hidden, t_weight = torch.randn(v, h), torch.randn(3, 7, ht), torch.randn(v, ht)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, 2:6], mask[1, 1:4], mask[2, 3:7] = True, True, True
    targets = torch.randint(0, v, (3, 7))
    turn_i = torch.tensor([1.0, 0.4, 0.0])  # the third turn was skipped by the judge
    res = micro_batch_loss(s_hidden, s_weight, DenseTeacher(t_hidden, t_weight), mask, targets, turn_i,
                           torch.zeros(3, dtype=torch.bool), chunk_tokens=3)
    logits_s, logits_t = (s_hidden @ s_weight.T)[mask], (t_hidden @ t_weight.T)[mask]
    i_tok = turn_i[:, None].expand(3, 7)[mask]
    ref = reference_opd_loss(logits_s, logits_t, intervention=i_tok, confidence="entropy", normalization="preserve")
    assert float(res.weighted_loss.detach()) / res.weight_sum == pytest.approx(float(ref.loss.detach()), rel=1e-5)
    assert res.tokens == 11 and res.opd_tokens == 7  # the skipped turn's 4 tokens count in N, not in the loss
    (grad,) = torch.autograd.grad(res.weighted_loss / res.weight_sum, s_hidden)
    (grad_ref,) = torch.autograd.grad(reference_opd_loss((s_hidden @ s_weight.T)[mask], logits_t.detach(),
                                                         intervention=i_tok).loss, s_hidden)
    assert torch.allclose(grad, grad_ref, atol=1e-6)
    mixed = micro_batch_loss(s_hidden, s_weight, DenseTeacher(t_hidden, t_weight), mask, targets, turn_i,
                             torch.tensor([True, False, False]), chunk_tokens=3)
    ce = F.cross_entropy((s_hidden[0] @ s_weight.T)[mask[0]], targets[0][mask[0]], reduction="sum")
    row1 = micro_batch_loss(s_hidden[1:2], s_weight, DenseTeacher(t_hidden[1:2], t_weight), mask[1:2], targets[1:2],
                            turn_i[1:2], torch.zeros(1, dtype=torch.bool), chunk_tokens=3)
    assert float(mixed.weighted_loss.detach()) == pytest.approx(float((ce + row1.weighted_loss).detach()), rel=1e-5)
    assert mixed.weight_sum == pytest.approx(4 + row1.weight_sum) and mixed.ce_tokens == 4


def test_turn_reverse_kl_splits_a_packed_batch_by_turn():
    """Per-turn KL sums and token counts of a packed batch (two turns on one row) match each turn's own tokens, and
    ``reverse_kl_sum`` is the sum over the kept, distilled turns."""
    from sage_opd.losses import token_losses
    from sage_opd.objective import reverse_kl_sum, turn_reverse_kl

    torch.manual_seed(1)
    v, h = 30, 6
    s_hidden, s_weight, t_hidden, t_weight = torch.randn(2, 8, h), torch.randn(v, h), torch.randn(2, 8, h), torch.randn(v, h)
    turn_index = torch.full((2, 8), -1)
    turn_index[0, 1:3], turn_index[0, 5:8], turn_index[1, 2:6] = 0, 1, 2  # turns 0 and 1 packed on row 0
    kl, tokens = turn_reverse_kl(s_hidden, s_weight, t_hidden, t_weight, turn_index, 3, chunk=3)
    token_kl = token_losses(s_hidden @ s_weight.T, t_hidden @ t_weight.T)  # [2, 8]
    expected = [float(token_kl[turn_index == k].sum()) for k in range(3)]
    assert kl.tolist() == pytest.approx(expected, rel=1e-5) and tokens.tolist() == [2, 3, 4]
    assert len(set(round(x, 4) for x in expected)) == 3  # the turns differ, so a mixed-up split would show
    total = reverse_kl_sum(s_hidden, s_weight, t_hidden, t_weight, turn_index, torch.tensor([False, True, False]),
                           torch.tensor([1.0, 1.0, 0.0]), chunk=3)
    assert total == pytest.approx(expected[0], rel=1e-5)  # turn 1 is imitated, turn 2 skipped


# ---- rollouts ------------------------------------------------------------------------------------
def test_rollouts_are_seeded_and_guided_turns_come_from_the_teacher(collector, tiny_models):
    from sage_models import HFPolicy

    student, teacher = HFPolicy(tiny_models["student"]), HFPolicy(tiny_models["teacher"])
    ids = collector.episode_ids[:2]
    dec = Decoding(temperature=1.0, max_new_tokens=8)
    a = collector.collect(ids, student, dec, seed=5)
    b = collector.collect(ids, student, dec, seed=5)
    c = collector.collect(ids, student, dec, seed=6)
    assert [t.token_ids for t in a.turns] == [t.token_ids for t in b.turns]
    assert [t.token_ids for t in a.turns] != [t.token_ids for t in c.turns]
    turn = a.turns[0]
    assert turn.prompt_ids and turn.messages[-1]["role"] == "user" and turn.task in turn.messages[-1]["content"]
    assert turn.invalid_reason == "unparseable" and "Invalid response" in turn.feedback
    guided = collector.collect(ids, student, dec, seed=5, teacher=teacher, teacher_prob=1.0)
    assert {t.source for t in guided.turns} == {"teacher"}
    assert [t.token_ids for t in guided.turns] != [t.token_ids for t in a.turns]
    assert guided_beta(0, 100) == 1.0 and guided_beta(40, 100) == pytest.approx(0.5) and guided_beta(80, 100) == 0.0


def test_rollouts_stop_at_the_students_context_window(collector, tiny_models):
    """A window of the first prompt plus 6 tokens: turn 1 is cut there (finish reason context) and the
    episode ends before turn 2, whose prompt would not fit (collector max_turns is 2)."""
    from sage_models import HFPolicy

    ids = collector.episode_ids[:1]
    first = collector.collect(ids, HFPolicy(tiny_models["student"]), Decoding(max_new_tokens=1), seed=2).turns[0]
    narrow = HFPolicy(tiny_models["student"], max_context=len(first.prompt_ids) + 6)
    (turn,) = collector.collect(ids, narrow, Decoding(max_new_tokens=32), seed=2).turns
    assert turn.finish_reason == "context" and len(turn.token_ids) == 6 and turn.prompt_ids == first.prompt_ids


def test_env_worker_processes_collect_the_same_episodes(collector, tiny_models):
    from sage_models import HFPolicy

    student = HFPolicy(tiny_models["student"])
    ids = collector.episode_ids[:2]
    dec = Decoding(temperature=1.0, max_new_tokens=8)
    workers = RolloutCollector("alfworld-train", 2, max_turns=2, processes=True)
    try:
        procs = [w.process for w in workers.pool.workers]
        assert len({p.pid for p in procs}) == 2 and all(p.is_alive() for p in procs)
        remote = workers.collect(ids, student, dec, seed=3)
        expert = workers.collect(ids, None, dec, seed=3, expert=True)
    finally:
        workers.close()
    local = collector.collect(ids, student, dec, seed=3)
    assert [(t.token_ids, t.feedback, t.invalid_reason, t.messages) for t in remote.turns] == \
        [(t.token_ids, t.feedback, t.invalid_reason, t.messages) for t in local.turns]
    assert all(t.action_valid for t in expert.turns)
    assert not any(p.is_alive() for p in procs)


# ---- training ------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["opd", "sage_opd"])
def test_training_lowers_kl_on_heldout_student_turns(algorithm, batches, tiny_models, tmp_path):
    cfg = load_config(TINY, overrides(tiny_models, tmp_path, f"algorithm={algorithm}",
                                      f"rollout.from_file={batches['train']}", "optim.steps=4", "optim.lr=4e-3",
                                      "loss.judge_mode=soft", "log.save_every=0"))
    trainer = Trainer(cfg)
    heldout = RolloutBatch.load(batches["heldout"]).turns
    before = trainer.token_kl(heldout)
    history = trainer.train()
    after = trainer.token_kl(heldout)
    assert after < 0.85 * before, (before, after)
    assert history[-1]["loss"] < history[0]["loss"]
    # the invalid turns (the random student's 2) are counted by reason whatever the algorithm
    assert history[0]["short_circuit/unparseable"] == 2 and history[0]["short_circuit/empty"] == 0
    if algorithm == "sage_opd":  # the judge read the valid turns; the invalid ones short-circuited
        assert history[0]["judge_calls"] == 2
        assert 0.0 < history[0]["intervention_rate"] < 1.0 and history[0]["confidence_mean"] < 1.0
    else:
        assert history[0]["judge_calls"] == 0 and history[0]["intervention_rate"] == 1.0
        assert history[0]["loss"] == pytest.approx(history[0]["kl"], rel=1e-5)  # standard OPD: sum(l) / N


def test_no_selected_turn_means_no_update(batches, tiny_models, tmp_path):
    """preserve normalisation with sum(w) = 0 (the judge flags nothing, no invalid turn): the step is skipped and logged."""
    valid = RolloutBatch([RolloutBatch.load(batches["train"]).episodes[1]])  # the expert episode: valid turns only
    valid.save(tmp_path / "valid.json")
    cfg = load_config(TINY, overrides(tiny_models, tmp_path / "run", "loss.judge_mode=hard", "loss.tau=1.0",
                                      f"rollout.from_file={tmp_path / 'valid.json'}", "optim.steps=1"))
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    (m,) = trainer.train()
    assert m["no_update"] == 1 and m["judge_calls"] == 2 and m["intervention_rate"] == 0.0 and m["loss"] == 0.0
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_kl_by_turn_logs_the_kl_of_kept_skipped_and_expert_matching_turns(batches, tiny_models, tmp_path):
    """``log.kl_by_turn``: with the judge skipping every valid turn (hard, tau = 1) the step logs the KL of the
    invalid turns it keeps and of the valid ones it skips, each equal to ``token_kl`` on that group before the
    update; the expert-matching split follows the turns' expert labels."""
    batch = RolloutBatch.load(batches["train"])
    invalid, valid = batch.episodes[0].turns, batch.episodes[1].turns
    for t in valid:  # the expert's own moves: they match its label
        t.expert_action = t.action
    for t in invalid:
        t.expert_action = "look"
    batch.save(tmp_path / "labelled.json")
    cfg = load_config(TINY, overrides(tiny_models, tmp_path / "run", "loss.judge_mode=hard", "loss.tau=1.0",
                                      f"rollout.from_file={tmp_path / 'labelled.json'}", "optim.steps=1",
                                      "optim.lr=1e-2", "log.kl_by_turn=true", "log.save_every=0"))
    trainer = Trainer(cfg)
    trainer.scorer.tokenize(valid)  # the expert's turns get the student's ids, as in the step
    kept, skipped = trainer.token_kl(invalid), trainer.token_kl(valid)
    (m,) = trainer.train()
    assert m["intervention_rate"] == pytest.approx(len(invalid) / (len(invalid) + len(valid)))
    assert m["kl/kept"] == pytest.approx(kept, rel=1e-4) and m["kl/skipped"] == pytest.approx(skipped, rel=1e-4)
    assert abs(kept - skipped) > 1e-3 * kept  # the groups are told apart
    assert m["kl/expert_same"] == pytest.approx(skipped, rel=1e-4)
    assert m["kl/expert_other"] == pytest.approx(kept, rel=1e-4)
    assert m["kl"] == pytest.approx(kept, rel=1e-4)  # the loss's own kl is on the kept turns
    opd = Trainer(load_config(TINY, overrides(tiny_models, tmp_path / "opd", "algorithm=opd",
                                              f"rollout.from_file={batches['train']}", "optim.steps=1",
                                              "log.kl_by_turn=true", "log.save_every=0")))
    (m,) = opd.train()
    assert m["kl/skipped"] is None and m["kl/expert_same"] is None and m["kl/kept"] == pytest.approx(m["kl"], rel=1e-4)


def test_sft_on_expert_turns_lowers_cross_entropy(batches, tiny_models, tmp_path):
    expert = RolloutBatch.load(batches["train"])
    for turn in expert.turns:
        turn.source, turn.prompt_ids, turn.token_ids = "expert", [], []
    expert.save(tmp_path / "expert.json")
    cfg = load_config(TINY, overrides(tiny_models, tmp_path / "run", "algorithm=sft", "teacher.path=null",
                                      f"rollout.from_file={tmp_path / 'expert.json'}", "optim.steps=3",
                                      "optim.lr=1e-2", "log.save_every=0"))
    history = Trainer(cfg).train()
    assert history[0]["ce"] is not None and history[-1]["ce"] < history[0]["ce"]
    assert history[0]["kl"] is None and history[0]["judge_calls"] == 0


def test_guided_opd_trains_teacher_turns_by_cross_entropy_and_student_turns_by_opd(batches, tiny_models, tmp_path):
    mixed = RolloutBatch.load(batches["train"])
    for turn in mixed.episodes[1].turns:  # the expert episode plays the teacher's turns
        turn.source, turn.prompt_ids, turn.token_ids = "teacher", [], []
    mixed.save(tmp_path / "mixed.json")
    cfg = load_config(TINY, overrides(tiny_models, tmp_path / "run", "algorithm=guided_opd", "optim.steps=1",
                                      f"rollout.from_file={tmp_path / 'mixed.json'}", "log.save_every=0"))
    (m,) = Trainer(cfg).train()
    assert m["teacher_turns"] == 2 and m["beta"] == 1.0 and m["judge_calls"] == 0
    assert m["ce"] > 1.0 and 0.0 < m["kl"] < 1.0  # random student: CE ~ log|V|, KL to a random teacher small
    assert min(m["kl"], m["ce"]) < m["loss"] < max(m["kl"], m["ce"])  # one loss over both kinds of tokens


def test_lora_student_trains_adapters_only_and_resumes(batches, tiny_models, tmp_path):
    cfg = load_config(TINY, overrides(tiny_models, tmp_path, "algorithm=opd", "student.lora.enabled=true",
                                      "student.lora.r=4", f"rollout.from_file={batches['train']}", "optim.steps=2",
                                      "optim.lr=1e-2"))
    trainer = Trainer(cfg)
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with pytest.raises(FolderInUseError, match=f"{tmp_path} is in use by another sage train"):
        Trainer(cfg)  # a second trainer writing the same out_dir
    history = trainer.train()
    assert history[1]["loss"] < history[0]["loss"]
    assert (tmp_path / "checkpoints" / "step-000002" / "model" / "adapter_model.safetensors").is_file()
    resumed = Trainer(cfg, resume=True)
    assert resumed.step == 2 and resumed.train() == []
    assert resumed.token_kl(RolloutBatch.load(batches["train"]).turns) == pytest.approx(
        trainer.token_kl(RolloutBatch.load(batches["train"]).turns), rel=1e-6)
    state_file = tmp_path / "checkpoints" / "step-000002" / "state.pt"
    state = torch.load(state_file, weights_only=True)  # tensors and plain values only
    state["rng"]["numpy"] = np.random.get_state()  # a pickled numpy array: what state.pt held before
    torch.save(state, state_file)
    with pytest.raises(SageError, match="holds pickled objects other than tensors and plain values"):
        Trainer(cfg, resume=True)


def test_sage_opd_with_a_teacher_server_over_http(batches, tiny_models, tmp_path):
    """The teacher behind a real 127.0.0.1 server in vLLM's prompt_logprobs format: top-k losses and the judge."""
    from logprob_server import serve_logprobs

    with serve_logprobs(str(tiny_models["teacher"])) as url:
        cfg = load_config(TINY, overrides(tiny_models, tmp_path, "teacher.path=null", f"teacher.server_url={url}",
                                          "teacher.server_model=teacher", "teacher.top_k=8", "optim.steps=3",
                                          "optim.lr=4e-3", f"rollout.from_file={batches['train']}",
                                          "loss.judge_mode=soft", "log.save_every=0"))
        history = Trainer(cfg).train()
    assert history[0]["judge_calls"] == 2 and 0.0 < history[0]["intervention_rate"] < 1.0
    assert history[-1]["loss"] < history[0]["loss"]


def load_file_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file_weights(checkpoint / "model")


def test_resume_reproduces_the_uninterrupted_run(tiny_models, tmp_path):
    """Real rollouts: an interrupted run resumed from its checkpoint ends with the same weights and losses."""
    extra = ("rollout.max_turns=1", "rollout.max_new_tokens=12", "optim.steps=2", "log.save_every=1")
    full = Trainer(load_config(TINY, overrides(tiny_models, tmp_path / "full", *extra))).train()
    cfg = load_config(TINY, overrides(tiny_models, tmp_path / "cut", *extra))
    first = Trainer(cfg).train(until=1)
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:
        f.write('{"step": 1, "loss": 0.')  # killed while logging step 1
    second = Trainer(cfg, resume=True).train()
    assert len(first) == 1 and len(second) == 1 and second[0]["step"] == 2
    assert [m["loss"] for m in first + second] == [m["loss"] for m in full]
    a, b = _weights(tmp_path / "full/checkpoints/step-000002"), _weights(tmp_path / "cut/checkpoints/step-000002")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"],
                           _weights(tmp_path / "cut/checkpoints/step-000001")["model.layers.0.mlp.up_proj.weight"])
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == [1, 2]  # step N: after N steps, as in checkpoints/step-N


def test_two_gloo_ranks_match_one_process(batches, tiny_models, tmp_path):
    """torchrun, 2 CPU processes (gloo), same global batch: DDP and FSDP give the losses and weights of 1 process."""
    args = overrides(tiny_models, "OUT", "algorithm=sage_opd", f"rollout.from_file={batches['train']}",
                     "optim.steps=2", "optim.lr=2e-2", "optim.grad_accum=1", "loss.judge_mode=soft",
                     "log.save_every=0")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = [a.replace("OUT", str(tmp_path / "one")) for a in args]
    subprocess.run([sys.executable, "-m", "sage_cli", "train", "--config", str(TINY), *single], check=True, env=env,
                   cwd=ROOT, capture_output=True)
    one = [json.loads(ln) for ln in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert one[1]["loss"] != pytest.approx(one[0]["loss"], rel=1e-3)  # the weights moved between steps
    start = load_file_weights(Path(tiny_models["student"]))
    a = _weights(tmp_path / "one/checkpoints/step-000002")
    for port, strategy in ((29533, "ddp"), (29534, "fsdp")):
        # grad_accum=2 on 2 ranks: one rank runs an empty micro-batch (FSDP must still join the collectives)
        double = [x.replace("OUT", str(tmp_path / strategy)) for x in args] + [f"dist.strategy={strategy}",
                                                                              "optim.grad_accum=2"]
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                              f"--master_port={port}", "-m", "sage_cli", "train", "--config", str(TINY), *double],
                             env=env, cwd=ROOT, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-3000:]
        two = [json.loads(ln) for ln in (tmp_path / strategy / "metrics.jsonl").read_text().splitlines()]
        assert two[0]["loss"] == pytest.approx(one[0]["loss"], rel=1e-6), strategy  # same weights, same batch
        assert two[1]["loss"] == pytest.approx(one[1]["loss"], rel=1e-4), strategy  # after an Adam step
        assert [m["response_tokens"] for m in two] == [m["response_tokens"] for m in one]
        assert two[0]["grad_norm"] == pytest.approx(one[0]["grad_norm"], rel=1e-4), strategy  # same weights
        # after an Adam step the per-rank float noise is amplified (see below): 2.2e-4 seen with the batches
        # whose invalid turns carry the reworded feedback
        assert two[1]["grad_norm"] == pytest.approx(one[1]["grad_norm"], rel=1e-3), strategy
        # Adam divides by sqrt(v): float noise (padding differs per rank) is amplified but stays far below the update
        b = _weights(tmp_path / strategy / "checkpoints/step-000002")
        for k in a:
            assert (a[k] - b[k]).abs().max() < 0.05 * (a[k] - start[k]).abs().max(), (strategy, k)


def test_sage_train_cli_writes_metrics_and_a_checkpoint(tiny_models, tmp_path):
    out = tmp_path / "cli"
    args = [sys.executable, "-m", "sage_cli", "train", "--config", str(TINY),
            *overrides(tiny_models, out, "log.tensorboard=true", "rollout.max_turns=2", "rollout.max_new_tokens=12",
                       "eval.every=2", "eval.limit=1", "eval.workers=1", "eval.max_turns=1", "eval.max_new_tokens=8",
                       "eval.unseen=null")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(SPEC_KEYS <= set(r) for r in rows), SPEC_KEYS - set(rows[0])
    assert rows[0]["episodes"] == 2 and rows[0]["response_tokens"] > 0
    # step 2 is the same step in metrics.jsonl, checkpoints/ and evals/
    assert "eval/seen/success" not in rows[0] and rows[1]["eval/seen/success"] == 0.0
    assert (out / "evals" / "step-000002" / "seen" / "summary.json").is_file()
    checkpoint = out / "checkpoints" / "step-000002"
    assert (checkpoint / "model" / "model.safetensors").is_file() and (checkpoint / "state.pt").is_file()
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    # piped output: one plain line per step (no progress bar redrawn into a log)
    assert [ln.split(" loss ")[0] for ln in run.stdout.splitlines() if ln.startswith("step ")] == ["step 1/2", "step 2/2"]
    assert "seen 0.000" in run.stdout.splitlines()[-1]  # the evaluation after step 2, on its line
    # the same command again would overwrite the run: refused, with both ways out named
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert "already holds a training run (checkpoints up to step-000002)" in again.stderr
    assert "--resume" in again.stderr and "log.out_dir=" in again.stderr
    assert [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    resumed = subprocess.run([*args, "--resume"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {checkpoint} (step 2 of 2)" in " ".join(resumed.stderr.split())
    # the training folder as a report: learning curves, and its evaluation named by step
    html = tmp_path / "train.html"
    report = subprocess.run([sys.executable, "-m", "sage_cli", "report", str(out), "--out", str(html)], cwd=ROOT,
                            capture_output=True, text=True)
    assert report.returncode == 0, report.stderr[-3000:]
    page = html.read_text()
    assert "<h2>Training</h2>" in page and "mean token KL" in page and "eval success" in page
    assert f"{tiny_models['student']} @ step 2" in page
    board = subprocess.run([sys.executable, "-m", "sage_cli", "leaderboard", str(out), "--format", "csv"], cwd=ROOT,
                           capture_output=True, text=True)
    assert board.returncode == 0 and f"{tiny_models['student']} @ step 2" in board.stdout
    bad = subprocess.run([sys.executable, "-m", "sage_cli", "train", "--config", str(TINY), "optim.lrr=1"],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "Did you mean 'lr'" in bad.stderr and "Traceback" not in bad.stderr
    (tmp_path / "bad.yaml").write_text("optim:\n  lr: [1e-5\n")
    bad = subprocess.run([sys.executable, "-m", "sage_cli", "train", "--config", str(tmp_path / "bad.yaml")],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "is not valid YAML at line" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
