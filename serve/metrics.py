"""Prometheus metrics of the service, through `ray.serve.metrics` (tagged with deployment, replica, app).

Ray's metrics agent on each node exports them at http://NODE:<metrics export port>/metrics, each name
prefixed `ray_` (README, "Metrics"):
    raycv_request_seconds{route, method, status}        histogram: the ingress's latency per route and status
    raycv_classifier_batch_size                          histogram: images per classifier forward
    raycv_style_queue_depth{status}                      gauge: style jobs queued / running (job store)
    raycv_style_job_seconds{outcome}                     histogram: one attempt's run time on its replica
    raycv_style_jobs_total{outcome}                      counter: attempts ended: done, failed, cancelled, timeout

The objects are made on first use, in the replica that records them (a metric lives in its process).
"""
from __future__ import annotations

from functools import lru_cache

from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
JOB_S = [0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600]
BATCH = [1, 2, 4, 8, 16, 32, 64, 128]


@lru_cache(maxsize=None)
def metric(name: str):
    from ray.serve.metrics import Counter, Gauge, Histogram

    if name == "request_seconds":
        return Histogram("raycv_request_seconds", description="HTTP request latency at the ingress, by route "
                         "template and status", boundaries=LATENCY_S, tag_keys=("route", "method", "status"))
    if name == "batch_size":
        return Histogram("raycv_classifier_batch_size", description="images per classifier forward pass",
                         boundaries=BATCH)
    if name == "queue_depth":
        return Gauge("raycv_style_queue_depth", description="style jobs queued or running (job store)",
                     tag_keys=("status",))
    if name == "job_seconds":
        return Histogram("raycv_style_job_seconds", description="run time of a style job attempt on its replica, "
                         "by outcome", boundaries=JOB_S, tag_keys=("outcome",))
    if name == "jobs_total":
        return Counter("raycv_style_jobs_total", description="style job attempts ended, by outcome",
                       tag_keys=("outcome",))
    raise KeyError(name)


def record_job(outcome: str, seconds: float) -> None:
    metric("job_seconds").observe(seconds, tags={"outcome": outcome})
    metric("jobs_total").inc(tags={"outcome": outcome})


def route_of(app, scope: Scope) -> str:
    """The route template a request matched (`/style/jobs/{job_id}`), "unmatched" otherwise: the label
    set stays as small as the API, whatever paths clients send."""
    matched = getattr(scope.get("route"), "path", None)  # set by Starlette's router once it routed the request
    if matched:
        return matched
    partial = "unmatched"
    for route in app.routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return getattr(route, "path", "unmatched")
        if match == Match.PARTIAL and partial == "unmatched":  # the path, another method (405)
            partial = getattr(route, "path", "unmatched")
    return partial


class RequestMetrics:
    """ASGI middleware: one latency observation per HTTP request, tagged route, method and status."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        import time

        t0 = time.perf_counter()
        status = ["none"]  # no answer started: the client went away (or a bug)

        async def sent(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            try:
                metric("request_seconds").observe(time.perf_counter() - t0, tags={
                    # scope["app"]: the FastAPI app serving this request (Starlette sets it), whose routes
                    # Serve bound to the replica's ingress object
                    "route": route_of(scope["app"], scope), "method": scope.get("method", ""),
                    "status": status[0]})
            except Exception:  # noqa: BLE001 - metrics never fail a request
                pass
