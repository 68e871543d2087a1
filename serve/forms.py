"""What the routes take from a request beyond FastAPI's own parameters.

FastAPI parses multipart bodies into the `File`/`Form` parameters of each route (and documents
them in /openapi.json); two rules of this API are not expressible there: an image route also takes
the image as the raw body, and a multipart form may hold only the route's fields, each once.
"""
# no `from __future__ import annotations`: Serve ships the app to replicas with cloudpickle, which
# keeps only the globals a function's code uses, so FastAPI could not resolve `check`'s "Request"
from typing import Callable

from fastapi import Request, UploadFile

from serve.errors import ApiError

# documents the raw-body alternative next to the multipart form FastAPI generates
RAW_IMAGE = {"requestBody": {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


def is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


def form_fields(*names: str, raw: bool = False) -> Callable:
    """A route dependency: a multipart form holds only `names`, each once (else 422). Without `raw`,
    the request must be multipart (an empty body: 400, another content type: 415)."""
    expected = ", ".join(map(repr, names))

    async def check(request: Request) -> None:
        if not is_multipart(request):
            if raw:
                return
            try:
                empty = not await request.body()
            except RuntimeError:  # FastAPI read it already for the Form parameters (a url-encoded form)
                empty = False
            if empty:
                raise ApiError(400, f"empty body: send multipart/form-data with fields {expected}")
            raise ApiError(415, f"send multipart/form-data with fields {expected}")
        form = await request.form()  # parsed already, for the route's parameters
        unknown = sorted(set(form.keys()) - set(names))
        if unknown:
            raise ApiError(422, f"unknown form field(s) {', '.join(map(repr, unknown))}; expected {expected}")
        repeated = sorted(k for k in set(form.keys()) if len(form.getlist(k)) > 1)
        if repeated:
            raise ApiError(422, f"form field(s) {', '.join(map(repr, repeated))} given more than once")

    return check


async def file_bytes(upload: UploadFile, name: str) -> bytes:
    """An uploaded file's bytes; 400 if it is empty."""
    data = await upload.read()
    if not data:
        raise ApiError(400, f"file {name!r} is empty")
    return data


async def image_bytes(request: Request, upload: UploadFile | None, name: str) -> bytes:
    """The image of a route that takes a raw body or the multipart file field `name`; 400 if empty."""
    if upload is not None:
        return await file_bytes(upload, name)
    if is_multipart(request):
        raise ApiError(422, f"missing file field {name!r}")
    try:
        data = await request.body()
    except RuntimeError:  # FastAPI read it already for the Form parameters: a url-encoded form holds no image
        if request.headers.get("content-length", "").strip() == "0":
            raise ApiError(400, "empty body: send an image") from None
        raise ApiError(415, f"send the image as the raw body or as the multipart/form-data file field {name!r}, "
                            "not as a url-encoded form") from None
    if not data:
        raise ApiError(400, "empty body: send an image")
    return data
