"""Search-augmented QA (Search-R1 style): ``search[QUERY]`` returns passages, ``answer[TEXT]`` ends the episode.

Env ids: ``searchqa-demo`` (a generated offline world, see ``searchqa_demo``) and
``searchqa-<dataset>`` for nq, triviaqa, popqa, hotpotqa, 2wiki, musique, bamboogle and any other
dataset folder under ``$SAGE_DATA/searchqa/``. A folder holds ``test.jsonl`` (FlashRAG lines
``{id, question, golden_answers}``) or ``test.parquet`` (Search-R1), and optionally ``index/`` (a
bm25s index from ``sage retriever index``); ``$SAGE_DATA/searchqa/index`` is the shared fallback.
Score = exact match (SQuAD normalisation, max over golden answers); F1 is reported in ``info``.
"""

from __future__ import annotations

import json
import os
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from sage_gym.core import EpisodeStart, GameStep, TextEnv
from sage_gym.envs.searchqa_demo import N_TEST_MULTI, N_TEST_SINGLE
from sage_gym.errors import DataNotFoundError, SageError, install_hint
from sage_gym.formatting import EMPTY, SCHEMA_VIOLATION, UNPARSEABLE, ReActFormatter
from sage_gym.registry import EnvSpec, add_discoverer, list_envs, register
from sage_gym.retrieval import Passage, Retriever, build_bm25s_index, format_passages, load_retriever

MAX_TURNS = 16
DEMO_TEST_SIZE = N_TEST_SINGLE + N_TEST_MULTI
DATASETS = ("nq", "triviaqa", "popqa", "hotpotqa", "2wiki", "musique", "bamboogle")
# names of the same datasets in FlashRAG (hub configs) and in Search-R1's data_source column
HUB_REPO = "RUC-NLPIR/FlashRAG_datasets"
HUB_NAMES = {"2wiki": "2wikimultihopqa"}
EVAL_SPLITS = {"hotpotqa": "dev", "2wiki": "dev", "musique": "dev"}  # FlashRAG has no test split for these
ACTION_RE = re.compile(r"^(search|answer)\[(.*)\]$", re.DOTALL)

RULES = """You answer a question by searching a text collection (Wikipedia-like passages).
Commands:
  search[QUERY]   search the collection; the top passages come back as the next message
  answer[TEXT]    give your final answer (a short phrase, no explanation); this ends the episode
Search as often as you need (at most {max_turns} turns in all), then answer."""


# ---- metrics (SQuAD normalisation, as Search-R1 and FlashRAG) ------------------------------
def normalize_answer(text: str) -> str:
    """Lower-case, strip punctuation and the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, golden_answers: list[str]) -> float:
    """1.0 when the normalised prediction equals any normalised golden answer."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golden_answers))


def f1_score(prediction: str, golden_answers: list[str]) -> float:
    """Token-level F1 of the normalised strings, max over golden answers."""
    pred_tokens = normalize_answer(prediction).split()
    best = 0.0
    for gold in golden_answers:
        gold_tokens = normalize_answer(gold).split()
        common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
        if common:
            precision, recall = common / len(pred_tokens), common / len(gold_tokens)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


# ---- prompt formats ------------------------------------------------------------------------
class SearchR1Formatter(ReActFormatter):
    """Search-R1's tags: reasoning in ``<think>``, then ``<search>q</search>`` or ``<answer>a</answer>``.

    ``parse`` maps them to ``search[q]`` / ``answer[a]``; search results come back in
    ``<information>...</information>``; generation stops at either closing tag.
    """

    _tag_re = re.compile(r"<(search|answer)>(.*?)</\1>", re.DOTALL)

    @property
    def stop(self) -> list[str]:
        return ["</search>", "</answer>"]

    def system_prompt(self, rules: str) -> str:
        return (
            "Answer the given question. Reason inside <think> and </think> every time you get new information. "
            "If you lack some knowledge, call the search engine with <search> query </search>; the top results "
            "come back between <information> and </information>. You may search as many times as you want. "
            "When no more knowledge is needed, give the final answer inside <answer> and </answer>, without "
            "explanation, e.g. <answer> Beijing </answer>."
        )

    def invalid_feedback(self, reason: str) -> str:
        problem = {EMPTY: "My previous response was empty.",
                   UNPARSEABLE: "My previous response did not contain exactly one search block or answer block.",
                   SCHEMA_VIOLATION: "My previous search query or answer was empty."}[reason]
        return (f"\n{problem} To search, I should put the query inside a search tag pair. To give the final "
                "answer, I should put it inside an answer tag pair, as the instructions show. Let me try again.\n")

    def format_information(self, text: str) -> str:
        return f"<information>{text}</information>"

    def format_action(self, action: str, thought: str = "") -> str:
        m = ACTION_RE.match(action)
        tag, arg = (m.group(1), m.group(2)) if m else ("answer", action)
        think = f"<think>{thought.strip()}</think>\n" if thought.strip() else ""
        return f"{think}<{tag}> {arg} </{tag}>"

    def restore_stop(self, response: str) -> str:
        tags = [(response.rfind(f"<{t}>"), t) for t in ("search", "answer")]
        pos, tag = max(tags)
        if pos >= 0 and f"</{tag}>" not in response[pos:]:
            return response + f"</{tag}>"
        return response

    def extract_action(self, response: str) -> str | None:
        """``<search>q</search>`` -> ``search[q]``, ``<answer>a</answer>`` -> ``answer[a]``; None unless exactly one."""
        found = self._tag_re.findall(response)
        if len(found) != 1:
            return None
        tag, arg = found[0]
        return f"{tag}[{' '.join(arg.split())}]"


PROMPT_FORMATS = {"react": ReActFormatter, "search-r1": SearchR1Formatter}


def make_formatter(prompt_format: str = "react", history_window: int | None = None) -> ReActFormatter:
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt_format {prompt_format!r}; choose one of: {', '.join(PROMPT_FORMATS)}")
    return PROMPT_FORMATS[prompt_format](history_window=history_window)


# ---- data ----------------------------------------------------------------------------------
@dataclass
class QAItem:
    """One question: id, text, golden answers, and whatever else the data carries."""

    id: str
    question: str
    golden_answers: list[str]
    extra: dict[str, Any] = field(default_factory=dict)


def data_root(data_dir: str | Path | None = None) -> Path:
    """The search QA data folder: ``<data_dir or $SAGE_DATA or ~/.cache/sage/data>/searchqa``."""
    root = data_dir or os.environ.get("SAGE_DATA") or "~/.cache/sage/data"
    return Path(root).expanduser() / "searchqa"


def _answers(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in list(value)]


def _row_to_item(row: dict[str, Any], n: int, dataset: str) -> QAItem:
    question = row.get("question")
    if question is None and row.get("prompt"):  # Search-R1 parquet without the question column
        question = str(list(row["prompt"])[-1]["content"]).rsplit("Question:", 1)[-1]
    answers = _answers(row.get("golden_answers"))
    if not answers and isinstance(row.get("reward_model"), dict):
        answers = _answers((row["reward_model"].get("ground_truth") or {}).get("target"))
    if not question or not answers:
        raise SageError(f"{dataset} row {n} has no question or no golden answers; expected FlashRAG {{id, question, "
                        "golden_answers}} or Search-R1 {question|prompt, reward_model.ground_truth.target}")
    index = (row.get("extra_info") or {}).get("index") if isinstance(row.get("extra_info"), dict) else None
    qid = row.get("id")
    if qid is None:
        qid = f"{row.get('data_source', dataset)}-{index}" if index is not None else f"{dataset}-{n}"
    extra = {k: row[k] for k in ("type", "template", "supporting_ids", "expert_queries", "data_source") if k in row}
    return QAItem(str(qid), str(question).strip(), answers, extra)


def load_questions(path: str | Path, dataset: str = "") -> list[QAItem]:
    """Questions from a FlashRAG jsonl or a Search-R1 parquet (filtered to ``dataset`` if it is merged)."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
        sources = {r.get("data_source") for r in rows}
        wanted = {dataset, HUB_NAMES.get(dataset, dataset)}
        if len(sources) > 1 and sources & wanted:  # Search-R1's merged test set
            rows = [r for r in rows if r.get("data_source") in wanted]
    else:
        try:
            with path.open(encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
        except json.JSONDecodeError as err:
            raise SageError(f"{path} is not valid jsonl ({err}); expected lines "
                            "{id, question, golden_answers}") from err
    items = [_row_to_item(r, n, dataset or path.stem) for n, r in enumerate(rows)]
    seen = set()
    for it in items:
        if it.id in seen:
            raise SageError(f"{path}: question id {it.id!r} appears twice; episode ids must be unique")
        seen.add(it.id)
    return items


def find_split_file(dataset: str, split: str, data_dir: str | Path | None = None) -> Path:
    """``<root>/<dataset>/<split>.jsonl|.parquet`` (``test`` falls back to ``dev``); a clear error if absent."""
    folder = data_root(data_dir) / dataset
    fetch_split = EVAL_SPLITS.get(dataset, split) if split == "test" else split
    for name in [split] + (["dev"] if split == "test" else []):
        for ext in (".jsonl", ".parquet"):
            if (folder / f"{name}{ext}").is_file():
                return folder / f"{name}{ext}"
    raise DataNotFoundError(
        f"no {split} questions for searchqa-{dataset}: expected {folder}/{split}.jsonl (FlashRAG "
        f"{{id, question, golden_answers}}) or {folder}/{split}.parquet (Search-R1). Install it with "
        f"`sage retriever fetch-qa --dataset {dataset} --split {fetch_split}` (needs network and "
        f"`{install_hint('datasets')}`), copy your own files there, or set $SAGE_DATA / data_dir. "
        "See docs/searchqa.md."
    )


def fetch_from_hub(dataset: str, split: str | None = None, data_dir: str | Path | None = None) -> Path:
    """Download one FlashRAG split (default: the evaluation split) and write ``<root>/<dataset>/<split>.jsonl``."""
    split = split or EVAL_SPLITS.get(dataset, "test")
    try:
        import datasets
    except ImportError as err:
        raise SageError(f"fetching QA data needs the `datasets` package: {install_hint('datasets')}") from err
    rows = datasets.load_dataset(HUB_REPO, HUB_NAMES.get(dataset, dataset), split=split)
    out = data_root(data_dir) / dataset / f"{split}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for n, row in enumerate(rows):
            f.write(json.dumps({"id": str(row.get("id", n)), "question": row["question"],
                                "golden_answers": _answers(row["golden_answers"])}) + "\n")
    return out


def default_retriever(dataset: str, data_dir: str | Path | None = None) -> Retriever:
    """``$SAGE_RETRIEVER`` (URL or index), else ``<root>/<dataset>/index``, else ``<root>/index``."""
    if os.environ.get("SAGE_RETRIEVER"):
        return load_retriever(os.environ["SAGE_RETRIEVER"])
    root = data_root(data_dir)
    for folder in (root / dataset / "index", root / "index"):
        if folder.is_dir():
            return load_retriever(folder)
    raise DataNotFoundError(
        f"no retrieval index for searchqa-{dataset}: build one with `sage retriever index --corpus wiki-18.jsonl "
        f"--out {root / 'index'}`, or pass retriever='http://HOST:PORT' (a `sage retriever serve` or Search-R1 "
        "server) or set $SAGE_RETRIEVER. See docs/searchqa.md."
    )


@lru_cache(maxsize=1)
def _demo_retriever() -> Retriever:
    from sage_gym.envs.searchqa_demo import build_world

    return build_bm25s_index(build_world()[0])


def _demo_questions(split: str) -> list[QAItem]:
    from sage_gym.envs.searchqa_demo import build_world

    splits = build_world()[1]
    if split not in splits:
        raise ValueError(f"searchqa-demo has splits {', '.join(splits)}, not {split!r}")
    return [_row_to_item(q.to_json(), n, "demo") for n, q in enumerate(splits[split])]


# ---- the environment -----------------------------------------------------------------------
class SearchQAEnv(TextEnv):
    """Multi-turn search QA over a retriever; score = exact match, ``info["f1"]`` the token F1."""

    def __init__(self, dataset: str = "demo", split: str = "test", data_dir: str | Path | None = None,
                 retriever: Retriever | str | None = None, topk: int = 3, max_turns: int = MAX_TURNS,
                 prompt_format: str = "react", history_window: int | None = None,
                 formatter: ReActFormatter | None = None, max_query_chars: int = 1000,
                 render_mode: str | None = None):
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        self.dataset, self.split, self.topk, self.max_query_chars = dataset, split, topk, max_query_chars
        if dataset == "demo":
            items = _demo_questions(split)
        else:
            items = load_questions(find_split_file(dataset, split, data_dir), dataset)
        self.items = {it.id: it for it in items}
        # close only what this env opened itself (not a caller's retriever, not the shared demo index)
        self._owns_retriever = isinstance(retriever, (str, Path)) or (retriever is None and dataset != "demo")
        if retriever is None:
            retriever = _demo_retriever() if dataset == "demo" else default_retriever(dataset, data_dir)
        elif isinstance(retriever, (str, Path)):
            retriever = load_retriever(retriever)
        self.retriever = retriever
        self.env_id = f"searchqa-{dataset}"
        self.rules = RULES.format(max_turns=max_turns)
        super().__init__([it.id for it in items], max_turns,
                         formatter or make_formatter(prompt_format, history_window), render_mode)
        self._item: QAItem | None = None
        self._last_passages: list[Passage] = []
        self._em = self._f1 = 0.0

    def _start_episode(self, episode_id: str) -> EpisodeStart:
        self._item = self.items[episode_id]
        self._last_passages, self._em, self._f1 = [], 0.0, 0.0
        task_type = self._item.extra.get("type") or self.dataset
        return EpisodeStart(self._item.question, f"Question: {self._item.question}", task_type,
                            {"golden_answers": list(self._item.golden_answers)})

    def _info(self, extra: dict[str, Any]) -> dict[str, Any]:
        """Every info carries EM and F1 so far (0 until an answer), flat and under ``metrics`` (sage evaluate)."""
        metrics = {"em": self._em, "f1": self._f1}
        return super()._info({**metrics, "metrics": metrics, **extra})

    def is_valid_action(self, action: str) -> bool:
        m = ACTION_RE.match(action or "")
        return bool(m and m.group(2).strip())

    def _game_step(self, action: str) -> GameStep:
        verb, arg = ACTION_RE.match(action).groups()
        arg = arg.strip()
        if verb == "answer":
            self._em = exact_match(arg, self._item.golden_answers)
            self._f1 = f1_score(arg, self._item.golden_answers)
            return GameStep("Answer submitted. The episode is over.", self._em, True, self._em == 1.0,
                            {"answer": arg, "golden_answers": list(self._item.golden_answers)})
        query = arg[: self.max_query_chars]
        self._last_passages = self.retriever.search([query], self.topk)[0]
        if self._last_passages:
            text = format_passages(self._last_passages)
            header = f'Search results for "{query}":\n'
        else:
            text, header = f'No passage matches "{query}".', ""
        wrap = getattr(self.formatter, "format_information", None)  # Search-R1: <information>...</information>
        observation = wrap(text) if wrap else header + text
        return GameStep(observation, 0.0, False, False,
                        {"query": query, "retrieved_ids": [p.id for p in self._last_passages]})

    def admissible_actions(self) -> list[str]:
        """The action space is free text; these are representative moves (search the question, answer a title)."""
        question = " ".join(self._item.question.split()) if self._item else ""
        return [f"search[{question}]"] + [f"answer[{p.title}]" for p in self._last_passages if p.title]

    def expert_actions(self) -> list[str]:
        """Search each supporting passage's entity (demo data), else the question itself, then answer the first
        golden answer. On datasets without supporting passages this is a format/scoring oracle: it wins by
        answering the gold answer whatever the search returned, so it measures nothing about retrieval."""
        if self._item is None:
            raise RuntimeError("call reset() before expert_actions()")
        queries = self._item.extra.get("expert_queries") or [" ".join(self._item.question.split())]
        return [f"search[{q}]" for q in queries] + [f"answer[{self._item.golden_answers[0]}]"]

    def close(self):
        if self._owns_retriever and hasattr(self.retriever, "close"):
            self.retriever.close()
        super().close()


# ---- registration --------------------------------------------------------------------------
def _installed_datasets(data_dir: str | Path | None = None) -> list[str]:
    """Known datasets plus any other dataset folder installed under ``<data_dir or $SAGE_DATA>/searchqa``."""
    root = data_root(data_dir)
    if not root.is_dir():
        return list(DATASETS)
    extra = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in ("index", "demo", *DATASETS)
                   and (any(p.glob("*.jsonl")) or any(p.glob("*.parquet"))))
    return list(DATASETS) + extra


def data_status(spec: EnvSpec) -> str:
    """`sage envs` status line for a search QA dataset: questions and index present or what is missing."""
    dataset = spec.kwargs["dataset"]
    if dataset == "demo":
        return "ready (generated)"
    try:
        find_split_file(dataset, "test")
    except DataNotFoundError:
        return f"missing: run `sage retriever fetch-qa --dataset {dataset}`"
    root = data_root()
    if os.environ.get("SAGE_RETRIEVER") or (root / dataset / "index").is_dir() or (root / "index").is_dir():
        return "ready"
    return "no index: run `sage retriever index` or set $SAGE_RETRIEVER"


def _has_train(dataset: str, data_dir: str | Path | None = None) -> bool:
    return any((data_root(data_dir) / dataset / f"train{ext}").is_file() for ext in (".jsonl", ".parquet"))


def register_datasets(data_dir: str | Path | None = None) -> None:
    """Register ``searchqa-<name>`` for every dataset folder under ``data_dir`` (default ``$SAGE_DATA``)."""
    known = {s.env_id for s in list_envs()}
    for name in _installed_datasets(data_dir):
        if f"searchqa-{name}" not in known:
            register(EnvSpec(f"searchqa-{name}", "sage_gym.envs.searchqa:SearchQAEnv", "searchqa", name, MAX_TURNS,
                             None, {"dataset": name}, has_train_split=_has_train(name, data_dir),
                             data_status="sage_gym.envs.searchqa:data_status"))


register(EnvSpec("searchqa-demo", "sage_gym.envs.searchqa:SearchQAEnv", "searchqa", "demo", MAX_TURNS, DEMO_TEST_SIZE,
                 {"dataset": "demo"}, has_train_split=True, data_status="sage_gym.envs.searchqa:data_status"))
register_datasets()
add_discoverer(register_datasets)
