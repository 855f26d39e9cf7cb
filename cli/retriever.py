"""`sage retriever ...`: build a BM25 index, serve it over Search-R1's /retrieve protocol, fetch QA data."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from sage_cli.console import make_console

console = make_console()
retriever_app = typer.Typer(help="Search QA retrieval: index a corpus, serve it, query it, fetch QA data.",
                            no_args_is_help=True)


@retriever_app.command("index")
def index(
    corpus: Path = typer.Option(..., help='Corpus jsonl: lines {"id", "contents"} with contents = "Title"\\ntext.'),
    out: Path = typer.Option(..., help="Folder to write the index into."),
    backend: str = typer.Option("bm25s", help="bm25s (embedded) or pyserini (Lucene; needs the pyserini extra)."),
    threads: int = typer.Option(1, help="Indexing threads (pyserini)."),
) -> None:
    """Build a BM25 index (English stemming and stopwords) of a corpus jsonl."""
    from sage_gym.retrieval import build_bm25s_index, build_lucene_index, read_corpus

    start = time.perf_counter()
    if backend == "pyserini":
        build_lucene_index(corpus, out, threads)
        console.print(f"[green]Built a Lucene index[/] in {out} in {time.perf_counter() - start:.1f} s; "
                      f"serve it with `sage retriever serve --index pyserini:{out}`")
        return
    if backend != "bm25s":
        raise typer.BadParameter(f"--backend must be bm25s or pyserini, not {backend!r}")
    with console.status(f"Reading {corpus} ..."):
        docs = list(read_corpus(corpus))
    retriever = build_bm25s_index(docs, out, show_progress=True)
    console.print(f"[green]Indexed {len(retriever)} passages[/] into {out} in {time.perf_counter() - start:.1f} s")


@retriever_app.command("serve")
def serve(
    index: str = typer.Option(..., help="A bm25s index folder, pyserini:LUCENE_DIR, or an http:// URL to proxy."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
    topk: int = typer.Option(3, min=1, help="Passages per query when a request gives no topk."),
    max_queries: int = typer.Option(512, min=1, help="Most queries in one request."),
    max_query_chars: int = typer.Option(4096, min=1, help="Longest query, in characters."),
    max_topk: int = typer.Option(100, min=1, help="Largest topk a request may ask for."),
    max_body_bytes: Optional[int] = typer.Option(None, min=1, help="Largest request body, refused with 413 before it "
                                                 "is read (default: 12 bytes per query character allowed + 64 KiB)."),
) -> None:
    """Serve an index over HTTP: POST /retrieve {"queries", "topk", "return_scores"} (Search-R1 protocol)."""
    from sage_gym.retrieval import load_retriever
    from sage_gym.retrieval_server import ServerLimits, serve as run_server

    with console.status(f"Loading {index} ..."):
        retriever = load_retriever(index)
    console.print(f"Serving {retriever.name} index {index} on http://{host}:{port}/retrieve")
    run_server(retriever, host, port, ServerLimits(max_queries, max_query_chars, max_topk, topk, max_body_bytes))


@retriever_app.command("search")
def search(
    query: str = typer.Argument(..., help="The query."),
    index: str = typer.Option(..., help="A bm25s index folder, pyserini:LUCENE_DIR, or an http:// URL."),
    topk: int = typer.Option(3, min=1, help="Passages to show."),
) -> None:
    """Run one query and print the passages (Search-R1 rendering)."""
    from sage_gym.retrieval import format_passages, load_retriever

    passages = load_retriever(index).search([query], topk)[0]
    console.print(format_passages(passages) or "no passage matches", markup=False)


@retriever_app.command("fetch-qa")
def fetch_qa(
    dataset: str = typer.Option(..., help="nq, triviaqa, popqa, hotpotqa, 2wiki, musique or bamboogle."),
    split: Optional[str] = typer.Option(None, help="Split; default test (dev for hotpotqa, 2wiki, musique)."),
    data_dir: Optional[Path] = typer.Option(None, help="Data root; default $SAGE_DATA or ~/.cache/sage/data."),
) -> None:
    """Download a QA split from the hub (needs the `datasets` extra) into $SAGE_DATA/searchqa/<dataset>/."""
    from sage_gym.envs.searchqa import fetch_from_hub

    with console.status(f"Fetching {dataset} from the hub ..."):
        path = fetch_from_hub(dataset, split, data_dir)
    console.print(f"[green]Wrote[/] {path}")


@retriever_app.command("export-demo")
def export_demo(out: Path = typer.Option(..., help="Folder for corpus.jsonl, test.jsonl and train.jsonl.")) -> None:
    """Write the generated searchqa-demo world (corpus and questions) as files, e.g. to serve it."""
    from sage_gym.envs.searchqa_demo import export_demo as write

    console.print(f"[green]Wrote[/] the searchqa-demo corpus and questions into {write(out)}")
