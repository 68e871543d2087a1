"""JobStore: the state of every style-transfer job, in one small detached Ray actor.

Why an actor of its own: job state must outlive any one process that touches a job. The
ingress that accepted a job may be replaced, and the pool replica running it may die; the
store is neither, so a client polling `GET /style/jobs/{id}` always gets an answer.

Life of a job: queued -> running -> done | failed | cancelled. Who moves it:
- the ingress `create`s it (refused when `capacity` jobs are queued or running: the bounded queue),
  drives it through the pool, and on a dead replica asks `retry` (back to queued, attempt + 1,
  or failed after `max_attempts`);
- the pool replica `start`s it, reports `progress` (which also answers "stop" once cancelled),
  then `finish`es or `fail`s it;
- every call first reaps: a queued or running job nobody (ingress heartbeat or replica progress)
  has touched for `lease_s` is marked failed, so no job stays pending forever, and finished
  jobs older than `ttl_s` are dropped with their PNG.
Ray runs an actor's methods one at a time, so no locks are needed.
"""
from __future__ import annotations

import math
import statistics
import time
import uuid

ACTIVE = ("queued", "running")
NAMESPACE = "raycv"


def get_or_create_store(name: str, capacity: int, lease_s: float, ttl_s: float, max_attempts: int):
    """The detached job-store actor `name`: created by whichever replica asks first, shared after.

    Detached, so it is owned by no replica and survives any of them; it lives until the Ray
    cluster stops (or `ray.kill`), holding at most `capacity` active jobs and results for `ttl_s`.
    """
    import ray

    actor = ray.remote(JobStore).options(name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
                                         num_cpus=0)
    return actor.remote(capacity, lease_s, ttl_s, max_attempts)


class JobStore:
    """Plain class; `ray.remote(JobStore).options(name=..., lifetime="detached")` makes the actor."""

    def __init__(self, capacity: int = 16, lease_s: float = 120.0, ttl_s: float = 3600.0, max_attempts: int = 2,
                 clock=time.time):
        self.jobs: dict[str, dict] = {}
        self.results: dict[str, bytes] = {}
        self.durations: list[float] = []  # recent run times, for Retry-After
        self.clock = clock
        self.configure(capacity, lease_s, ttl_s, max_attempts)

    def configure(self, capacity: int, lease_s: float, ttl_s: float, max_attempts: int) -> None:
        """Apply new limits (a redeployed ingress may change them); existing jobs are kept."""
        self.capacity, self.lease_s, self.ttl_s, self.max_attempts = capacity, lease_s, ttl_s, max_attempts

    # ------------------------------------------------------------------ ingress side

    def create(self, options: dict, replicas: int = 1) -> dict:
        """New queued job -> {"id"}; when `capacity` jobs are active -> {"full": True, "retry_after": s}."""
        now = self._reap()
        active = sum(j["status"] in ACTIVE for j in self.jobs.values())
        if active >= self.capacity:
            return {"full": True, "active": active, "retry_after": self._retry_after(replicas)}
        job_id = uuid.uuid4().hex[:16]
        self.jobs[job_id] = {"id": job_id, "status": "queued", "attempt": 1, "max_attempts": self.max_attempts,
                             "options": options, "progress": None, "error": None, "error_kind": None,
                             "replica": None, "created": now, "started": None, "finished": None, "touched": now}
        return {"id": job_id}

    def touch(self, job_ids: list[str]) -> None:
        """Heartbeat from the ingress for the jobs it is still driving."""
        now = self.clock()
        for i in job_ids:
            if i in self.jobs and self.jobs[i]["status"] in ACTIVE:
                self.jobs[i]["touched"] = now
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
        job.update(status="queued", attempt=job["attempt"] + 1, replica=None, touched=self.clock(),
                   retried_because=reason)
        return True

    def cancel(self, job_id: str) -> dict | None:
        """Cancel a queued or running job (the replica stops at its next progress report)."""
        self._reap()
        job = self.jobs.get(job_id)
        if job is not None and job["status"] in ACTIVE:
            self._end(job, "cancelled", "cancelled", None)
        return self.get(job_id)

    # ------------------------------------------------------------------ replica side

    def start(self, job_id: str, attempt: int, replica: str) -> bool:
        """A replica begins `attempt`; False = do not run it (cancelled, reaped, or a stale attempt)."""
        self._reap()
        job = self.jobs.get(job_id)
        if job is None or job["status"] not in ACTIVE or job["attempt"] != attempt:
            return False
        now = self.clock()
        job.update(status="running", replica=replica, started=now, touched=now)
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
        self._end(job, "done", None, None)
        self.durations = (self.durations + [job["finished"] - job["started"]])[-20:]
        return True

    def fail(self, job_id: str, attempt: int, error: str, kind: str = "internal") -> None:
        """Mark failed; `kind` "input" = the request's fault (HTTP 422), "internal" = ours (503)."""
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
        job = self.get(job_id)
        if job is None:
            return None, None
        return job["status"], self.results.get(job_id)

    def stats(self) -> dict:
        """Counts by status and the queue bound, for /healthz."""
        self._reap()
        counts: dict[str, int] = {}
        for j in self.jobs.values():
            counts[j["status"]] = counts.get(j["status"], 0) + 1
        return {"capacity": self.capacity, "jobs": counts}

    # ------------------------------------------------------------------ internals

    def _end(self, job: dict, status: str, error: str | None, kind: str | None) -> None:
        job.update(status=status, error=error, error_kind=kind, finished=self.clock())

    def _position(self, job_id: str) -> int:
        # dicts keep insertion order = submission order (a retried job keeps its original place)
        return [i for i, j in self.jobs.items() if j["status"] == "queued"].index(job_id)

    def _retry_after(self, replicas: int) -> int:
        """Seconds until a slot is likely free: a typical job's run time, shared by the replicas."""
        typical = statistics.median(self.durations) if self.durations else 5.0
        return int(min(300, max(1, math.ceil(typical / max(1, replicas)))))

    def _reap(self) -> float:
        now = self.clock()
        for job_id, job in list(self.jobs.items()):
            if job["status"] in ACTIVE and now - job["touched"] > self.lease_s:
                self._end(job, "failed", f"lost: no heartbeat for {self.lease_s:g} s (its ingress or replica died)",
                          "internal")
            elif job["status"] not in ACTIVE and now - job["finished"] > self.ttl_s:
                del self.jobs[job_id]
                self.results.pop(job_id, None)
        return now
