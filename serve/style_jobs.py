"""The ingress's side of style-transfer jobs: admit one, drive it through the pool, wait for it.

A job's state lives in the job store (serve/job_store.py), its work in a StylePool replica
(serve/style_pool.py); this holds what only the accepting ingress knows: the images, and the task
that keeps sending the job to the pool until an attempt ends.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging

from ray.exceptions import RayActorError, TaskCancelledError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from jobs.cli import UserError
from jobs.config import check_types
from jobs.images import load_image
from jobs.style import StyleConfig
from serve.config import ServeConfig
from serve.errors import ApiError, Unavailable
from serve.metrics import metric
from serve.store_client import StoreClient, StoreUnavailable

log = logging.getLogger("ray.serve")

# what a client may set on a style job: every StyleConfig field but these, which the server fixes
SERVER_FIXED = ("weights", "device", "max_pixels", "channels_last", "winograd")
STYLE_OPTIONS = tuple(f.name for f in dataclasses.fields(StyleConfig) if f.name not in SERVER_FIXED)


def style_job_config(options: str, cfg: ServeConfig, sync: bool) -> tuple[dict, dict]:
    """The form's `options` (a JSON object) -> (the client's options, the job's full `StyleConfig` dict);
    ApiError(422) naming the problem."""
    try:
        options = json.loads(options or "{}", parse_constant=_refuse_constant)
    except ValueError as e:
        raise ApiError(422, f"options is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError(422, "options is nested too deeply") from None
    if not isinstance(options, dict):
        raise ApiError(422, "options must be a JSON object")
    unknown = sorted(set(options) - set(STYLE_OPTIONS))
    if unknown:
        raise ApiError(422, f"unknown option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(STYLE_OPTIONS))}")
    try:
        check_types(StyleConfig, options, names="fields")  # before the dataclass coerces them
        sc = StyleConfig(**{**options, "weights": cfg.style_weights, "device": "cpu", "max_pixels": cfg.max_pixels})
        sc.validate()
    except UserError as e:
        raise ApiError(422, str(e)) from None
    except (TypeError, ValueError) as e:
        raise ApiError(422, f"bad options: {e}") from None
    if sc.steps > cfg.style_max_steps:
        raise ApiError(422, f"steps {sc.steps} is over this server's limit of {cfg.style_max_steps}")
    work = sc.steps * len(sc.scales) * len(set(sc.content_layers + sc.style_layers))
    if work > cfg.style_max_work:
        raise ApiError(422, f"steps x scales x layers = {sc.steps} x {len(sc.scales)} x "
                            f"{len(set(sc.content_layers + sc.style_layers))} = {work} is over this server's limit "
                            f"of {cfg.style_max_work}; ask for fewer steps, scales or layers")
    if sc.optimizer == "lbfgs":  # L-BFGS keeps 2 x history copies of the image's float32 pixels
        mb = 2 * sc.lbfgs_history * 3 * sc.size[0] * sc.size[1] * 4 / 2**20
        if mb > cfg.style_max_lbfgs_mb:
            raise ApiError(422, f"lbfgs_history {sc.lbfgs_history} at size {sc.size[0]}x{sc.size[1]} needs "
                                f"{mb:.0f} MiB, over this server's limit of {cfg.style_max_lbfgs_mb:g} MiB")
    pixels = sc.size[0] * sc.size[1]
    limit = cfg.sync_max_size if sync else cfg.style_max_size
    if pixels > limit:
        hint = "; use POST /style/jobs for larger images" if sync else ""
        raise ApiError(422, f"size {sc.size[0]}x{sc.size[1]} = {pixels} pixels is over the limit of {limit}{hint}")
    return options, dataclasses.asdict(sc)


def _refuse_constant(name: str):
    """json's parse_constant: NaN, Infinity and -Infinity are not numbers an option may hold."""
    raise ValueError(f"{name} is not a finite number")


class StyleJobs:
    """Admits jobs (checks, then the store's bounded queue), drives each through the pool, heartbeats."""

    def __init__(self, pool: DeploymentHandle, cfg: ServeConfig):
        self.pool, self.cfg = pool, cfg
        self.store = StoreClient(cfg.store_args(), cfg.store_timeout_s, cfg.unavailable_retry_s)
        try:  # it may predate this deployment (detached): apply this config's limits
            self.store.call_sync("configure", **cfg.store_args())
        except StoreUnavailable as e:  # the ingress still starts: /classify does not need the store
            log.warning("job store not configured at start: %s", e.detail)
        self.driving: dict[str, asyncio.Task] = {}  # job id -> the task driving it through the pool
        self.calls: dict[str, DeploymentResponse] = {}  # job id -> its current call to the pool
        self.background: set[asyncio.Task] = set()  # cancellations of jobs whose client went away
        self.heartbeat: asyncio.Task | None = None

    async def submit(self, content: bytes, style: bytes, options: str, sync: bool) -> str:
        """Check the job, create it (503 when the queue is full), start driving it; its id.

        The slot is taken before the images are decoded, so a client flooding a full queue costs no
        decoding; a bad image gives the slot back at once (422)."""
        client_options, job_cfg = style_job_config(options, self.cfg, sync)
        made = await self.store.call("create", client_options, self.cfg.style_replicas)
        if made.get("full"):
            raise Unavailable(f"style queue is full ({made['active']} jobs queued or running); retry later",
                              retry_after=made["retry_after"])
        job_id = made["id"]
        try:
            for name, data in (("content", content), ("style", style)):
                # decode now, off the event loop: a bad image is a 422 here, not a failed job later
                await asyncio.to_thread(load_image, data, self.cfg.max_pixels, f"{name} image")
        except BaseException:
            try:
                await self.store.call("discard", job_id)
            except StoreUnavailable:  # the slot frees itself: no heartbeat, so the watchdog fails it
                pass
            raise
        self.driving[job_id] = asyncio.create_task(self._drive(job_id, content, style, job_cfg))
        if self.heartbeat is None or self.heartbeat.done():
            self.heartbeat = asyncio.create_task(self._heartbeat())
        return job_id

    async def cancel(self, job_id: str) -> dict | None:
        """Cancel a job in the store and withdraw its call to the pool: a queued job leaves the pool's
        router queue (so cancelled jobs do not fill `style_max_queued`), a running job's replica sees its
        request cancelled and stops within one optimisation step. The store's view, or None if unknown."""
        job = await self.store.call("cancel", job_id)
        response = self.calls.get(job_id)
        if response is not None and job is not None and job["status"] == "cancelled":
            response.cancel()
        return job

    def cancel_soon(self, job_id: str) -> None:
        """Cancel from a task of its own: the caller (a request whose client went away) is being cancelled."""
        task = asyncio.get_running_loop().create_task(self._cancel_quietly(job_id))
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _cancel_quietly(self, job_id: str) -> None:
        try:
            await self.cancel(job_id)
            log.info("style job %s cancelled: its synchronous client went away", job_id)
        except Exception as e:  # noqa: BLE001 - the store's watchdog ends it otherwise
            log.warning("style job %s: cancel after disconnect failed: %s", job_id, e)

    async def wait(self, job_id: str) -> bytes:
        """The PNG of a job once done; 408 (job cancelled) past sync_timeout_s, 422/503 if it failed.
        A client that goes away (the request is cancelled) cancels the job: its replica is freed."""
        try:
            await asyncio.wait_for(asyncio.shield(self.driving[job_id]), self.cfg.sync_timeout_s)
        except asyncio.TimeoutError:
            await self.cancel(job_id)
            raise ApiError(408, f"not finished within {self.cfg.sync_timeout_s:g} s (cancelled); "
                                "use POST /style/jobs for long jobs", job=job_id) from None
        except asyncio.CancelledError:
            self.cancel_soon(job_id)
            raise
        except KeyError:  # the drive task already finished and removed itself
            pass
        status, png = await self.store.call("result", job_id)
        if status == "done":
            return png
        job = await self.store.call("get", job_id) or {}
        if job.get("error_kind") in ("input", "limit"):
            raise ApiError(422, job["error"], job=job_id)
        raise Unavailable(f"style job {status}: {job.get('error')}", job=job_id)

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
                    self.calls[job_id] = self.pool.run.remote(job_id, attempt, content, style, job_cfg)
                    await self.calls[job_id]
                    return
                except (RequestCancelledError, TaskCancelledError, asyncio.CancelledError):
                    # `cancel`, or Serve cancelling this call with the request that made it (a sync
                    # client gone): the job ends cancelled, if the store does not say so already
                    await self._store_quietly("stopped", job_id, attempt)
                    return
                except BackPressureError:  # the router's queue (style_max_queued) is full
                    await self._store_quietly("fail", job_id, attempt, "style pool is full; submit again later")
                    return
                except (RayActorError, DeploymentUnavailableError) as e:
                    log.warning("style job %s attempt %d lost its replica: %s", job_id, attempt, type(e).__name__)
                    if not await self._store_quietly("retry", job_id, f"replica died ({type(e).__name__})"):
                        return
                    attempt += 1
                except Exception as e:  # noqa: BLE001 - anything else fails this job only
                    log.exception("style job %s: unexpected error", job_id)
                    await self._store_quietly("fail", job_id, attempt, f"{type(e).__name__}: {str(e)[:200]}")
                    return
        finally:
            self.driving.pop(job_id, None)
            self.calls.pop(job_id, None)

    async def _store_quietly(self, method: str, *args):
        """A store call from the drive task: waits longer (the store may be restarting); None if it never answers
        (the watchdog then fails the job one lease later)."""
        try:
            return await self.store.call(method, *args, timeout_s=max(self.cfg.store_timeout_s, self.cfg.job_lease_s))
        except StoreUnavailable as e:
            log.warning("style job %s: %s not recorded: %s", args[0], method, e.detail)
            return None

    async def _heartbeat(self) -> None:
        """Tell the store which queued jobs this ingress still drives, so only orphans get reaped; the
        same beat refreshes the queue-depth metric."""
        period = max(0.5, min(10.0, self.cfg.job_lease_s / 4))
        while self.driving:
            try:
                await self.store.call("touch", list(self.driving))
                queue_depth(await self.store.call("stats"))
            except StoreUnavailable:
                log.warning("job store unreachable")
            await asyncio.sleep(period)


def queue_depth(stats: dict) -> None:
    """The raycv_style_queue_depth gauge from the store's stats."""
    try:
        for status in ("queued", "running"):
            metric("queue_depth").set(stats["jobs"].get(status, 0), tags={"status": status})
    except Exception:  # noqa: BLE001 - metrics never fail a request
        pass
