"""What the HTTP servers (`sage serve`, `sage retriever serve`) share so that no client mistake is a 5xx:
a JSON encoder that encodes any reply (lone surrogates, NaN), a request-size limit enforced before a
body is read, and error handlers that answer in one JSON message without echoing the bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse


def jsonable(value: Any) -> Any:
    """``value`` with numpy scalars/arrays, tuples, sets and paths turned into JSON types (others: ``str``);
    a non-finite float becomes its string (``"nan"``), which strict JSON can hold."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return jsonable(value.tolist())
    return str(value)


class SafeJSONResponse(JSONResponse):
    """Strict JSON that encodes every Python value a handler can return: ASCII output (a lone surrogate such as
    ``"\\ud800"`` becomes its escape, which JSON allows and clients decode back), non-finite floats as strings."""

    def render(self, content: Any) -> bytes:
        return json.dumps(jsonable(content), ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def body_limit_for(max_chars: int) -> int:
    """A body limit with room for ``max_chars`` characters in any JSON escaping (12 bytes each, a surrogate
    pair written as two \\uXXXX escapes) plus 64 KiB for the rest of the request."""
    return 12 * max_chars + 65_536


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` is refused with 413 before it is read, by its
    Content-Length at once, or (chunked) as soon as the bytes received pass the limit."""

    def __init__(self, app, max_bytes: int, key: str):
        self.app, self.max_bytes, self.key = app, max_bytes, key

    def _too_large(self, size: str) -> str:
        return (f"the request body is {size}; this server accepts at most {self.max_bytes} bytes "
                "(--max-body-bytes)")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = SafeJSONResponse({self.key: self._too_large(f"{int(declared)} bytes")}, status_code=413)
            return await response(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # the route's exception handlers turn this into the 413 reply
                    raise HTTPException(413, self._too_large(f"over {self.max_bytes} bytes"))
            return message

        await self.app(scope, limited, send)


def json_app(title: str, key: str, max_body_bytes: int, **kwargs: Any):
    """A FastAPI app whose replies and errors are ``SafeJSONResponse``s: ``{key: message}`` with a 4xx status
    for every client mistake (422 malformed, 413 too large), 500 only for a server fault."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError

    app = FastAPI(title=title, default_response_class=SafeJSONResponse, **kwargs)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, key=key)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError):
        problems = []
        for e in err.errors():  # the inputs are not echoed: they may be huge, NaN or not encodable
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
            problems.append(f"{where}: {e.get('msg')}")
        return SafeJSONResponse({key: f"invalid request to {request.method} {request.url.path}: "
                                      + "; ".join(problems)}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        return SafeJSONResponse({key: str(err.detail)}, status_code=err.status_code, headers=err.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception):
        return SafeJSONResponse({key: f"internal error: {type(err).__name__}: {err}"}, status_code=500)

    return app
