"""A small OpenAI-compatible HTTP server over any ``Policy`` (``/v1/chat/completions``, ``/v1/models``).

It lets ``openai:NAME`` clients (and other tools) talk to a local transformers model, and is
the real endpoint the tests use. Requests are served one generate call at a time (a lock);
it is a convenience server, not a throughput engine (use vLLM for that).

    uvicorn-style:  python -m sage_models.server MODEL_SPEC --port 8000
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

from pydantic import BaseModel

from sage_models.policy import EOS, PROMPT_TOO_LONG, STOP, Decoding, Policy


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(BaseModel):
    model: str
    messages: list[ChatMessage]
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1


def create_app(policy: Policy, model_name: str | None = None, max_tokens: int = 4096):
    """The FastAPI app serving ``policy`` under ``model_name`` (default: the policy's name)."""
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import JSONResponse

    name = model_name or policy.name
    app = FastAPI(title="SAGE OpenAI-compatible model server")
    lock = threading.Lock()

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "sage"}]}

    @app.post("/v1/chat/completions")
    def chat(req: ChatRequest) -> dict[str, Any]:
        if req.model != name:
            raise HTTPException(404, f"model {req.model!r} is not served here; this server serves {name!r}")
        if req.n != 1:
            raise HTTPException(400, "only n=1 is supported")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        decoding = Decoding(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                            max_new_tokens=req.max_tokens or max_tokens, seed=req.seed)
        conversation = [m.model_dump() for m in req.messages]
        with lock:
            g = policy.generate([conversation], decoding, stop, seeds=[req.seed or 0])[0]
        if g.finish_reason == PROMPT_TOO_LONG:  # OpenAI's answer to a prompt longer than the context
            context = getattr(policy, "max_context", None)
            return JSONResponse(status_code=400, content={"error": {
                "message": f"This model's maximum context length is {context} tokens; the messages take "
                           f"{g.n_prompt_tokens}.", "type": "invalid_request_error", "code": "context_length_exceeded"}})
        # OpenAI's finish_reason has no eos or context: both map onto its own words; stop_reason as vLLM sends it
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()), "model": name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": g.text},
                         "finish_reason": "stop" if g.finish_reason in (STOP, EOS) else "length",
                         "stop_reason": next((s for s in stop if g.text.endswith(s)), None)
                         if g.finish_reason == STOP else None}],
            "usage": {"prompt_tokens": g.n_prompt_tokens, "completion_tokens": g.n_completion_tokens,
                      "total_tokens": g.n_prompt_tokens + g.n_completion_tokens},
        }

    return app


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, name: str | None = None) -> None:
    """Load ``model`` (any ``load_policy`` spec) and serve it until interrupted."""
    import uvicorn

    from sage_models import load_policy

    policy = load_policy(model)
    uvicorn.run(create_app(policy, name or model), host=host, port=port, log_level="warning")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--name", default=None, help="model name clients send (default: the spec)")
    args = parser.parse_args()
    serve(args.model, args.host, args.port, args.name)
