"""JobStore: the state of every style-transfer job, in one small detached Ray actor, kept on disk.

Why an actor of its own: job state must outlive any one process that touches a job. The
ingress that accepted a job may be replaced, and the pool replica running it may die; the
store is neither, so a client polling `GET /style/jobs/{id}` always gets an answer. And the store
itself may die: Ray restarts it (`max_restarts=-1`, calls in flight retried, `max_task_retries=-1`),
and the new process reads the jobs back from `directory` (one JSON record per job, written at every
change of status, and the result PNG), so no job and no result is lost. If it was killed for good,
the next caller creates it again under the same name, from the same directory
(`get_or_create_store`).

Life of a job: queued -> running -> done | failed | cancelled. Who moves it:
- the ingress `create`s it (refused when `capacity` jobs are queued or running: the bounded queue),
  drives it through the pool, and on a dead replica asks `retry` (back to queued, attempt + 1,
  or failed after `max_attempts`);
- the pool replica `start`s it, reports `progress` (which also answers "stop" once cancelled),
  then `finish`es or `fail`s it;
- the watchdog (run at every call): a queued job the ingress has not heartbeated (`touch`), or a
  running job its replica has not reported progress on, for `lease_s` is marked failed: no job stays
  pending forever, and a replica stuck inside one step is noticed. Finished jobs older than `ttl_s`
  are dropped with their PNG, and so are the oldest finished ones beyond `max_jobs` records or
  `max_bytes` of PNGs.
Every call is O(1) in the number of jobs kept, or O(capacity) (the active jobs): lookups are dict
lookups, finished jobs sit in finishing order so the expired ones are popped from the front.
Ray runs an actor's methods one at a time, so no locks are needed.
"""
from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
import uuid

ACTIVE = ("queued", "running")
NAMESPACE = "raycv"
log = logging.getLogger(__name__)


def get_or_create_store(name: str, **kwargs):
    """The detached job-store actor `name`: created by whichever replica asks first, shared after.

    Detached, so it is owned by no replica and survives any of them; restarted by Ray if its process
    dies, on the node that created it (soft affinity: its directory is there). `kwargs` are
    `JobStore`'s (ServeConfig.store_args()).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    actor = ray.remote(JobStore).options(name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
                                         num_cpus=0, max_restarts=-1, max_task_retries=-1,
                                         scheduling_strategy=here)
    return actor.remote(**kwargs)


class JobStore:
    """Plain class; `ray.remote(JobStore).options(name=..., lifetime="detached")` makes the actor.

    `directory` None keeps everything in memory only (the unit tests' choice).
    """

    def __init__(self, capacity: int = 16, lease_s: float = 120.0, ttl_s: float = 3600.0, max_attempts: int = 2,
                 directory: str | None = None, max_jobs: int = 1000, max_bytes: int = 256 * 2**20,
                 clock=time.time):
        self.jobs: dict[str, dict] = {}  # every job kept
        self.active: dict[str, None] = {}  # queued + running ids, in submission order (at most `capacity`)
        self.finished: dict[str, None] = {}  # done/failed/cancelled ids, in finishing order (oldest first)
        self.results: dict[str, bytes] = {}
        self.result_bytes = 0
        self.counts: dict[str, int] = {}  # jobs kept, by status
        self.durations: list[float] = []  # recent run times, for Retry-After
        self.clock = clock
        self.directory = directory
        self.configure(capacity, lease_s, ttl_s, max_attempts, max_jobs, max_bytes)
        self.recovered = self._load() if directory else 0

    def configure(self, capacity: int, lease_s: float, ttl_s: float, max_attempts: int,
                  max_jobs: int = 1000, max_bytes: int = 256 * 2**20, **_ignored) -> None:
        """Apply new limits (a redeployed ingress may change them); existing jobs are kept."""
        self.capacity, self.lease_s, self.ttl_s, self.max_attempts = capacity, lease_s, ttl_s, max_attempts
        self.max_jobs, self.max_bytes = max_jobs, max_bytes

    # ------------------------------------------------------------------ ingress side

    def create(self, options: dict, replicas: int = 1) -> dict:
        """New queued job -> {"id"}; when `capacity` jobs are active -> {"full": True, "retry_after": s}."""
        now = self._reap()
        if len(self.active) >= self.capacity:
            return {"full": True, "active": len(self.active), "retry_after": self._retry_after(replicas)}
        job_id = uuid.uuid4().hex[:16]
        self.jobs[job_id] = {"id": job_id, "status": "queued", "attempt": 1, "max_attempts": self.max_attempts,
                             "options": options, "progress": None, "error": None, "error_kind": None,
                             "replica": None, "created": now, "started": None, "finished": None, "touched": now}
        self.active[job_id] = None
        self._count("queued", +1)
        self._save(job_id)
        self._evict()
        return {"id": job_id}

    def touch(self, job_ids: list[str]) -> None:
        """Heartbeat from the ingress for the queued jobs it is still driving. A running job's lease is
        refreshed only by its replica's progress: a replica stuck in one step is not hidden by the ingress."""
        now = self.clock()
        for i in job_ids:
            job = self.jobs.get(i)
            if job is not None and job["status"] == "queued":
                job["touched"] = now
        self._reap()

    def retry(self, job_id: str, reason: str) -> bool:
        """The replica running the job died: requeue it (True) or, out of attempts, fail it (False)."""
        self._reap()
        job = self.jobs.get(job_id)
        if job is None or job["status"] not in ACTIVE:
            return False
        if job["attempt"] >= job["max_attempts"]:
            self._end(job, "failed", f"{reason}; gave up after {job['attempt']} attempt(s)", "internal")
            return False
        self._set_status(job, "queued")
        job.update(attempt=job["attempt"] + 1, replica=None, touched=self.clock(), retried_because=reason)
        self._save(job_id)
        return True

    def cancel(self, job_id: str) -> dict | None:
        """Cancel a queued or running job (the replica stops within one optimisation step)."""
        self._reap()
        job = self.jobs.get(job_id)
        if job is not None and job["status"] in ACTIVE:
            self._end(job, "cancelled", "cancelled", None)
        return self.get(job_id)

    def stopped(self, job_id: str, attempt: int) -> None:
        """The attempt's request was withdrawn (DELETE, or a sync client gone): cancelled, if not already ended."""
        job = self.jobs.get(job_id)
        if job is not None and job["status"] in ACTIVE and job["attempt"] == attempt:
            self._end(job, "cancelled", "cancelled: its request was withdrawn", None)

    def discard(self, job_id: str) -> None:
        """Forget a queued job the ingress took a slot for and then refused (a bad image): no record kept."""
        job = self.jobs.get(job_id)
        if job is not None and job["status"] == "queued":
            self.active.pop(job_id, None)
            self._count("queued", -1)
            job["status"] = "discarded"
            self._count("discarded", +1)
            self._drop(job_id)

    # ------------------------------------------------------------------ replica side

    def start(self, job_id: str, attempt: int, replica: str) -> bool:
        """A replica begins `attempt`; False = do not run it (cancelled, reaped, or a stale attempt)."""
        self._reap()
        job = self.jobs.get(job_id)
        if job is None or job["status"] not in ACTIVE or job["attempt"] != attempt:
            return False
        now = self.clock()
        self._set_status(job, "running")
        job.update(replica=replica, started=now, touched=now)
        self._save(job_id)
        return True

    def progress(self, job_id: str, attempt: int, record: dict) -> bool:
        """Latest optimisation record; returns False when the replica should stop (job no longer its)."""
        job = self.jobs.get(job_id)
        if job is None or job["status"] != "running" or job["attempt"] != attempt:
            return False
        job["progress"] = record
        job["touched"] = self.clock()
        return True

    def finish(self, job_id: str, attempt: int, png: bytes, summary: dict) -> bool:
        """Store the result PNG; ignored if the job was cancelled or reaped meanwhile."""
        job = self.jobs.get(job_id)
        if job is None or job["status"] != "running" or job["attempt"] != attempt:
            return False
        job["summary"] = summary
        self.results[job_id] = png
        self.result_bytes += len(png)
        if self.directory:
            self._write(f"{job_id}.png", png)
        self._end(job, "done", None, None)
        self.durations = (self.durations + [job["finished"] - job["started"]])[-20:]
        self._evict()
        return True

    def fail(self, job_id: str, attempt: int, error: str, kind: str = "internal") -> None:
        """Mark failed; `kind` "input" or "limit" = the request's fault (HTTP 422), "internal" = ours (503)."""
        job = self.jobs.get(job_id)
        if job is not None and job["status"] in ACTIVE and job["attempt"] == attempt:
            self._end(job, "failed", error, kind)

    # ------------------------------------------------------------------ readers

    def get(self, job_id: str) -> dict | None:
        """Public view of a job (no PNG), or None if unknown or expired."""
        self._reap()
        job = self.jobs.get(job_id)
        if job is None:
            return None
        view = {k: v for k, v in job.items() if k != "touched"}
        view["queue_position"] = self._position(job_id) if job["status"] == "queued" else None
        return view

    def result(self, job_id: str) -> tuple[str | None, bytes | None]:
        """(status, PNG bytes when done) ; (None, None) for an unknown job."""
        self._reap()
        job = self.jobs.get(job_id)
        if job is None:
            return None, None
        return job["status"], self.results.get(job_id)

    def stats(self) -> dict:
        """Counts by status and the queue bound, for /healthz and the queue-depth metric."""
        self._reap()
        return {"capacity": self.capacity, "jobs": {k: v for k, v in self.counts.items() if v}}

    def ping(self) -> int:
        """How many jobs this process read back from disk when it started (0 for a fresh store)."""
        return self.recovered

    # ------------------------------------------------------------------ internals

    def _count(self, status: str, delta: int) -> None:
        self.counts[status] = self.counts.get(status, 0) + delta

    def _set_status(self, job: dict, status: str) -> None:
        self._count(job["status"], -1)
        self._count(status, +1)
        job["status"] = status

    def _end(self, job: dict, status: str, error: str | None, kind: str | None) -> None:
        self._set_status(job, status)
        job.update(error=error, error_kind=kind, finished=self.clock())
        self.active.pop(job["id"], None)
        self.finished[job["id"]] = None
        self._save(job["id"])

    def _drop(self, job_id: str) -> None:
        job = self.jobs.pop(job_id)
        self._count(job["status"], -1)
        self.finished.pop(job_id, None)
        png = self.results.pop(job_id, None)
        if png is not None:
            self.result_bytes -= len(png)
        if self.directory:
            for name in (f"{job_id}.json", f"{job_id}.png"):
                try:
                    os.remove(os.path.join(self.directory, name))
                except FileNotFoundError:
                    pass

    def _position(self, job_id: str) -> int:
        # `active` keeps submission order (a retried job keeps its original place); at most `capacity` long
        return [i for i in self.active if self.jobs[i]["status"] == "queued"].index(job_id)

    def _retry_after(self, replicas: int) -> int:
        """Seconds until a slot is likely free: a typical job's run time, shared by the replicas."""
        typical = statistics.median(self.durations) if self.durations else 5.0
        return int(min(300, max(1, math.ceil(typical / max(1, replicas)))))

    def _reap(self) -> float:
        """The watchdog and the expiry: O(capacity) for the leases, O(1) amortized for the finished."""
        now = self.clock()
        for job_id in list(self.active):
            job = self.jobs[job_id]
            if now - job["touched"] > self.lease_s:
                who = "its ingress" if job["status"] == "queued" else "its replica (stuck or dead)"
                self._end(job, "failed", f"lost: no heartbeat from {who} for {self.lease_s:g} s", "internal")
        while self.finished:
            job_id = next(iter(self.finished))
            if now - self.jobs[job_id]["finished"] <= self.ttl_s:
                break
            self._drop(job_id)
        return now

    def _evict(self) -> None:
        """Oldest finished jobs out while over `max_jobs` records or `max_bytes` of PNGs."""
        while self.finished and (len(self.jobs) > self.max_jobs or self.result_bytes > self.max_bytes):
            self._drop(next(iter(self.finished)))

    # ------------------------------------------------------------------ disk

    def _write(self, name: str, data: bytes) -> None:
        path = os.path.join(self.directory, name)
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # atomic: a store killed mid-write leaves the previous record

    def _save(self, job_id: str) -> None:
        if self.directory:
            self._write(f"{job_id}.json", json.dumps(self.jobs[job_id]).encode())

    def _load(self) -> int:
        """Read the jobs back after a restart. Active jobs get a fresh lease (their ingress and replica
        may still be working on them; if not, the watchdog fails them one lease from now)."""
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        now = self.clock()
        records = []
        for name in os.listdir(self.directory):
            if not name.endswith(".json"):
                if name.endswith(".tmp"):
                    os.remove(os.path.join(self.directory, name))
                continue
            try:
                with open(os.path.join(self.directory, name), "rb") as f:
                    job = json.loads(f.read())
                job["id"], job["status"]  # noqa: B018 - a record without them is not ours
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("job store: unreadable record %s skipped", name)
                continue
            records.append(job)
        for job in sorted(records, key=lambda j: (j.get("finished") or 0, j.get("created") or 0)):
            job_id = job["id"]
            self.jobs[job_id] = job
            self._count(job["status"], +1)
            if job["status"] in ACTIVE:
                job["touched"] = now
            else:
                self.finished[job_id] = None
                if job["status"] == "done":
                    try:
                        with open(os.path.join(self.directory, f"{job_id}.png"), "rb") as f:
                            self.results[job_id] = f.read()
                        self.result_bytes += len(self.results[job_id])
                    except OSError:
                        job.update(status="failed", error="result lost (its file is gone)", error_kind="internal")
                        self._count("done", -1)
                        self._count("failed", +1)
        for job_id in sorted((i for i in self.jobs if self.jobs[i]["status"] in ACTIVE),
                             key=lambda i: self.jobs[i]["created"]):
            self.active[job_id] = None
        self._evict()
        if self.jobs:
            log.warning("job store: recovered %d job(s) from %s", len(self.jobs), self.directory)
        return len(self.jobs)
