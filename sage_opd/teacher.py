"""Teacher scoring: teacher log-probabilities on exactly the student's generated token ids.

Each turn is scored as its own sequence ``prompt_ids + token_ids``, both as the student's
backend produced them (never re-tokenised). API used by the trainer::

    make_batch(turns: Sequence[TurnIds | Generation], pad_id, device=None, pack=True) -> TokenBatch
        # right-padded input_ids/attention_mask [B, T]; response_mask [B, T] is True at the
        # positions whose next token is a response token; target_ids [B, T] = that next token;
        # turn_index [B, T] = which turn that token belongs to (turns of an episode share a row)
    lm_hidden_states(model, batch) -> (hidden [B, T, H], head_weight [V, H])   # student or teacher
    check_same_tokenizer(student_tok, teacher_tok)        # raises TokenizerMismatchError
    HFTeacher(model_or_path, device="cpu", dtype=torch.float32, batch_size=8)
        .score(batch) -> DenseTeacher (hidden [B, T, Ht], head weight)  # full-vocabulary losses
        .token_logprobs(batch) -> [B, T] log q(y) (0 off the response)
        .next_token_logprobs(prompts: list[list[int]], candidates: list[int]) -> [B, len(candidates)]
    RemoteTeacher(base_url, model, top_k=20, api_key=None, timeout=600.0)
        .score(batch) -> SparseTeacher (top-k ids/logprobs [B, T, k], log q(y) [B, T])
        .check_tokenizer(student_tok); .next_token_logprobs(...) as above

Feed the result to ``sage_opd.losses.opd_loss(..., mask=batch.response_mask, target_ids=batch.target_ids)``.

Remote backend: an OpenAI-compatible vLLM server (``vllm serve TEACHER --max-logprobs K``).
``POST {base_url}/completions`` with ``{"prompt": [token ids...], "max_tokens": 1,
"prompt_logprobs": k}`` returns per choice ``prompt_logprobs``: a list with one entry per prompt
token (None for the first), each ``{"<token id>": {"logprob", "rank", "decoded_token"}}`` holding
the top-k and the prompt token itself. Losses on it are restricted to the top-k support (see
``SparseTeacher``). The tokenizer check probes the server's ``POST /tokenize``.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from sage_gym.errors import SageError
from sage_opd.losses import DenseTeacher, SparseTeacher

PROBE_TEXT = "Think: go to the desk 1.\n<action>take mug 2 from desk 1</action> 12 üñí 東京 ¿?"
PROBE_MESSAGES = [{"role": "system", "content": "rules"}, {"role": "user", "content": "task: look"},
                  {"role": "assistant", "content": "<action>look</action>"}]


class TokenizerMismatchError(SageError, ValueError):
    """Teacher and student tokenize differently: token-level distillation would compare unrelated ids."""


class TeacherServerError(SageError, RuntimeError):
    """The remote teacher answered with an error or in an unexpected format."""


@dataclass(frozen=True)
class TurnIds:
    """One student turn as generated: the context ids and the sampled response ids."""

    prompt_ids: list[int]
    token_ids: list[int]


@dataclass
class TokenBatch:
    """Right-padded rows; ``response_mask``/``target_ids``/``turn_index`` are aligned with the logits positions.

    A row holds one turn, or several turns of one episode when each turn's context extends the
    previous turn's context and response (``pack_turns``): causal attention gives every response
    token exactly the logits it has in its own turn's sequence, for a fraction of the tokens."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    response_mask: torch.Tensor  # [B, T] bool: position predicts a response token
    target_ids: torch.Tensor  # [B, T]: the token that position predicts (pad elsewhere)
    turn_index: torch.Tensor  # [B, T] long: the index of the turn whose response token that position predicts, else -1
    rows: list[list[int]]  # each row's ids, unpadded

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask.sum())


def pack_turns(turns: Sequence[TurnIds]) -> list[list[int]]:
    """Group consecutive turns into chains where each turn's prompt starts with the previous turn's prompt and
    response ids (the same episode, its context only grown); one group per row."""
    groups: list[list[int]] = []
    for k, t in enumerate(turns):
        if groups:
            last = turns[groups[-1][-1]]
            head = last.prompt_ids + last.token_ids
            if len(t.prompt_ids) >= len(head) and t.prompt_ids[:len(head)] == head:
                groups[-1].append(k)
                continue
        groups.append([k])
    return groups


def make_batch(turns: Sequence, pad_id: int, device: str | torch.device | None = None, pack: bool = True) -> TokenBatch:
    """Turns (anything with ``prompt_ids`` and ``token_ids``) as one right-padded batch, packing the turns of an
    episode into one row when their contexts allow it (``pack``)."""
    turns = [TurnIds(list(t.prompt_ids or []), list(t.token_ids or [])) for t in turns]
    for k, t in enumerate(turns):
        if not t.prompt_ids:
            raise ValueError(f"turn {k} has no prompt_ids: the trainer must keep the ids the student was given")
    groups = pack_turns(turns) if pack else [[k] for k in range(len(turns))]
    rows = [turns[g[-1]].prompt_ids + turns[g[-1]].token_ids for g in groups]
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    turn_index = torch.full((len(rows), length), -1, dtype=torch.long)
    for b, (group, ids) in enumerate(zip(groups, rows)):
        input_ids[b, :len(ids)] = torch.tensor(ids)
        attention[b, :len(ids)] = 1
        for k in group:
            start = len(turns[k].prompt_ids)
            turn_index[b, start - 1:start + len(turns[k].token_ids) - 1] = k
    targets = torch.full_like(input_ids, pad_id)
    targets[:, :-1] = input_ids[:, 1:]
    return TokenBatch(input_ids.to(device), attention.to(device), (turn_index >= 0).to(device), targets.to(device),
                      turn_index.to(device), rows)


def lm_hidden_states(model, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states [B, T, H] (after the last norm) and the lm_head weight [V, H], without full logits.

    On a CPU, rows of different lengths run one at a time without a padding mask: torch's fast CPU
    attention kernel takes no mask, and the masked one materialises [T, T] scores (about 10x slower
    on packed 3k-token episodes). Positions past a row's end hold zeros."""
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(model.config, attr, None) not in (None, 1, 1.0):
            raise ValueError(f"{type(model).__name__} post-processes its logits ({attr}); the chunked losses "
                             "assume logits = hidden @ lm_head.weight.T")
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError("an lm_head with a bias is not supported by the chunked losses")
    decoder = model.get_decoder()
    lengths = batch.attention_mask.sum(1).tolist()
    if batch.input_ids.device.type != "cpu" or len(set(lengths)) == 1:
        mask = None if min(lengths) == batch.input_ids.shape[1] else batch.attention_mask
        return decoder(input_ids=batch.input_ids, attention_mask=mask).last_hidden_state, head.weight
    rows = [decoder(input_ids=batch.input_ids[b:b + 1, :n]).last_hidden_state[0] for b, n in enumerate(lengths)]
    hidden = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    return F.pad(hidden, (0, 0, 0, batch.input_ids.shape[1] - hidden.shape[1])), head.weight


def check_same_tokenizer(student_tok, teacher_tok) -> None:
    """Refuse a teacher whose tokenizer differs from the student's (vocabulary, special tokens, probe encodings)."""
    problems = []
    if len(student_tok) != len(teacher_tok):
        problems.append(f"vocabulary sizes differ ({len(student_tok)} vs {len(teacher_tok)})")
    elif student_tok.get_vocab() != teacher_tok.get_vocab():
        problems.append("the token -> id maps differ")
    for name in ("eos_token", "pad_token", "bos_token", "unk_token"):
        if getattr(student_tok, name, None) != getattr(teacher_tok, name, None):
            problems.append(f"{name} differs ({getattr(student_tok, name, None)!r} vs {getattr(teacher_tok, name, None)!r})")
    if sorted(student_tok.all_special_tokens) != sorted(teacher_tok.all_special_tokens):
        problems.append("the special tokens differ")
    if _probe_ids(student_tok) != _probe_ids(teacher_tok):
        problems.append("they encode the probe text or chat differently")
    if problems:
        raise TokenizerMismatchError("teacher and student must share a tokenizer for token-level distillation: "
                                     + "; ".join(problems) + ". Pick a teacher from the student's model family.")


def _probe_ids(tok) -> list[list[int]]:
    ids = [tok(PROBE_TEXT, add_special_tokens=False)["input_ids"]]
    if getattr(tok, "chat_template", None):
        ids.append(tok(tok.apply_chat_template(PROBE_MESSAGES, tokenize=False), add_special_tokens=False)["input_ids"])
    return ids


class HFTeacher:
    """An in-process transformers teacher (frozen, eval mode), scored in micro-batches."""

    def __init__(self, model_or_path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 batch_size: int = 8, tokenizer=None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if isinstance(model_or_path, (str, Path)):
            self.model = AutoModelForCausalLM.from_pretrained(model_or_path, dtype=dtype)
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_or_path)
        else:
            self.model = model_or_path
        self.model.to(device).eval().requires_grad_(False)
        self.tokenizer, self.device, self.batch_size = tokenizer, torch.device(device), batch_size

    @torch.no_grad()
    def score(self, batch: TokenBatch) -> DenseTeacher:
        """Teacher hidden states for every position of the batch, and its head weight (frozen)."""
        hidden = None
        for s in range(0, batch.input_ids.shape[0], self.batch_size):
            rows = slice(s, s + self.batch_size)
            length = int(batch.attention_mask[rows].sum(1).max())
            part = TokenBatch(batch.input_ids[rows, :length].to(self.device),
                              batch.attention_mask[rows, :length].to(self.device), None, None, None, [])
            h, weight = lm_hidden_states(self.model, part)
            if hidden is None:
                hidden = h.new_zeros((*batch.input_ids.shape, h.shape[-1]))
            hidden[rows, :length] = h
        return DenseTeacher(hidden, weight.detach())

    @torch.no_grad()
    def token_logprobs(self, batch: TokenBatch, chunk_size: int = 256) -> torch.Tensor:
        """log q(y) [B, T] of each response token at its predicting position (0 elsewhere)."""
        teacher = self.score(batch)
        mask = batch.response_mask.to(teacher.hidden.device)
        out = torch.zeros(batch.input_ids.shape, dtype=torch.float32, device=teacher.hidden.device)
        out[mask] = teacher.select(mask).token_logprobs(batch.target_ids.to(mask.device)[mask], chunk_size)
        return out

    @torch.no_grad()
    def next_token_logprobs(self, prompts: list[list[int]], candidates: list[int]) -> torch.Tensor:
        """log q(candidate | prompt) [B, len(candidates)] from one forward pass per micro-batch."""
        out = []
        for s in range(0, len(prompts), self.batch_size):
            part = prompts[s:s + self.batch_size]
            lengths = torch.tensor([len(p) for p in part], device=self.device)
            ids = torch.zeros((len(part), int(lengths.max())), dtype=torch.long, device=self.device)
            for b, p in enumerate(part):
                ids[b, :len(p)] = torch.tensor(p)
            attention = (torch.arange(ids.shape[1], device=self.device)[None] < lengths[:, None]).long()
            hidden, weight = lm_hidden_states(self.model, TokenBatch(ids, attention, None, None, None, []))
            last = hidden[torch.arange(len(part), device=self.device), lengths - 1]
            out.append(F.log_softmax((last @ weight.T).float(), -1)[:, candidates])
        return torch.cat(out)

    def check_tokenizer(self, student_tok) -> None:
        check_same_tokenizer(student_tok, self.tokenizer)


class RemoteTeacher:
    """A teacher behind an OpenAI-compatible vLLM server, scored through prompt log-probs (top-k)."""

    def __init__(self, base_url: str, model: str, top_k: int = 20, api_key: str | None = None,
                 timeout: float = 600.0, concurrency: int = 8):
        import httpx

        if top_k < 1:
            raise ValueError(f"top_k must be >= 1 (the server's --max-logprobs bounds it), got {top_k}")
        self.base_url = base_url.rstrip("/")
        self.root_url = self.base_url.removesuffix("/v1")
        self.model, self.top_k, self.concurrency = model, top_k, concurrency
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=timeout, headers=headers)

    def _post(self, url: str, payload: dict) -> dict:
        response = self.client.post(url, json=payload)
        if response.status_code != 200:
            raise TeacherServerError(f"teacher server {url} answered {response.status_code}: {response.text[:300]}")
        return response.json()

    def prompt_logprobs(self, ids: list[int], top_k: int | None = None) -> list[dict[int, float] | None]:
        """One dict {token id: logprob} per prompt position (None first): top-k plus the actual token."""
        data = self._post(f"{self.base_url}/completions", {
            "model": self.model, "prompt": ids, "max_tokens": 1, "temperature": 0.0,
            "prompt_logprobs": self.top_k if top_k is None else top_k})
        try:
            entries = data["choices"][0]["prompt_logprobs"]
            return [None if e is None else {int(k): float(v["logprob"]) for k, v in e.items()} for e in entries]
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise TeacherServerError(f"teacher server did not return vLLM prompt_logprobs ({err!r}); serve the "
                                     "teacher with vLLM's OpenAI-compatible server") from err

    def score(self, batch: TokenBatch) -> SparseTeacher:
        """Top-k teacher log-probs [B, T, k] and log q(y) [B, T] at the response-predicting positions."""
        b, t, k = *batch.input_ids.shape, self.top_k
        ids = torch.arange(k).repeat(b, t, 1)
        logprobs = torch.zeros((b, t, k))
        token_lp = torch.zeros((b, t))
        seqs = batch.rows
        with ThreadPoolExecutor(self.concurrency) as pool:
            results = list(pool.map(self.prompt_logprobs, seqs))
        response = batch.response_mask.cpu()
        for row, (entries, seq) in enumerate(zip(results, seqs)):
            if len(entries) != len(seq):
                raise TeacherServerError(f"teacher returned {len(entries)} prompt logprobs for {len(seq)} tokens")
            for pos in (p + 1 for p in range(len(seq) - 1) if response[row, p]):
                entry = entries[pos]
                if seq[pos] not in entry:
                    raise TeacherServerError(f"teacher prompt_logprobs at position {pos} lack the prompt token")
                top = sorted(entry.items(), key=lambda kv: -kv[1])[:k]
                if len(top) < k:
                    raise TeacherServerError(f"teacher returned {len(top)} logprobs, expected top_k={k}")
                ids[row, pos - 1] = torch.tensor([i for i, _ in top])
                logprobs[row, pos - 1] = torch.tensor([v for _, v in top])
                token_lp[row, pos - 1] = entry[seq[pos]]
        device = batch.input_ids.device
        return SparseTeacher(ids.to(device), logprobs.to(device), token_lp.to(device))

    def next_token_logprobs(self, prompts: list[list[int]], candidates: list[int]) -> torch.Tensor:
        """log q(candidate | prompt): each prompt + candidate is scored (vLLM's prefix cache shares the prompt)."""
        jobs = [p + [c] for p in prompts for c in candidates]
        with ThreadPoolExecutor(self.concurrency) as pool:
            results = list(pool.map(lambda ids: self.prompt_logprobs(ids, top_k=1)[-1][ids[-1]], jobs))
        return torch.tensor(results).reshape(len(prompts), len(candidates))

    def check_tokenizer(self, student_tok) -> None:
        """Compare the server's encoding of probe texts (``POST /tokenize``) with the student's."""
        for text in [PROBE_TEXT] + ([student_tok.apply_chat_template(PROBE_MESSAGES, tokenize=False)]
                                    if getattr(student_tok, "chat_template", None) else []):
            data = self._post(f"{self.root_url}/tokenize", {"model": self.model, "prompt": text,
                                                            "add_special_tokens": False})
            if data.get("tokens") != student_tok(text, add_special_tokens=False)["input_ids"]:
                raise TokenizerMismatchError(f"the teacher server {self.model!r} encodes a probe text differently "
                                             "from the student's tokenizer; teacher and student must share a tokenizer")

    def close(self) -> None:
        self.client.close()
