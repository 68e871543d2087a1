"""The request-size limit, enforced before a body is buffered: an ASGI middleware.

A declared Content-Length over the limit is answered 413 at once, without reading the body. A
streamed (chunked) body is counted as it arrives: the read that crosses the limit raises a 413
`ApiError` inside whatever is reading (FastAPI's form parser, `Request.body`), and the app's
exception handler answers it.
"""
from __future__ import annotations

from typing import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.errors import ApiError, error_response


class BodyLimit:
    """`limit()` gives the largest body in bytes, asked at each request (None: no limit)."""

    def __init__(self, app: ASGIApp, limit: Callable[[], int | None]):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.limit() if scope["type"] == "http" else None
        if limit is None:
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            response = error_response(413, f"body of {int(declared)} bytes is over the limit of {limit} bytes")
            return await response(scope, receive, send)
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise ApiError(413, f"body is over the limit of {limit} bytes")
            return message

        await self.app(scope, counted, send)
