"""Errors as HTTP answers: typed exceptions raised anywhere, one handler that writes the JSON.

Every answer other than 2xx is `{"error": message, **extra}`. Code raises `ApiError(status,
message)` where it finds the problem, in the ingress or inside a model replica: Serve hands an
exception raised in a replica to its caller as a `RayTaskError` (an instance of the original class
too), which `json_error` unwraps. A bad image (`ImageInputError`, from jobs.images) is a 422
wherever it is raised, an image in a format not accepted (`UnsupportedImageFormat`) a 415. Serve's
own overload and failure errors on a call from the ingress to a replica become 503 + Retry-After in
`answer`.
"""
from __future__ import annotations

import logging
from typing import Awaitable, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.exceptions import HTTPException

from jobs.images import ImageInputError

log = logging.getLogger("ray.serve")
T = TypeVar("T")


class ApiError(HTTPException):
    """An answer `status` with {"error": message, **extra} (and `headers`). Raise it anywhere.

    A Starlette `HTTPException`, so FastAPI passes it through unchanged even from inside its own
    body parsing (the body limit raises it there).
    """

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, **extra):
        super().__init__(status, message, headers)
        self.extra = extra

    def __reduce__(self):  # crosses Ray from a replica: rebuild with the same arguments
        return _rebuild, (type(self), self.status_code, self.detail, self.headers, self.extra)


class Unavailable(ApiError):
    """503: a replica or queue cannot take the request now; `retry_after` seconds go in Retry-After."""

    def __init__(self, message: str, retry_after: int = 5, **extra):
        super().__init__(503, message, {"Retry-After": str(retry_after)}, **extra)


def _rebuild(cls, status, message, headers, extra):
    e = ApiError.__new__(cls)
    ApiError.__init__(e, status, message, headers, **extra)
    return e


def error_response(status: int, message: str, headers: dict[str, str] | None = None, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


async def json_error(request: Request, e: Exception) -> JSONResponse:
    """The one exception handler: any exception -> its JSON answer (a bug: 500, logged)."""
    if isinstance(e, RayTaskError):  # raised in a replica
        e = e.cause
    if isinstance(e, ApiError):
        return error_response(e.status_code, e.detail, e.headers, **e.extra)
    if isinstance(e, HTTPException):  # Starlette's own: 404 route, 405 method, 400 malformed multipart
        return error_response(e.status_code, str(e.detail), getattr(e, "headers", None))
    if isinstance(e, RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(422, f"{where}: {first.get('msg', 'invalid request')}")
    if isinstance(e, ImageInputError):  # 422, or 415 for a format not accepted (UnsupportedImageFormat)
        return error_response(e.status, str(e))
    # not the client's fault: still JSON, and the replica keeps serving
    log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=e)
    return error_response(500, f"internal error ({type(e).__name__})")


HANDLED = (ApiError, HTTPException, RequestValidationError, ImageInputError, RayTaskError, Exception)


async def answer(what: str, call: Awaitable[T]) -> T:
    """Await a call to a deployment; Serve's own refusals become 503s that name `what`."""
    try:
        return await call
    except BackPressureError:
        raise Unavailable(f"{what}: at capacity; retry shortly", retry_after=1) from None
    except (RayActorError, DeploymentUnavailableError) as e:
        raise Unavailable(f"{what}: unavailable ({type(e).__name__}); retry shortly") from None


class _QuietClientErrors(logging.Filter):
    """Drops Serve's "Request failed." traceback when a replica refused a request on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        e = record.exc_info[1] if record.exc_info else None
        return not isinstance(e, (ApiError, ImageInputError))


def quiet_client_errors() -> None:
    """Call in a replica's constructor: a client's bad input is answered, not logged as a failure."""
    logger = logging.getLogger("ray.serve")
    if not any(isinstance(f, _QuietClientErrors) for f in logger.filters):
        logger.addFilter(_QuietClientErrors())
