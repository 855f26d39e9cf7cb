"""Queries per second of each installed retrieval backend on the same corpus, side by side.

    .venv/bin/python bench/bench_retrieval.py [--corpus corpus.jsonl] [--filler 20000] [--topk 3]

Backends: bm25s in-process, http (`sage retriever serve` in a subprocess on 127.0.0.1, over the same
on-disk index), pyserini when installed (Lucene index built from the same corpus). Default corpus: the
searchqa-demo passages plus seeded Zipf-distributed filler passages; queries: the demo questions.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from sage_gym.envs.searchqa_demo import build_world
from sage_gym.retrieval import BM25sRetriever, HttpRetriever, build_bm25s_index, read_corpus

console = Console()


def filler_passages(n: int, seed: int = 0) -> list[dict]:
    """``n`` passages of Zipf-distributed pseudo-words (a stand-in for Wikipedia's term statistics)."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghiklmnoprstuvy") for _ in range(rng.randint(3, 9))) for _ in range(30000)]
    weights = [1 / (r + 1) for r in range(len(vocab))]
    docs = []
    for i in range(n):
        words = rng.choices(vocab, weights, k=rng.randint(60, 120))
        docs.append({"id": f"filler-{i}", "contents": f'"{" ".join(words[:3]).title()}"\n{" ".join(words[3:])}'})
    return docs


def rate(fn, queries: list[str], batch: int, min_seconds: float = 2.0) -> float:
    """Queries per second of ``fn(batch_of_queries)`` over repeated passes (at least ``min_seconds``)."""
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        for i in range(0, len(queries), batch):
            fn(queries[i:i + batch])
            done += len(queries[i:i + batch])
    return done / (time.perf_counter() - start)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "sage_cli", "retriever", "serve", "--index", str(index),
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("the retrieval server did not start")


def pyserini_retriever(docs: list[dict], work: Path):
    """A PyseriniRetriever over a Lucene index of ``docs``, or None when pyserini is not installed."""
    import importlib.util

    if importlib.util.find_spec("pyserini") is None:
        return None
    from sage_gym.retrieval import PyseriniRetriever, build_lucene_index

    with (work / "docs.jsonl").open("w") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    return PyseriniRetriever(build_lucene_index(work / "docs.jsonl", work / "lucene"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, help="corpus jsonl (default: demo passages + filler)")
    parser.add_argument("--filler", type=int, default=20000, help="filler passages added to the demo corpus")
    parser.add_argument("--topk", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="minimum seconds per measurement")
    args = parser.parse_args()

    corpus, splits = build_world()
    docs = list(read_corpus(args.corpus)) if args.corpus else corpus + filler_passages(args.filler)
    queries = [q.question for split in splits.values() for q in split]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        build_bm25s_index(docs, work / "index")
        console.print(f"corpus: {len(docs)} passages, indexed by bm25s in {time.perf_counter() - start:.1f} s; "
                      f"{len(queries)} queries, topk={args.topk}")
        local = BM25sRetriever.load(work / "index")
        rows = [("bm25s in-process", 1, rate(lambda b: local.search(b, args.topk), queries, 1, args.seconds)),
                ("bm25s in-process", 64, rate(lambda b: local.search(b, args.topk), queries, 64, args.seconds))]
        server = start_server(work / "index", free_port())
        try:
            remote = HttpRetriever(f"http://127.0.0.1:{server.args[-1]}")
            for batch in (1, 64):
                rows.append(("http (sage retriever serve)", batch,
                             rate(lambda b: remote.search(b, args.topk), queries, batch, args.seconds)))
            same = [[p.id for p in r] for r in remote.search(queries[:64], args.topk)] == \
                   [[p.id for p in r] for r in local.search(queries[:64], args.topk)]
        finally:
            server.terminate()
            server.wait(timeout=10)
        lucene = pyserini_retriever(docs, work)
        if lucene is None:
            console.print("pyserini: not installed (pip install -e '.\\[pyserini]'), skipped")
        else:
            for batch in (1, 64):
                rows.append(("pyserini (Lucene)", batch, rate(lambda b: lucene.search(b, args.topk), queries, batch,
                                                               args.seconds)))
    base = rows[0][2]
    table = Table(title="retrieval throughput (same corpus, same queries)")
    for column in ("backend", "queries/request", "queries/s", "vs bm25s in-process, 1/request"):
        table.add_column(column)
    for name, batch, qps in rows:
        table.add_row(name, str(batch), f"{qps:,.0f}", f"{qps / base:.2f}x")
    console.print(table)
    console.print(f"http returns the same passages as in-process bm25s: {same}")


if __name__ == "__main__":
    main()
