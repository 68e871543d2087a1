"""JobStore rules without Ray: bounded queue, retries, leases, cancellation, stale attempts, expiry."""
from serve.job_store import JobStore


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def make(capacity=2, lease_s=10.0, ttl_s=100.0, max_attempts=2):
    clock = Clock()
    return JobStore(capacity, lease_s, ttl_s, max_attempts, clock=clock), clock


def test_bounded_queue_refuses_with_retry_after_and_frees_slots():
    store, _ = make(capacity=2)
    a, b = store.create({})["id"], store.create({})["id"]
    full = store.create({})
    assert full["full"] and full["active"] == 2 and full["retry_after"] >= 1
    assert store.get(a)["queue_position"] == 0 and store.get(b)["queue_position"] == 1
    store.cancel(a)
    assert store.get(a)["status"] == "cancelled"
    assert "id" in store.create({})  # the cancelled job no longer counts


def test_lifecycle_progress_result():
    store, clock = make()
    j = store.create({"steps": 3})["id"]
    assert store.start(j, 1, "r1")
    assert store.progress(j, 1, {"step": 0, "steps": 3})
    clock.t += 2
    assert store.finish(j, 1, b"png", {"steps": 3})
    assert store.result(j) == ("done", b"png")
    assert store.get(j)["progress"] == {"step": 0, "steps": 3}
    assert store.durations == [2.0]
    assert store.create({}) and store._retry_after(1) == 2


def test_dead_replica_retries_then_fails():
    store, _ = make(max_attempts=2)
    j = store.create({})["id"]
    assert store.start(j, 1, "r1")
    assert store.retry(j, "replica died")  # attempt 2 queued
    job = store.get(j)
    assert job["status"] == "queued" and job["attempt"] == 2
    assert not store.progress(j, 1, {"step": 5})  # the old attempt's reports are refused
    assert not store.start(j, 1, "zombie")
    assert store.start(j, 2, "r2")
    assert not store.retry(j, "replica died")  # out of attempts
    job = store.get(j)
    assert job["status"] == "failed" and "gave up after 2" in job["error"] and job["error_kind"] == "internal"


def test_lease_reaps_orphans_but_not_heartbeated_jobs():
    store, clock = make(lease_s=10)
    orphan, driven = store.create({})["id"], store.create({})["id"]
    clock.t += 6
    store.touch([driven])
    clock.t += 6  # orphan untouched for 12 s > lease, driven for 6 s
    assert store.get(orphan)["status"] == "failed" and "no heartbeat" in store.get(orphan)["error"]
    assert store.get(driven)["status"] == "queued"
    assert store.start(driven, 1, "r")
    clock.t += 8
    assert store.progress(driven, 1, {"step": 1})  # progress is a heartbeat too
    clock.t += 8
    assert store.get(driven)["status"] == "running"


def test_cancel_stops_the_replica_and_finished_jobs_expire():
    store, clock = make(ttl_s=100)
    j = store.create({})["id"]
    store.start(j, 1, "r")
    store.cancel(j)
    assert not store.progress(j, 1, {"step": 2})  # the replica's next report says stop
    assert not store.finish(j, 1, b"late", {})
    assert store.result(j) == ("cancelled", None)
    clock.t += 101
    assert store.get(j) is None and store.result(j) == (None, None)
    assert store.stats() == {"capacity": 2, "jobs": {}}
