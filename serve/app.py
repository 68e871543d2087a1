"""The HTTP front: a FastAPI ingress routing to ClassifierDeployment, StylePool and FastStylePool,
and `build_app`, which wires them from a ServeConfig.

Routes (OpenAPI at /docs, generated from the signatures below):
    GET  /                          the web page (serve/page.py)
    GET  /healthz                   liveness: what is served (artifact name + content hash, no paths), job counts
    GET  /readyz                    readiness: 200 once every deployment has a replica that loaded its model and
                                    ran one warm-up inference, 503 (JSON, Retry-After) before
    POST /classify                  image (raw body or multipart `file`) -> {"label", "score", "probabilities",
                                    "model_version"}
    POST /style/jobs                multipart `content`, `style`, optional `options` (JSON) -> 202 {"id", ...}
    GET  /style/jobs/{id}           status, attempt, progress (step, steps, content, style, tv losses)
    GET  /style/jobs/{id}/result    the PNG once done (409 before)
    DELETE /style/jobs/{id}         cancel
    POST /style                     like /style/jobs but waits: PNG, or 408 past sync_timeout_s
    GET  /styles                    the trained style networks served (registry `fast_styles`)
    GET  /styles/{name}/image       a style's style image (JPEG thumbnail)
    POST /style/fast?style=NAME     image (raw body, or multipart `image` + text `style`) -> PNG, one forward pass

Every answer other than 2xx is JSON {"error": "..."} (serve/errors.py); bodies over max_body_mb
are refused before they are read (serve/body_limit.py), and so are writes from a web page of another
origin unless allow_origin names it (serve/origin.py). A route whose deployment has no running
replica answers 503 + Retry-After at once instead of waiting in Serve's router (the ingress asks the
controller at most once a second), and so does a style route while the job store does not answer.
Every request's latency goes to the Prometheus histogram raycv_request_seconds (serve/metrics.py).
"""

import asyncio
import dataclasses
import logging
import os
import time
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from jobs import hostmem
from jobs.cli import UserError
from serve.body_limit import BodyLimit
from serve.classifier import ClassifierDeployment
from serve.config import ServeConfig, config_from_dict
from serve.errors import HANDLED, ApiError, Unavailable, answer, json_error
from serve.fast_style import FastStylePool
from serve.forms import RAW_IMAGE, file_bytes, form_fields, image_bytes
from serve.metrics import RequestMetrics
from serve.origin import SameOrigin, parse_allowed
from serve.page import PAGE
from serve.store_client import StoreUnavailable
from serve.style_jobs import StyleJobs, queue_depth
from serve.style_pool import StylePool

log = logging.getLogger("ray.serve")

app = FastAPI(
    title="raycv",
    version="0.1.0",
    description="The fine-tuned image classifier (dynamically batched) and a pool of neural "
                "style-transfer workers (asynchronous jobs with progress), on Ray Serve.",
    form_limits={"max_files": 4, "max_fields": 4, "max_part_size": 64 * 1024},
)


def body_limit() -> int:
    """The ingress's max_body_bytes. Serve serves a copy of `app` made when `Ingress` is decorated,
    before any config exists, so the middleware asks the replica's own ingress at each request."""
    return serve.get_replica_context().servable_object.cfg.max_body_bytes


def allowed_origins() -> list[str]:
    """The ingress's allow_origin, normalized (asked at each request, like body_limit)."""
    return serve.get_replica_context().servable_object.allowed_origins


app.add_middleware(BodyLimit, limit=body_limit)
app.add_middleware(SameOrigin, allowed=allowed_origins)  # runs before the body is read
app.add_middleware(RequestMetrics)  # added last: runs first, times every answer
for _exc in HANDLED:
    app.add_exception_handler(_exc, json_error)

IMAGE = "an image (PNG, JPEG, ...)"
OPTIONS = 'JSON object of style options, e.g. {"size": [300, 450], "steps": 500, "style_weight": 1000}'
PNG = {200: {"content": {"image/png": {}}}}
UNAVAILABLE = {503: {"description": "no replica running, queue full, or job store not answering (Retry-After)"}}
STATUS_TTL_S = 1.0  # the ingress asks the controller for the replicas' states at most this often
NOT_READY = ("UNHEALTHY", "DEPLOY_FAILED")
# replica states that serve requests: UPDATING is a running replica applying a new user_config (a hot
# swap: it keeps answering with the old model until the new one is loaded and warm)
SERVING = ("RUNNING", "UPDATING", "PENDING_MIGRATION")


# Everything the routes use is defined above `Ingress`: `@serve.ingress` freezes a copy of `app`,
# route functions included (with the module globals they name, as they are at that moment).
def known(job_id: str, found: Any) -> Any:
    """What the job store answered about `job_id`; 404 when it answered None (unknown or expired)."""
    if found is None:
        raise ApiError(404, f"no style job {job_id!r} (unknown or expired)")
    return found


def style_headers(name: str, ms: float) -> dict[str, str]:
    """The headers of a POST /style/fast answer. Header values are Latin-1 on the wire, a style name
    may be any letters: X-Style is its UTF-8 percent-encoded (an ASCII name stays as it is)."""
    return {"X-Style": quote(name, safe="-_."), "X-Inference-Ms": f"{ms:.1f}"}


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(app)
class Ingress:
    """Routes requests to the model deployments; holds the style jobs it accepted (serve/style_jobs.py)."""

    def __init__(self, classifier: DeploymentHandle, style: DeploymentHandle | None, cfg: dict,
                 fast: DeploymentHandle | None = None):
        self.cfg = ServeConfig(**cfg)
        self.allowed_origins = parse_allowed(self.cfg.allow_origin)
        self.classifier = classifier
        self.fast = fast  # FastStylePool: trained style networks, multiplexed by style name
        self.jobs = StyleJobs(style, self.cfg) if style is not None else None
        self.app_name = serve.get_replica_context().app_name
        self.deployments = {"ClassifierDeployment": "classifier",
                            **({"StylePool": "style pool"} if style is not None else {}),
                            **({"FastStylePool": "style networks"} if fast is not None else {})}
        self.states: dict[str, dict] | None = None  # deployment -> {"status", "running"}, from the controller
        self.states_at = 0.0
        self.refreshing: asyncio.Task | None = None

    # ---------------------------------------------------------------- replica states (bounded waits)

    async def _states(self, fresh: bool = False) -> dict[str, dict]:
        """The app's deployments' states, at most STATUS_TTL_S old (`fresh`: asked now)."""
        if fresh or self.states is None or time.monotonic() - self.states_at > STATUS_TTL_S:
            if self.refreshing is None or self.refreshing.done():
                self.refreshing = asyncio.create_task(self._refresh_states())
            if fresh or self.states is None:
                await asyncio.shield(self.refreshing)
        return self.states or {}

    async def _refresh_states(self) -> None:
        try:
            status = await asyncio.to_thread(serve.status)
            application = status.applications.get(self.app_name)
            deployments = application.deployments if application is not None else {}
            self.states = {name: {"status": str(d.status.value),
                                  "running": sum(int(d.replica_states.get(s, 0)) for s in SERVING)}
                           for name, d in deployments.items()}
        except Exception as e:  # noqa: BLE001 - no controller answer: keep the last known states
            log.warning("cannot read the deployments' states: %s", e)
        self.states_at = time.monotonic()

    async def _available(self, deployment: str) -> None:
        """503 + Retry-After at once when `deployment` has no running replica: a call would wait in the
        router until one starts (or forever, if it cannot be placed)."""
        state = (await self._states()).get(deployment)
        if state is not None and state["running"] == 0:
            raise Unavailable(f"{self.deployments.get(deployment, deployment)}: no replica running "
                              f"({state['status']}); retry shortly", retry_after=self.cfg.unavailable_retry_s)

    # ---------------------------------------------------------------- page and health

    @app.get("/", response_class=HTMLResponse, summary="The web page: classify an image, stylize one")
    async def page(self) -> HTMLResponse:
        return HTMLResponse(PAGE)

    @app.get("/healthz", summary="Liveness: what is served and the style queue (200 while the ingress runs)")
    async def healthz(self) -> dict:
        out: dict[str, Any] = {"status": "ok"}
        try:
            await self._available("ClassifierDeployment")
            out["classifier"] = await asyncio.wait_for(self.classifier.info.remote(), self.cfg.store_timeout_s)
        except (Unavailable, asyncio.TimeoutError):
            out["classifier"] = {"status": "unavailable"}
        if self.jobs is not None:
            weights = self.cfg.style_weights  # imagenet, random, or a state-dict path: only its file name shown
            try:
                stats = await self.jobs.store.call("stats")
                queue_depth(stats)
            except StoreUnavailable as e:
                stats = {"store": "unavailable", "error": e.detail}
            out["style"] = {"weights": os.path.basename(weights), **stats}
        return out

    @app.get("/readyz", summary="Readiness: 200 once every deployment has a warmed-up replica, 503 before",
             responses={503: {"description": "not ready: which deployments have no warmed-up replica (Retry-After)"}})
    async def readyz(self) -> JSONResponse:
        """A replica's constructor loads its model and runs one warm-up inference, and Serve counts it
        RUNNING only once the constructor returned: ready = each deployment has a RUNNING replica."""
        states = await self._states()  # at most STATUS_TTL_S old: a flood of probes costs the controller nothing
        shown = {self.deployments[name]: states.get(name, {"status": "UNKNOWN", "running": 0})
                 for name in self.deployments}
        waiting = [f"{what} ({s['status']}, {s['running']} running)" for what, s in shown.items()
                   if s["running"] == 0 or s["status"] in NOT_READY]
        if waiting:
            return JSONResponse({"error": f"not ready: {', '.join(waiting)}", "deployments": shown}, status_code=503,
                                headers={"Retry-After": str(self.cfg.unavailable_retry_s)})
        return JSONResponse({"status": "ready", "deployments": shown})

    # ---------------------------------------------------------------- classifier

    @app.post("/classify", summary="Classify one image (raw body or multipart field `file`)",
              dependencies=[Depends(form_fields("file", raw=True))], openapi_extra=RAW_IMAGE,
              responses={200: {"description": '{"label": str, "score": float, "probabilities": {class: float}}'},
                         400: {"description": "empty body"}, 413: {"description": "body too large"},
                         422: {"description": "not a usable image (or over --classify-max-pixels), or wrong "
                                               "form field"},
                         503: {"description": "classifier queue full or no replica running (Retry-After)"}})
    async def classify(self, request: Request,
                       file: Annotated[UploadFile | None, File(description=IMAGE)] = None) -> dict:
        data = await image_bytes(request, file, "file")
        await self._available("ClassifierDeployment")
        return await answer("classifier", self.classifier.classify.remote(data))

    # ---------------------------------------------------------------- style jobs

    @app.post("/style/jobs", status_code=202, summary="Submit a style-transfer job (202 + id)",
              dependencies=[Depends(form_fields("content", "style", "options"))],
              responses={202: {"description": '{"id", "status", "url", "result_url"}'},
                         **UNAVAILABLE})
    async def submit_job(self, content: Annotated[UploadFile, File(description="content image")],
                         style: Annotated[UploadFile, File(description="style image")],
                         options: Annotated[str, Form(description=OPTIONS)] = "{}") -> JSONResponse:
        jobs = await self._style_pool()
        job_id = await jobs.submit(await file_bytes(content, "content"), await file_bytes(style, "style"),
                                   options, sync=False)
        url = f"/style/jobs/{job_id}"
        return JSONResponse({"id": job_id, "status": "queued", "url": url, "result_url": f"{url}/result"},
                            status_code=202, headers={"Location": url})

    @app.get("/style/jobs/{job_id}", summary="A job's status and progress (step, losses)")
    async def get_job(self, job_id: str) -> dict:
        return known(job_id, await self._jobs().store.call("get", job_id))

    @app.get("/style/jobs/{job_id}/result", summary="The finished job's image (PNG)",
             responses={**PNG, 409: {"description": "not done (yet)"}})
    async def get_result(self, job_id: str) -> Response:
        status, png = await self._jobs().store.call("result", job_id)
        if known(job_id, status) != "done":
            raise ApiError(409, f"job {job_id} is {status}, no result", job_status=status)
        return Response(png, media_type="image/png")

    @app.delete("/style/jobs/{job_id}", summary="Cancel a queued or running job")
    async def cancel_job(self, job_id: str) -> dict:
        return known(job_id, await self._jobs().cancel(job_id))

    @app.post("/style", summary="Stylize a small image and wait for the PNG (408 past the timeout)",
              dependencies=[Depends(form_fields("content", "style", "options"))],
              responses={**PNG, 408: {"description": "not done within the timeout"}, **UNAVAILABLE})
    async def style_sync(self, content: Annotated[UploadFile, File(description="content image")],
                         style: Annotated[UploadFile, File(description="style image")],
                         options: Annotated[str, Form(description=OPTIONS)] = "{}") -> Response:
        jobs = await self._style_pool()
        job_id = await jobs.submit(await file_bytes(content, "content"), await file_bytes(style, "style"),
                                   options, sync=True)  # a client that goes away cancels the job (wait)
        return Response(await jobs.wait(job_id), media_type="image/png", headers={"X-Job-Id": job_id})

    def _jobs(self) -> StyleJobs:
        if self.jobs is None:
            raise ApiError(404, "style transfer is not enabled on this server")
        return self.jobs

    async def _style_pool(self) -> StyleJobs:
        """The style jobs, for a new submission: 503 at once while no style replica runs."""
        jobs = self._jobs()
        await self._available("StylePool")
        return jobs

    # ---------------------------------------------------------------- real-time style (trained networks)

    @app.get("/styles", summary="The trained styles served by POST /style/fast")
    async def list_styles(self) -> dict:
        if self.fast is None:
            return {"styles": []}
        await self._available("FastStylePool")
        return {"styles": await answer("style networks", self.fast.styles.remote())}

    @app.get("/styles/{name}/image", summary="A style's style image (JPEG thumbnail)",
             responses={200: {"content": {"image/jpeg": {}}}})
    async def style_image(self, name: str) -> Response:
        fast = self._fast()
        await self._available("FastStylePool")
        data = await answer("style networks", fast.thumbnail.remote(name))
        if data is None:
            raise ApiError(404, f"no style image for {name!r}")
        return Response(data, media_type="image/jpeg")

    @app.post("/style/fast", summary="Stylize an image with a trained style network (one forward pass) -> PNG",
              dependencies=[Depends(form_fields("image", "style", raw=True))], openapi_extra=RAW_IMAGE,
              responses={**PNG, 404: {"description": "unknown style"},
                         422: {"description": "not a usable image, or no style named"}})
    async def style_fast(self, request: Request,
                         style: Annotated[str | None, Query(description="style name (GET /styles)")] = None,
                         image: Annotated[UploadFile | None, File(description=IMAGE)] = None,
                         form_style: Annotated[str | None, Form(alias="style", description="style name, "
                                                                "instead of the query")] = None) -> Response:
        fast = self._fast()
        data = await image_bytes(request, image, "image")
        if style and form_style and form_style != style:
            raise ApiError(422, "style given twice (query and form) with different values")
        name = style or form_style
        if not name:
            raise ApiError(422, "name a style: ?style=NAME or the form field 'style' (GET /styles lists them)")
        await self._available("FastStylePool")
        out = await answer("style networks", fast.options(multiplexed_model_id=name).stylize.remote(data))
        return Response(out["png"], media_type="image/png", headers=style_headers(name, out["ms"]))

    def _fast(self) -> DeploymentHandle:
        if self.fast is None:
            raise ApiError(404, "real-time style transfer is not enabled on this server (start it with --fast-styles DIR)")
        return self.fast


# ----------------------------------------------------------------------------- the application


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """Serve application builder (`import_path: serve.app:build_app`, `args:` = ServeConfig fields)."""
    cfg = config_from_dict(args)
    if not os.path.isdir(cfg.classifier):
        raise UserError(f"classifier artifact {cfg.classifier} is not a directory")
    knobs = {"max_batch_size": cfg.max_batch_size, "batch_wait_timeout_s": cfg.batch_wait_timeout_s,
             "max_pixels": cfg.classify_max_pixels, "precision": cfg.classifier_precision}
    classifier = ClassifierDeployment.options(
        num_replicas=cfg.classifier_replicas,
        max_ongoing_requests=max(cfg.classifier_max_ongoing, cfg.max_batch_size),  # else batches never fill
        max_queued_requests=cfg.classifier_max_queued,
        ray_actor_options=resources(cfg.classifier_cpus, cfg.classifier_gpus, large_maps=cfg.max_batch_size > 1),
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
        style = StylePool.options(
            **scaling, max_ongoing_requests=1, max_queued_requests=cfg.style_max_queued,
            ray_actor_options=resources(cfg.style_cpus, cfg.style_gpus, large_maps=True),
        ).bind(weights=cfg.style_weights, device=cfg.style_device, threads=max(1, round(cfg.style_cpus)),
               store=cfg.store_args(), job_max_s=cfg.style_job_max_s, lease_s=cfg.job_lease_s,
               store_timeout_s=cfg.store_timeout_s)
    fast = None
    if cfg.fast_styles:
        fast = FastStylePool.options(
            num_replicas=cfg.fast_style_replicas, max_ongoing_requests=cfg.fast_style_max_ongoing,
            max_queued_requests=cfg.fast_style_max_queued,
            ray_actor_options=resources(cfg.fast_style_cpus, cfg.fast_style_gpus, large_maps=True),
        ).bind(registry=os.path.abspath(cfg.fast_styles), threads=max(1, round(cfg.fast_style_cpus)),
               use_gpu=cfg.fast_style_gpus > 0, max_side=cfg.fast_style_max_side, max_pixels=cfg.max_pixels,
               precision=cfg.fast_style_precision)
    return Ingress.options(max_ongoing_requests=cfg.ingress_max_ongoing, ray_actor_options=resources(cfg.ingress_cpus),
                           ).bind(classifier, style, dataclasses.asdict(cfg), fast)


def resources(cpus: float, gpus: float = 0.0, large_maps: bool = False) -> dict:
    """Ray actor options for a replica: its CPUs, GPUs only when asked for, and where RAYCV_KEEP_FREED_MEMORY=1
    (opt-in) for replicas whose models compute large maps (a batch of images, a 512 px style forward)
    malloc settings that keep freed tensor memory for the next forward (`jobs.hostmem`: the classifier's
    batch of 16 page-faulted ~37,000 times a call without them). Set at process start: a batch size
    changed later by user_config keeps them as they were."""
    options = {"num_cpus": cpus, **({"num_gpus": gpus} if gpus else {})}
    if env := hostmem.runtime_env(large_maps):
        options["runtime_env"] = with_application_runtime_env(env)
    return options


def with_application_runtime_env(env: dict) -> dict:
    """`env` on top of the application's runtime_env, which this builder runs with (Serve builds an app in
    a task with it; `python -m serve` builds it in the driver, with the job's).

    A deployment that sets its own runtime_env gets only the application's working_dir from Serve when
    the app is built, but the application's whole runtime_env merged in (env_vars combined, the rest
    inherited) when a config overrides the deployment, e.g. a `user_config` change: two different
    actor options, so Serve would restart the replica instead of reconfiguring it, and the replica
    would miss the application's env_vars. Merged here the same way (the application's keys first,
    then ours), both paths give the same options."""
    import ray

    app = dict(ray.get_runtime_context().runtime_env or {}) if ray.is_initialized() else {}
    return {**app, **env, "env_vars": {**app.get("env_vars", {}), **env.get("env_vars", {})}}
