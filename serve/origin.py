"""Cross-origin writes refused: an ASGI middleware.

A web page on any site can make a browser POST to this service (a form post or a simple `fetch`
needs no CORS preflight), and the browser names that page's origin in the `Origin` header. So a
write (POST, PUT, PATCH, DELETE) whose `Origin` is present and is neither this service's own
origin (the scheme and the `Host` it was reached at, i.e. its own web page) nor one that
`allow_origin` names is answered 403 before anything is read. Requests without `Origin` (curl,
scripts, other services) and reads pass.
"""
from __future__ import annotations

from typing import Callable, Sequence
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from serve.errors import error_response

WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize(origin: str) -> str | None:
    """'HTTP://Host:80' -> 'http://host'; None if it is not scheme://host[:port] (e.g. 'null')."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/") or parts.query:
        return None
    host = parts.hostname.lower()
    if ":" in host:  # IPv6
        host = f"[{host}]"
    return f"{parts.scheme}://{host}" + (f":{port}" if port and port != DEFAULT_PORTS[parts.scheme] else "")


def parse_allowed(value: str) -> list[str]:
    """`allow_origin` (comma-separated origins) -> normalized origins; ValueError naming a bad one."""
    out = []
    for item in filter(None, (v.strip() for v in value.split(","))):
        origin = normalize(item)
        if origin is None:
            raise ValueError(f"--allow-origin {item!r} is not an origin (scheme://host[:port], e.g. "
                             "http://localhost:3000)")
        out.append(origin)
    return out


class SameOrigin:
    """`allowed()` gives the extra origins (normalized), asked at each request."""

    def __init__(self, app: ASGIApp, allowed: Callable[[], Sequence[str]]):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in WRITES:
            headers = dict(scope["headers"])
            origin = headers.get(b"origin")
            if origin is not None:
                origin = origin.decode("latin-1")
                host = headers.get(b"host", b"").decode("latin-1")
                own = normalize(f"{scope.get('scheme', 'http')}://{host}") if host else None
                seen = normalize(origin)
                if seen is None or (seen != own and seen not in self.allowed()):
                    response = error_response(403, f"cross-origin {scope['method']} from {origin!r} refused; "
                                                   "start the service with --allow-origin ORIGIN to allow it")
                    return await response(scope, receive, send)
        await self.app(scope, receive, send)
