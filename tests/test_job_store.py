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


def test_watchdog_fails_a_running_job_its_replica_stopped_reporting_on():
    """The ingress's heartbeat keeps a queued job alive, not a running one: a replica stuck inside a step is seen."""
    store, clock = make(lease_s=10)
    j = store.create({})["id"]
    assert store.start(j, 1, "r")
    for _ in range(3):  # the ingress keeps beating, the replica is silent
        clock.t += 4
        store.touch([j])
    job = store.get(j)
    assert job["status"] == "failed" and "its replica (stuck or dead)" in job["error"]
    assert not store.progress(j, 1, {"step": 9})  # the stuck replica, if it wakes, is told to stop


def test_state_survives_a_restart_from_its_directory(tmp_path):
    clock = Clock()
    store = JobStore(4, 10.0, 100.0, 2, directory=str(tmp_path), clock=clock)
    done, running, queued, cancelled = (store.create({"steps": i})["id"] for i in range(4))
    store.start(done, 1, "r1")
    store.finish(done, 1, b"\x89PNG fake", {"steps": 3})
    store.start(running, 1, "r2")
    store.cancel(cancelled)
    clock.t += 50  # longer than a lease: the restart must not reap the active jobs at once
    again = JobStore(4, 10.0, 100.0, 2, directory=str(tmp_path), clock=clock)  # what Ray's restart runs
    assert again.ping() == 4
    assert again.result(done) == ("done", b"\x89PNG fake") and again.get(done)["summary"] == {"steps": 3}
    assert again.get(running)["status"] == "running" and again.get(queued)["status"] == "queued"
    assert again.get(queued)["queue_position"] == 0 and again.get(cancelled)["status"] == "cancelled"
    assert again.progress(running, 1, {"step": 1}) and again.finish(running, 1, b"png2", {})  # the replica goes on
    assert again.stats()["jobs"] == {"done": 2, "queued": 1, "cancelled": 1}
    assert all(again.create({}).get("id") for _ in range(3))  # capacity 4: 1 queued + 3 more
    assert again.create({}).get("full")
    clock.t += 9  # recovered active jobs keep a fresh lease only
    assert again.get(queued)["status"] == "queued"
    clock.t += 2
    assert again.get(queued)["status"] == "failed"
    # a torn write (the store killed mid-write) leaves a .tmp file and the previous record
    (tmp_path / f"{done}.json.tmp").write_bytes(b"{half")
    (tmp_path / "junk.json").write_bytes(b"not json")
    third = JobStore(4, 10.0, 100.0, 2, directory=str(tmp_path), clock=clock)
    assert third.result(done) == ("done", b"\x89PNG fake")
    assert not (tmp_path / f"{done}.json.tmp").exists()


def test_bounded_in_records_and_bytes_oldest_finished_out_first(tmp_path):
    clock = Clock()
    store = JobStore(2, 10.0, 1e9, 2, directory=str(tmp_path), max_jobs=3, max_bytes=250, clock=clock)
    ids = []
    for i in range(4):
        j = store.create({})["id"]
        store.start(j, 1, "r")
        clock.t += 1
        store.finish(j, 1, bytes(100), {})
        ids.append(j)
    # 4 x 100 bytes > 250: only the newest two results stay; records and files of the rest are gone
    assert [store.result(j)[0] for j in ids] == [None, None, "done", "done"]
    assert store.result_bytes == 200 and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{j}.{ext}" for j in ids[2:] for ext in ("json", "png"))
    # records: max_jobs 3, active jobs are never evicted
    a = store.create({})["id"]
    b = store.create({})["id"]
    assert store.get(a) and store.get(b) and len(store.jobs) == 3 and store.get(ids[2]) is None


def test_a_refused_submission_gives_its_slot_back():
    store, _ = make(capacity=1)
    j = store.create({})["id"]
    assert store.create({}).get("full")
    store.discard(j)
    assert store.get(j) is None and store.stats()["jobs"] == {}
    assert "id" in store.create({})


class CountingDict(dict):
    """A dict that counts full scans (values/items/keys/iter)."""

    scans = 0

    def values(self):
        CountingDict.scans += 1
        return super().values()

    def items(self):
        CountingDict.scans += 1
        return super().items()

    def __iter__(self):
        CountingDict.scans += 1
        return super().__iter__()


def test_calls_do_not_scan_every_job_kept():
    store, clock = make(capacity=4, ttl_s=1e6)
    store.configure(4, 10.0, 1e6, 2, max_jobs=10**6)
    first = None
    for _ in range(3000):
        j = store.create({})["id"]
        first = first or j
        store.cancel(j)
    store.jobs = CountingDict(store.jobs)
    live = store.create({})["id"]
    for call in (lambda: store.get(first), lambda: store.get(live), lambda: store.result(first), store.stats,
                 lambda: store.touch([live]), lambda: store.start(live, 1, "r"), lambda: store.progress(live, 1, {})):
        call()
    assert CountingDict.scans == 0
    assert store.stats()["jobs"] == {"cancelled": 3000, "running": 1}
