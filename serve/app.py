"""The HTTP front: a FastAPI ingress routing to ClassifierDeployment and StylePool, and `build_app`.

Routes (OpenAPI at /docs):
    GET  /                          the web page (serve/page.py)
    GET  /healthz                   what is served, job counts
    POST /classify                  image (raw body or multipart `file`) -> {"label", "score", "probabilities"}
    POST /style/jobs                multipart `content`, `style`, optional `options` (JSON) -> 202 {"id", ...}
    GET  /style/jobs/{id}           status, attempt, progress (step, steps, content, style, tv losses)
    GET  /style/jobs/{id}/result    the PNG once done (409 before)
    DELETE /style/jobs/{id}         cancel
    POST /style                     like /style/jobs but waits: PNG, or 408 past sync_timeout_s
    GET  /styles                    the trained style networks served (registry `fast_styles`)
    GET  /styles/{name}/image       a style's style image (JPEG thumbnail)
    POST /style/fast?style=NAME     image (raw body, or multipart `image` + text `style`) -> PNG, one forward pass

Every client mistake is a 4xx with {"error": "..."}; the ingress checks sizes and images before
anything reaches a model replica. Style jobs are driven from here: see `Ingress._drive`.
"""

import asyncio
import dataclasses
import json
import logging
import os
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from jobs.cli import UserError
from jobs.style import ImageInputError, StyleConfig, load_image
from serve.classifier import ClassifierDeployment
from serve.config import ServeConfig, config_from_dict
from serve.fast_style import FastStylePool
from serve.job_store import get_or_create_store
from serve.page import PAGE
from serve.style_pool import StylePool

log = logging.getLogger("ray.serve")

# what a client may set on a style job; the server fixes weights, device and pixel limits
STYLE_INT_OPTIONS = {"steps", "seed", "lr_decay_steps", "lbfgs_history"}
STYLE_FLOAT_OPTIONS = {"content_weight", "style_weight", "tv_weight", "lr", "lr_gamma", "lbfgs_lr"}
STYLE_OTHER_OPTIONS = {"size", "scales", "optimizer", "init", "precision", "content_layers", "style_layers"}
STYLE_OPTIONS = STYLE_INT_OPTIONS | STYLE_FLOAT_OPTIONS | STYLE_OTHER_OPTIONS


class ApiError(Exception):
    """A client error: answered as `status` with {"error": message} (and optional headers)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.headers, self.extra = status, message, headers, extra


def error_response(status: int, message: str, headers: dict[str, str] | None = None, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


app = FastAPI(
    title="raycv",
    version="0.1.0",
    description="The fine-tuned image classifier (dynamically batched) and a pool of neural "
                "style-transfer workers (asynchronous jobs with progress), on Ray Serve.",
)


@app.exception_handler(ApiError)
async def _api_error(request: Request, e: ApiError) -> JSONResponse:
    return error_response(e.status, e.message, e.headers, **e.extra)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    first = e.errors()[0] if e.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    return error_response(422, f"{where}: {first.get('msg', 'invalid request')}")


@app.exception_handler(Exception)
async def _unexpected(request: Request, e: Exception) -> JSONResponse:
    # a bug, not the client's fault: still JSON, and the replica keeps serving
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response(500, f"internal error ({type(e).__name__})")


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    return error_response(e.status_code, str(e.detail), getattr(e, "headers", None))


# ----------------------------------------------------------------------------- request bodies


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 past `limit` bytes (declared or streamed) and 400 if empty."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"body of {int(declared)} bytes is over the limit of {limit} bytes")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise ApiError(413, f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    if n == 0:
        raise ApiError(400, "empty body: send an image")
    return b"".join(chunks)


async def read_form(request: Request, body: bytes, files: tuple[str, ...], fields: tuple[str, ...] = ()) -> dict:
    """Parse a multipart body: {name: bytes for file fields, str for text fields}; others -> 422."""

    async def once():
        yield body

    parser = MultiPartParser(request.headers, once(), max_files=len(files) + 2, max_fields=len(fields) + 2,
                             max_part_size=64 * 1024)
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise ApiError(400, f"malformed multipart body: {e.message}") from None
    try:
        allowed = set(files) | set(fields)
        unknown = sorted(set(form.keys()) - allowed)
        if unknown:
            expected = ", ".join(repr(f) for f in files + fields)
            raise ApiError(422, f"unknown form field(s) {', '.join(map(repr, unknown))}; expected {expected}")
        out: dict[str, Any] = {}
        for name, value in form.multi_items():
            if name in out:
                raise ApiError(422, f"form field {name!r} given more than once")
            if name in files:
                if not isinstance(value, UploadFile):
                    raise ApiError(422, f"form field {name!r} must be a file upload")
                out[name] = await value.read()
                if not out[name]:
                    raise ApiError(400, f"file {name!r} is empty")
            else:
                if isinstance(value, UploadFile):
                    raise ApiError(422, f"form field {name!r} must be text, not a file")
                out[name] = value
        missing = [f for f in files if f not in out]
        if missing:
            raise ApiError(422, f"missing file field(s) {', '.join(map(repr, missing))}")
        return out
    finally:
        await form.close()


def is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


def style_job_config(options: Any, cfg: ServeConfig, sync: bool) -> dict:
    """Client options -> the full `StyleConfig` dict for a job, or ApiError(422) naming the problem."""
    if not isinstance(options, dict):
        raise ApiError(422, "options must be a JSON object")
    unknown = sorted(set(options) - STYLE_OPTIONS)
    if unknown:
        raise ApiError(422, f"unknown option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(STYLE_OPTIONS))}")
    for k, v in options.items():
        if k in STYLE_INT_OPTIONS and (not isinstance(v, int) or isinstance(v, bool)):
            raise ApiError(422, f"option {k} must be an integer, got {v!r}")
        if k in STYLE_FLOAT_OPTIONS and (not isinstance(v, (int, float)) or isinstance(v, bool)):
            raise ApiError(422, f"option {k} must be a number, got {v!r}")
        if k in ("size", "scales", "content_layers", "style_layers") and not (
                isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
            raise ApiError(422, f"option {k} must be a list of numbers, got {v!r}")
        if k in ("size", "content_layers", "style_layers") and any(x != int(x) for x in v):
            raise ApiError(422, f"option {k} must hold integers, got {v!r}")
    try:
        sc = StyleConfig(**{**options, "weights": cfg.style_weights, "device": "cpu", "max_pixels": cfg.max_pixels})
        sc.validate()
    except UserError as e:
        raise ApiError(422, str(e)) from None
    except (TypeError, ValueError) as e:
        raise ApiError(422, f"bad options: {e}") from None
    if sc.steps > cfg.style_max_steps:
        raise ApiError(422, f"steps {sc.steps} is over this server's limit of {cfg.style_max_steps}")
    pixels = sc.size[0] * sc.size[1]
    limit = cfg.sync_max_size if sync else cfg.style_max_size
    if pixels > limit:
        hint = "; use POST /style/jobs for larger images" if sync else ""
        raise ApiError(422, f"size {sc.size[0]}x{sc.size[1]} = {pixels} pixels is over the limit of {limit}{hint}")
    return dataclasses.asdict(sc)


# ----------------------------------------------------------------------------- the ingress


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(app)
class Ingress:
    """Checks and routes requests; drives style jobs (submission, replica-death retries, heartbeat)."""

    def __init__(self, classifier: DeploymentHandle, style: DeploymentHandle | None, cfg: dict,
                 fast: DeploymentHandle | None = None):
        self.cfg = ServeConfig(**cfg)
        self.classifier = classifier
        self.style = style
        self.fast = fast  # FastStylePool: trained style networks, multiplexed by style name
        self.store = None
        if style is not None:
            c = self.cfg
            self.store = get_or_create_store(c.job_store_name, c.max_style_jobs, c.job_lease_s, c.job_ttl_s,
                                             c.job_max_attempts)
            # it may predate this deployment (detached): apply this config's limits
            ray.get(self.store.configure.remote(c.max_style_jobs, c.job_lease_s, c.job_ttl_s, c.job_max_attempts))
        self.driving: dict[str, asyncio.Task] = {}  # job id -> the task driving it through the pool
        self.heartbeat: asyncio.Task | None = None

    # ---------------------------------------------------------------- page and health

    @app.get("/", response_class=HTMLResponse, summary="The web page: classify an image, stylize one")
    async def page(self) -> HTMLResponse:
        return HTMLResponse(PAGE)

    @app.get("/healthz", summary="Liveness: what is served and the style queue")
    async def healthz(self) -> dict:
        try:
            classifier = await self.classifier.info.remote()
        except (RayActorError, DeploymentUnavailableError, BackPressureError) as e:
            raise ApiError(503, f"classifier unavailable: {type(e).__name__}") from None
        out = {"status": "ok", "classifier": classifier}
        if self.store is not None:
            out["style"] = {"weights": self.cfg.style_weights, **await self.store.stats.remote()}
        return out

    # ---------------------------------------------------------------- classifier

    @app.post("/classify", summary="Classify one image (raw body or multipart field `file`)",
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                  "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
                      "file": {"type": "string", "format": "binary"}}}}}}},
              responses={200: {"description": '{"label": str, "score": float, "probabilities": {class: float}}'},
                         400: {"description": "empty or malformed body"}, 413: {"description": "body too large"},
                         422: {"description": "not a usable image, or wrong form field"},
                         503: {"description": "classifier queue full (Retry-After)"}})
    async def classify(self, request: Request) -> dict:
        body = await read_body(request, self.cfg.max_body_bytes)
        data = (await read_form(request, body, files=("file",)))["file"] if is_multipart(request) else body
        try:
            out = await self.classifier.classify.remote(data)
        except BackPressureError:
            raise ApiError(503, "classifier is at capacity; retry shortly", {"Retry-After": "1"}) from None
        except (RayActorError, DeploymentUnavailableError) as e:
            raise ApiError(503, f"classifier unavailable ({type(e).__name__}); retry shortly",
                           {"Retry-After": "5"}) from None
        if "error" in out:
            raise ApiError(out["status"], out["error"])
        return out

    # ---------------------------------------------------------------- style jobs

    @app.post("/style/jobs", status_code=202, summary="Submit a style-transfer job (202 + id)",
              openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                  "type": "object", "required": ["content", "style"], "properties": {
                      "content": {"type": "string", "format": "binary"},
                      "style": {"type": "string", "format": "binary"},
                      "options": {"type": "string", "description": "JSON object, e.g. "
                                  '{"size": [300, 450], "steps": 500, "style_weight": 1000}'}}}}}}},
              responses={202: {"description": '{"id", "status", "url", "result_url"}'},
                         503: {"description": "queue full: Retry-After says when to try again"}})
    async def submit_job(self, request: Request) -> JSONResponse:
        job_id = await self._submit(request, sync=False)
        url = f"/style/jobs/{job_id}"
        return JSONResponse({"id": job_id, "status": "queued", "url": url, "result_url": f"{url}/result"},
                            status_code=202, headers={"Location": url})

    @app.get("/style/jobs/{job_id}", summary="A job's status and progress (step, losses)")
    async def get_job(self, job_id: str) -> dict:
        job = await self._store().get.remote(job_id)
        if job is None:
            raise ApiError(404, f"no style job {job_id!r} (unknown or expired)")
        return job

    @app.get("/style/jobs/{job_id}/result", summary="The finished job's image (PNG)",
             responses={200: {"content": {"image/png": {}}}, 409: {"description": "not done (yet)"}})
    async def get_result(self, job_id: str) -> Response:
        status, png = await self._store().result.remote(job_id)
        if status is None:
            raise ApiError(404, f"no style job {job_id!r} (unknown or expired)")
        if status != "done":
            raise ApiError(409, f"job {job_id} is {status}, no result", job_status=status)
        return Response(png, media_type="image/png")

    @app.delete("/style/jobs/{job_id}", summary="Cancel a queued or running job")
    async def cancel_job(self, job_id: str) -> dict:
        job = await self._store().cancel.remote(job_id)
        if job is None:
            raise ApiError(404, f"no style job {job_id!r} (unknown or expired)")
        return job

    @app.post("/style", summary="Stylize a small image and wait for the PNG (408 past the timeout)",
              openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                  "type": "object", "required": ["content", "style"], "properties": {
                      "content": {"type": "string", "format": "binary"},
                      "style": {"type": "string", "format": "binary"},
                      "options": {"type": "string", "description": "JSON object of style options"}}}}}}},
              responses={200: {"content": {"image/png": {}}}, 408: {"description": "not done within the timeout"}})
    async def style_sync(self, request: Request) -> Response:
        job_id = await self._submit(request, sync=True)
        try:
            await asyncio.wait_for(asyncio.shield(self.driving[job_id]), self.cfg.sync_timeout_s)
        except asyncio.TimeoutError:
            await self.store.cancel.remote(job_id)
            raise ApiError(408, f"not finished within {self.cfg.sync_timeout_s:g} s (cancelled); "
                                "use POST /style/jobs for long jobs", job=job_id) from None
        except KeyError:  # the drive task already finished and removed itself
            pass
        status, png = await self.store.result.remote(job_id)
        if status == "done":
            return Response(png, media_type="image/png", headers={"X-Job-Id": job_id})
        job = await self.store.get.remote(job_id) or {}
        if job.get("error_kind") == "input":
            raise ApiError(422, job["error"], job=job_id)
        raise ApiError(503, f"style job {status}: {job.get('error')}", {"Retry-After": "5"}, job=job_id)

    # ---------------------------------------------------------------- real-time style (trained networks)

    def _fast(self) -> DeploymentHandle:
        if self.fast is None:
            raise ApiError(404, "real-time style transfer is not enabled on this server (start it with --fast-styles DIR)")
        return self.fast

    @app.get("/styles", summary="The trained styles served by POST /style/fast")
    async def list_styles(self) -> dict:
        if self.fast is None:
            return {"styles": []}
        try:
            return {"styles": await self.fast.styles.remote()}
        except (RayActorError, DeploymentUnavailableError, BackPressureError) as e:
            raise ApiError(503, f"style networks unavailable ({type(e).__name__}); retry shortly",
                           {"Retry-After": "5"}) from None

    @app.get("/styles/{name}/image", summary="A style's style image (JPEG thumbnail)",
             responses={200: {"content": {"image/jpeg": {}}}})
    async def style_image(self, name: str) -> Response:
        data = await self._fast().thumbnail.remote(name)
        if data is None:
            raise ApiError(404, f"no style image for {name!r}")
        return Response(data, media_type="image/jpeg")

    @app.post("/style/fast", summary="Stylize an image with a trained style network (one forward pass) -> PNG",
              openapi_extra={"parameters": [{"name": "style", "in": "query", "required": False,
                                             "schema": {"type": "string"}, "description": "style name (GET /styles)"}],
                             "requestBody": {"required": True, "content": {
                                 "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                                 "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
                                     "image": {"type": "string", "format": "binary"},
                                     "style": {"type": "string"}}}}}}},
              responses={200: {"content": {"image/png": {}}}, 404: {"description": "unknown style"},
                         422: {"description": "not a usable image, or no style named"}})
    async def style_fast(self, request: Request) -> Response:
        fast = self._fast()
        body = await read_body(request, self.cfg.max_body_bytes)
        name = request.query_params.get("style")
        if is_multipart(request):
            form = await read_form(request, body, files=("image",), fields=("style",))
            if name and form.get("style") and form["style"] != name:
                raise ApiError(422, "style given twice (query and form) with different values")
            body, name = form["image"], name or form.get("style")
        if not name:
            raise ApiError(422, "name a style: ?style=NAME or the form field 'style' (GET /styles lists them)")
        try:
            out = await fast.options(multiplexed_model_id=name).stylize.remote(body)
        except BackPressureError:
            raise ApiError(503, "style networks are at capacity; retry shortly", {"Retry-After": "1"}) from None
        except (RayActorError, DeploymentUnavailableError) as e:
            raise ApiError(503, f"style networks unavailable ({type(e).__name__}); retry shortly",
                           {"Retry-After": "5"}) from None
        if "error" in out:
            raise ApiError(out["status"], out["error"])
        return Response(out["png"], media_type="image/png",
                        headers={"X-Style": name, "X-Inference-Ms": f"{out['ms']:.1f}"})

    # ---------------------------------------------------------------- job plumbing

    def _store(self):
        if self.store is None:
            raise ApiError(404, "style transfer is not enabled on this server")
        return self.store

    async def _submit(self, request: Request, sync: bool) -> str:
        """Check the request, create the job (or 503 when the queue is full), start driving it."""
        store = self._store()
        body = await read_body(request, self.cfg.max_body_bytes)
        if not is_multipart(request):
            raise ApiError(415, "send multipart/form-data with files 'content' and 'style' (and 'options')")
        form = await read_form(request, body, files=("content", "style"), fields=("options",))
        try:
            options = json.loads(form.get("options") or "{}")
        except ValueError as e:
            raise ApiError(422, f"options is not valid JSON: {e}") from None
        job_cfg = style_job_config(options, self.cfg, sync)
        for name in ("content", "style"):  # decode now: a bad image is a 422 here, not a failed job later
            try:
                await asyncio.to_thread(load_image, form[name], self.cfg.max_pixels, f"{name} image")
            except ImageInputError as e:
                raise ApiError(422, str(e)) from None
        made = await store.create.remote(options, self.cfg.style_replicas)
        if made.get("full"):
            raise ApiError(503, f"style queue is full ({made['active']} jobs queued or running); retry later",
                           {"Retry-After": str(made["retry_after"])})
        job_id = made["id"]
        self.driving[job_id] = asyncio.create_task(self._drive(job_id, form["content"], form["style"], job_cfg))
        if self.heartbeat is None or self.heartbeat.done():
            self.heartbeat = asyncio.create_task(self._heartbeat())
        return job_id

    async def _drive(self, job_id: str, content: bytes, style: bytes, job_cfg: dict) -> None:
        """Send the job to the pool until an attempt ends; a dead replica means retry (or fail).

        Serve routes each call to a free replica (one job per replica) and queues the rest. If the
        replica dies mid-job the call raises RayActorError: the store requeues the job with
        attempt + 1, up to `job_max_attempts`, then marks it failed. The replica itself records
        done/failed in the store, so this task needs no result.
        """
        attempt = 1
        try:
            while True:
                try:
                    await self.style.run.remote(job_id, attempt, content, style, job_cfg)
                    return
                except (RayActorError, DeploymentUnavailableError) as e:
                    log.warning("style job %s attempt %d lost its replica: %s", job_id, attempt, type(e).__name__)
                    if not await self.store.retry.remote(job_id, f"replica died ({type(e).__name__})"):
                        return
                    attempt += 1
                except Exception as e:  # noqa: BLE001 - anything else fails this job only
                    log.exception("style job %s: unexpected error", job_id)
                    await self.store.fail.remote(job_id, attempt, f"{type(e).__name__}: {str(e)[:200]}")
                    return
        finally:
            self.driving.pop(job_id, None)

    async def _heartbeat(self) -> None:
        """Tell the store which jobs this ingress still drives, so only orphans get reaped."""
        period = max(0.5, min(10.0, self.cfg.job_lease_s / 4))
        while self.driving:
            try:
                await self.store.touch.remote(list(self.driving))
            except RayActorError:
                log.warning("job store unreachable")
            await asyncio.sleep(period)


# ----------------------------------------------------------------------------- the application


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """Serve application builder (`import_path: serve.app:build_app`, `args:` = ServeConfig fields)."""
    cfg = config_from_dict(args)
    if not os.path.isdir(cfg.classifier):
        raise UserError(f"classifier artifact {cfg.classifier} is not a directory")
    gpu = {"num_gpus": cfg.classifier_gpus} if cfg.classifier_gpus else {}
    knobs = {"max_batch_size": cfg.max_batch_size, "batch_wait_timeout_s": cfg.batch_wait_timeout_s,
             "max_pixels": cfg.max_pixels, "precision": cfg.classifier_precision}
    classifier = ClassifierDeployment.options(
        num_replicas=cfg.classifier_replicas,
        max_ongoing_requests=max(cfg.classifier_max_ongoing, cfg.max_batch_size),  # else batches never fill
        max_queued_requests=cfg.classifier_max_queued,
        ray_actor_options={"num_cpus": cfg.classifier_cpus, **gpu},
        # the artifact and batching live in user_config: a config that changes only them (serve deploy
        # with a `deployments:` override) reconfigures the running replicas, no restart
        user_config={"artifact": os.path.abspath(cfg.classifier), **knobs},
    ).bind(threads=max(1, round(cfg.classifier_cpus)), use_gpu=cfg.classifier_gpus > 0, defaults=knobs)
    style = None
    if cfg.style:
        if cfg.style_max_replicas > cfg.style_replicas:
            scaling = {"autoscaling_config": {"min_replicas": cfg.style_replicas, "max_replicas": cfg.style_max_replicas,
                                              "target_ongoing_requests": 1}}
        else:
            scaling = {"num_replicas": cfg.style_replicas}
        gpu = {"num_gpus": cfg.style_gpus} if cfg.style_gpus else {}
        style = StylePool.options(
            **scaling, max_ongoing_requests=1, ray_actor_options={"num_cpus": cfg.style_cpus, **gpu},
        ).bind(weights=cfg.style_weights, device=cfg.style_device, threads=max(1, round(cfg.style_cpus)),
               store=[cfg.job_store_name, cfg.max_style_jobs, cfg.job_lease_s, cfg.job_ttl_s, cfg.job_max_attempts])
    fast = None
    if cfg.fast_styles:
        gpu = {"num_gpus": cfg.fast_style_gpus} if cfg.fast_style_gpus else {}
        fast = FastStylePool.options(
            num_replicas=cfg.fast_style_replicas, ray_actor_options={"num_cpus": cfg.fast_style_cpus, **gpu},
        ).bind(registry=os.path.abspath(cfg.fast_styles), threads=max(1, round(cfg.fast_style_cpus)),
               use_gpu=cfg.fast_style_gpus > 0, max_side=cfg.fast_style_max_side, max_pixels=cfg.max_pixels,
               precision=cfg.fast_style_precision)
    return Ingress.options(max_ongoing_requests=cfg.ingress_max_ongoing, ray_actor_options={"num_cpus": cfg.ingress_cpus},
                           ).bind(classifier, style, dataclasses.asdict(cfg), fast)
