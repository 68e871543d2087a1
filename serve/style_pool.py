"""StylePool: replicas that each hold VGG-19 once and run one style-transfer job at a time.

The optimisation itself is `jobs.style.stylize`; this file only moves a job between the
job store (serve/job_store.py) and that function: claim the attempt, report progress (which
doubles as the heartbeat and the cancellation check), store the PNG or the error. Its progress
callback runs after every optimisation step (every L-BFGS evaluation), so a cancelled request and
the per-job wall-clock limit (`job_max_s`) stop a job within one step.
"""
from __future__ import annotations

import asyncio
import io
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import ray
import torch
from ray import serve
from ray.exceptions import ActorDiedError, RayActorError

from jobs.cli import UserError
from jobs.style import StyleConfig, build_extractor, resolve_device, stylize
from jobs.vgg import VGG19_NUM_LAYERS, load_vgg
from serve import metrics
from serve.store_client import StoreClient, StoreUnavailable

log = logging.getLogger("ray.serve")
PROGRESS_EVERY_S = 0.25  # progress reports per job are throttled to this period


class JobStopped(Exception):
    """Raised inside the optimisation's progress callback when the job was cancelled or taken away."""


class JobTimedOut(Exception):
    """Raised inside the progress callback when the attempt ran past the server's wall-clock limit."""


@serve.deployment(max_ongoing_requests=1, health_check_period_s=10)
class StylePool:
    """One job at a time per replica (one GPU each in production); VGG loaded once in __init__."""

    def __init__(self, weights: str, store: dict, device: str = "auto", threads: int = 1, job_max_s: float = 600.0,
                 lease_s: float = 120.0, store_timeout_s: float = 5.0):
        """`store` = the job store's arguments (ServeConfig.store_args())."""
        torch.set_num_threads(max(1, threads))
        self.device = str(resolve_device(device))
        # the whole `features` stack, so a job may pick any content/style layers
        cfg = StyleConfig(weights=weights, device=self.device, content_layers=[VGG19_NUM_LAYERS - 1])
        self.extractor = build_extractor(cfg, load_vgg(weights, cfg.seed))
        self.warmup_ms = self._warm_up()  # before the constructor returns: Serve routes here only once warm
        self.store = StoreClient(store, store_timeout_s)
        self.job_max_s, self.lease_s = job_max_s, lease_s
        self.replica = serve.get_replica_context().replica_id.unique_id
        # the optimisation runs off the event loop (health checks stay answered) in ONE thread:
        # even if a request's task were cancelled, a second job could not start beside it
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stylize")
        self.beat: float | None = None  # monotonic time of the running job's last step (None: idle)

    def _warm_up(self) -> float:
        """One forward through the whole VGG stack on a small image: the first job does not pay for it."""
        t0 = time.perf_counter()
        with torch.no_grad():
            x = torch.zeros(1, 3, 64, 64, device=self.device)
            self.extractor(x, [len(self.extractor.layers) - 1])
        ms = (time.perf_counter() - t0) * 1000
        log.info("style replica warmed up in %.0f ms", ms)
        return ms

    def ready(self) -> dict:
        return {"warmup_ms": round(self.warmup_ms, 1)}

    async def run(self, job_id: str, attempt: int, content: bytes, style: bytes, cfg: dict) -> str:
        """Run one attempt of a job; the outcome goes to the store. Returns the final status.

        A cancelled request (DELETE of a running job, or its sync client gone) sets `stop`, which the
        optimisation checks at every step (every L-BFGS evaluation too)."""
        if not await self.store.call("start", job_id, attempt, self.replica, timeout_s=self.lease_s):
            return "skipped"
        stop = threading.Event()
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(self.executor, self._work, job_id, attempt, content, style, cfg, stop)
        try:
            return await work
        except asyncio.CancelledError:
            stop.set()
            raise

    def _work(self, job_id: str, attempt: int, content: bytes, style: bytes, cfg: dict, stop: threading.Event) -> str:
        config = StyleConfig(**{**cfg, "device": self.device})
        steps = config.steps * len(config.scales)
        t0 = time.monotonic()
        self.beat = t0
        last, pending = [0.0], [None]

        def progress(rec: dict) -> None:
            """Called after every step (every L-BFGS evaluation): stop, time limit, then a throttled report.
            Reports never block the optimisation: a report is sent only once the store answered the last
            one (whose answer says whether to stop), so a restarting store only delays the reports."""
            now = time.monotonic()
            self.beat = now
            if stop.is_set():
                raise JobStopped(job_id)
            if now - t0 > self.job_max_s:
                raise JobTimedOut(job_id)
            if now - last[0] < PROGRESS_EVERY_S and rec["step"] + 1 < steps:
                return
            if pending[0] is not None:
                ready, _ = ray.wait([pending[0]], timeout=0)
                if not ready:
                    return
                try:
                    go_on = ray.get(pending[0])
                except ActorDiedError:  # killed for good: the next report goes to a new store
                    go_on = True
                    self.store.recreate()
                except RayActorError:  # restarting
                    go_on = True
                pending[0] = None
                if not go_on:
                    raise JobStopped(job_id)
            last[0] = now
            pending[0] = self.store.actor.progress.remote(job_id, attempt, {**rec, "steps": steps})

        def record(outcome: str) -> str:
            metrics.record_job(outcome, time.monotonic() - t0)
            return outcome

        try:
            try:
                image, history = stylize(content, style, config, extractor=self.extractor, progress=progress)
            except JobStopped:
                if stop.is_set():  # the request was cancelled: the store may not know yet
                    self._tell("stopped", job_id, attempt)
                return record("cancelled")
            except JobTimedOut:
                self._tell("fail", job_id, attempt, f"stopped after {time.monotonic() - t0:.0f} s: over this "
                           f"server's time limit of {self.job_max_s:g} s per job (style_job_max_s); ask for fewer "
                           "steps or a smaller size", "limit")
                return record("timeout")
            except (UserError, FloatingPointError) as e:  # bad image, bad values, loss blew up: the request's fault
                self._tell("fail", job_id, attempt, str(e), "input")
                return record("failed")
            except Exception as e:  # noqa: BLE001 - any other failure ends this job, not the replica
                log.exception("style job %s failed", job_id)
                self._tell("fail", job_id, attempt, f"{type(e).__name__}: {str(e)[:200]}", "internal")
                return record("failed")
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            final = history[-1] if history else {}
            summary = {"steps": len(history), "size": list(image.size[::-1]),
                       **{k: final[k] for k in ("content", "style", "tv", "total") if k in final}}
            self._tell("finish", job_id, attempt, buf.getvalue(), summary)
            return record("done")
        finally:
            self.beat = None

    def _tell(self, method: str, *args) -> None:
        """An outcome for the store: waits up to a lease for a restarting store (the result matters)."""
        try:
            self.store.call_sync(method, *args, timeout_s=self.lease_s)
        except StoreUnavailable as e:
            log.error("style job %s: outcome %s lost, the job store did not answer: %s", args[0], method, e.detail)

    def check_health(self) -> None:
        """Unhealthy when the VGG is gone, the job thread died, or a job has not finished a step for a lease
        (a wedged replica gets replaced; the store's watchdog has failed its job by then)."""
        if self.extractor is None or self.executor._shutdown:
            raise RuntimeError("style replica is not usable")
        beat = self.beat
        if beat is not None and time.monotonic() - beat > self.lease_s:
            raise RuntimeError(f"style job stuck: no optimisation step for {time.monotonic() - beat:.0f} s")
