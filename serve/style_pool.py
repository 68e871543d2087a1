"""StylePool: replicas that each hold VGG-19 once and run one style-transfer job at a time.

The optimisation itself is `jobs.style.stylize`; this file only moves a job between the
job store (serve/job_store.py) and that function: claim the attempt, report progress (which
doubles as the heartbeat and the cancellation check), store the PNG or the error.
"""
from __future__ import annotations

import asyncio
import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import ray
import torch
from ray import serve

from jobs.cli import UserError
from jobs.style import StyleConfig, build_extractor, resolve_device, stylize
from jobs.vgg import VGG19_NUM_LAYERS, load_vgg
from serve.job_store import get_or_create_store

log = logging.getLogger("ray.serve")
PROGRESS_EVERY_S = 0.25  # progress reports per job are throttled to this period


class JobStopped(Exception):
    """Raised inside the optimisation's progress callback when the job was cancelled or taken away."""


@serve.deployment(max_ongoing_requests=1, health_check_period_s=10)
class StylePool:
    """One job at a time per replica (one GPU each in production); VGG loaded once in __init__."""

    def __init__(self, weights: str, store: list, device: str = "auto", threads: int = 1):
        """`store` = get_or_create_store's arguments (name, capacity, lease_s, ttl_s, max_attempts)."""
        torch.set_num_threads(max(1, threads))
        self.device = str(resolve_device(device))
        # the whole `features` stack, so a job may pick any content/style layers
        cfg = StyleConfig(weights=weights, device=self.device, content_layers=[VGG19_NUM_LAYERS - 1])
        self.extractor = build_extractor(cfg, load_vgg(weights, cfg.seed))
        self.store = get_or_create_store(*store)
        self.replica = serve.get_replica_context().replica_id.unique_id
        # the optimisation runs off the event loop (health checks stay answered) in ONE thread:
        # even if a request's task were cancelled, a second job could not start beside it
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stylize")

    async def run(self, job_id: str, attempt: int, content: bytes, style: bytes, cfg: dict) -> str:
        """Run one attempt of a job; the outcome goes to the store. Returns the final status."""
        if not await self.store.start.remote(job_id, attempt, self.replica):
            return "skipped"
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._work, job_id, attempt, content, style, cfg)

    def _work(self, job_id: str, attempt: int, content: bytes, style: bytes, cfg: dict) -> str:
        store = self.store
        config = StyleConfig(**{**cfg, "device": self.device})
        steps = config.steps * len(config.scales)
        last = [0.0]

        def progress(rec: dict) -> None:
            now = time.perf_counter()
            if now - last[0] < PROGRESS_EVERY_S and rec["step"] + 1 < steps:
                return
            last[0] = now
            report = {**rec, "steps": steps}
            if not ray.get(store.progress.remote(job_id, attempt, report)):
                raise JobStopped(job_id)

        try:
            image, history = stylize(content, style, config, extractor=self.extractor, progress=progress)
        except JobStopped:
            return "stopped"
        except (UserError, FloatingPointError) as e:  # bad image, bad values, loss blew up: the request's fault
            ray.get(store.fail.remote(job_id, attempt, str(e), "input"))
            return "failed"
        except Exception as e:  # noqa: BLE001 - any other failure ends this job, not the replica
            log.exception("style job %s failed", job_id)
            ray.get(store.fail.remote(job_id, attempt, f"{type(e).__name__}: {str(e)[:200]}", "internal"))
            return "failed"
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        final = history[-1] if history else {}
        summary = {"steps": len(history), "size": list(image.size[::-1]),
                   **{k: final[k] for k in ("content", "style", "tv", "total") if k in final}}
        ray.get(store.finish.remote(job_id, attempt, buf.getvalue(), summary))
        return "done"

    def check_health(self) -> None:
        """Unhealthy when the VGG is gone or the job thread died (a wedged replica gets replaced)."""
        if self.extractor is None or self.executor._shutdown:
            raise RuntimeError("style replica is not usable")
