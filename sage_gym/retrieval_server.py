"""A FastAPI retrieval server that speaks Search-R1's ``POST /retrieve`` protocol exactly.

Request ``{"queries": [str], "topk": int, "return_scores": bool}``; answer
``{"result": [[{"document": {"id", "contents"}, "score": float}, ...] per query]}``, or, when
``return_scores`` is false, plain document dicts per query (as Search-R1's server does).
Malformed requests and requests over the limits get a 4xx JSON error ``{"detail": message}`` that
says why (422; 413 for a body over ``max_body_bytes``, refused before it is read); replies and
errors are encoded by ``sage_gym.webapi``, so no request can make the server answer 5xx.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict

from sage_gym.retrieval import Retriever
from sage_gym.webapi import body_limit_for, json_app


@dataclass
class ServerLimits:
    """Request limits; a request over any of them is refused with a 422 JSON error."""

    max_queries: int = 512
    max_query_chars: int = 4096
    max_topk: int = 100
    default_topk: int = 3
    max_body_bytes: int | None = None  # None: room for max_queries * max_query_chars in any JSON escaping


class RetrieveRequest(BaseModel):
    """The body of ``POST /retrieve``; strict, so ``"3"`` is not an int and ``1`` is not a bool."""

    model_config = ConfigDict(strict=True)
    queries: list[str]
    topk: int | None = None
    return_scores: bool = False


def create_app(retriever: Retriever, limits: ServerLimits | None = None):
    """Build the FastAPI app serving ``retriever`` (``GET /health``, ``POST /retrieve``)."""
    from fastapi import HTTPException

    limits = limits or ServerLimits()
    lock = threading.Lock()  # one search at a time: backends are not promised to be thread-safe

    app = json_app("SAGE retrieval server", "detail",
                   limits.max_body_bytes or body_limit_for(limits.max_queries * limits.max_query_chars),
                   description="Search-R1 /retrieve protocol")

    @app.get("/health")
    def health():
        return {"status": "ok", "backend": retriever.name, "limits": vars(limits)}

    @app.post("/retrieve")
    def retrieve(request: RetrieveRequest):
        if len(request.queries) > limits.max_queries:
            raise HTTPException(422, f"too many queries: {len(request.queries)} > max_queries={limits.max_queries}")
        for i, q in enumerate(request.queries):
            if len(q) > limits.max_query_chars:
                raise HTTPException(422, f"query {i} is {len(q)} characters long; "
                                         f"max_query_chars={limits.max_query_chars}")
        topk = limits.default_topk if request.topk is None else request.topk
        if not 1 <= topk <= limits.max_topk:
            raise HTTPException(422, f"topk must be between 1 and {limits.max_topk}, got {request.topk}")
        with lock:
            hits = retriever.search(request.queries, topk)
        if request.return_scores:
            result = [[{"document": p.to_document(), "score": p.score} for p in row] for row in hits]
        else:
            result = [[p.to_document() for p in row] for row in hits]
        return {"result": result}

    return app


def serve(retriever: Retriever, host: str = "127.0.0.1", port: int = 8000, limits: ServerLimits | None = None,
          log_level: str = "info") -> None:
    """Serve ``retriever`` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(retriever, limits), host=host, port=port, log_level=log_level)
