"""The service as an operator sees it (issue 15): readiness, model versions, bounded waits, per-route pixel
limits, job time limits and cancellation, a job store that dies, Prometheus metrics, and a fuzz run.

Real Serve on a local Ray (one instance for the module), real HTTP, with every deployment on (the
classifier, the style pool with random VGG weights, trained styles from an untrained TransformerNet).
"""
import json
import os
import random
import socket
import string
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import httpx
import pytest
import ray
import torch
from PIL import Image
from ray import serve

from jobs.cli import UserError
from jobs.transformer_net import TransformerNet, save_style_model
from serve.classifier import content_hash
from serve.config import ServeConfig, check_fits, check_serve_config
from serve.job_store import NAMESPACE
from test_serve import HOSTILE_OPTIONS, ROOT, bomb_png, png, style_files, train_red_blue, truncated_png, wait_job

PORT = 18030
URL = f"http://127.0.0.1:{PORT}"
STORE = "raycv_ops_jobs"
APP = "raycv"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replicas() -> dict[str, str]:
    """deployment -> its (single) live replica actor's name."""
    out = {}
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["name"].startswith(f"SERVE_REPLICA::{APP}#"):
            out[a["name"].split("#")[1]] = a["name"]
    return out


def kill_replica(deployment: str) -> None:
    ray.kill(ray.get_actor(replicas()[deployment], namespace="serve"), no_restart=True)


@pytest.fixture(scope="module")
def ops(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ops")
    art = train_red_blue(tmp / "model")
    torch.manual_seed(0)
    save_style_model(tmp / "styles" / "tiny", TransformerNet().eval().state_dict(), "tiny", {"epochs": 0},
                     Image.new("RGB", (40, 40), (30, 90, 200)))
    os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")
    os.environ["RAY_metrics_report_interval_ms"] = "2000"  # metrics reach the endpoint within seconds
    metrics_port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 * 1024**2, log_to_driver=False,
             _metrics_export_port=metrics_port)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT, "request_timeout_s": 90})
    cfg = dict(classifier=str(art), max_batch_size=4, classifier_cpus=0.25, classifier_precision="fp32",
               style_weights="random", style_cpus=0.25, fast_styles=str(tmp / "styles"), fast_style_cpus=0.25,
               max_style_jobs=64, style_max_queued=64, sync_max_size=32 * 32, sync_timeout_s=20.0, max_body_mb=1.0,
               max_pixels=1_000_000, classify_max_pixels=100_000, style_max_steps=5000, style_job_max_s=8.0,
               job_lease_s=30.0, store_timeout_s=3.0, unavailable_retry_s=2, job_store_name=STORE,
               job_store_dir=str(tmp / "jobs"), request_timeout_s=60.0)
    readyz = []  # what /readyz answered while the app started
    serve.run(build(cfg), name=APP, route_prefix="/", blocking=False)
    with httpx.Client(base_url=URL, timeout=60) as client:
        deadline = time.time() + 300
        while True:
            try:
                r = client.get("/readyz")
                readyz.append(r.status_code)
                if r.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, f"never ready: {serve.status()}"
            time.sleep(0.2)
        yield {"client": client, "cfg": cfg, "art": art, "tmp": tmp, "metrics_port": metrics_port,
               "startup_readyz": readyz}
    serve.shutdown()
    ray.shutdown()


def build(cfg):
    from serve.app import build_app

    return build_app(cfg)


@pytest.fixture
def client(ops):
    return ops["client"]


def until(what, check, timeout=60, every=0.2):
    deadline = time.time() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


# ----------------------------------------------------------------------------- readiness, versions, bounded waits


@pytest.mark.slow
def test_readyz_waits_for_every_warm_replica_and_healthz_stays_liveness(ops, client):
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready"
    assert set(r.json()["deployments"]) == {"classifier", "style pool", "style networks"}
    assert all(d["running"] >= 1 for d in r.json()["deployments"].values())
    assert set(ops["startup_readyz"]) <= {200, 503, 404}  # Serve's own 404 before the route exists
    health = client.get("/healthz")
    info = health.json()["classifier"]
    assert info["warmup_ms"] > 0 and info["model_version"] == content_hash(str(ops["art"]))[:12]
    assert str(ops["tmp"]) not in health.text and str(ops["tmp"]) not in r.text
    # a deployment without a running replica: /readyz 503 at once naming it, /healthz still 200, its route
    # 503 + Retry-After at once (not a wait in the router), the other routes unaffected
    kill_replica("StylePool")
    t0 = time.time()
    r = until("readyz 503", lambda: (lambda r: r if r.status_code == 503 else None)(client.get("/readyz")), 30)
    assert "style pool" in r.json()["error"] and int(r.headers["retry-after"]) == 2
    assert client.get("/healthz").status_code == 200
    t1 = time.perf_counter()
    s = client.post("/style/jobs", **style_files({"size": [16, 16], "steps": 3}))
    if s.status_code == 503:  # the replacement may already be up
        assert time.perf_counter() - t1 < 2 and "no replica running" in s.json()["error"]
        assert int(s.headers["retry-after"]) == 2
    else:
        assert s.status_code == 202, s.text
    assert client.post("/classify", content=png((220, 30, 30))).json()["label"] == "red"
    until("readyz 200 again", lambda: client.get("/readyz").status_code == 200, 120)
    assert time.time() - t0 > 0


@pytest.mark.slow
def test_classify_answers_name_the_model_version(ops, client):
    out = client.post("/classify", content=png((30, 30, 220))).json()
    assert out["label"] == "blue" and out["model_version"] == content_hash(str(ops["art"]))[:12]
    assert len(out["model_version"]) == 12


@pytest.mark.slow
def test_classify_has_a_smaller_pixel_limit_than_the_style_routes(client):
    big = png((200, 40, 40), (400, 300))  # 120,000 pixels: over classify_max_pixels, under max_pixels
    r = client.post("/classify", content=big)
    assert r.status_code == 422 and "over the limit of 100000" in r.json()["error"]
    assert client.get("/healthz").json()["classifier"]["max_pixels"] == 100_000
    r = client.post("/style/fast?style=tiny", content=big)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    r = client.post("/style/jobs", **style_files({"size": [16, 16], "steps": 2}, content=big))
    assert r.status_code == 202, r.text
    wait_job(client, r.json()["id"], lambda j: j["status"] in ("done", "failed"), 60)


# ----------------------------------------------------------------------------- time limit, cancellation


@pytest.mark.slow
def test_a_job_over_its_time_limit_ends_failed(client):
    r = client.post("/style/jobs", **style_files({"size": [16, 16], "steps": 5000}))
    job = wait_job(client, r.json()["id"], lambda j: j["status"] in ("done", "failed", "cancelled"), 90)
    assert job["status"] == "failed" and "time limit of 8 s per job" in job["error"], job
    assert job["error_kind"] == "limit" and job["attempt"] == 1


@pytest.mark.slow
def test_delete_stops_a_running_lbfgs_job_and_frees_its_replica(client):
    r = client.post("/style/jobs", **style_files({"size": [32, 32], "steps": 5000, "optimizer": "lbfgs",
                                                  "lbfgs_history": 5}))
    job_id = r.json()["id"]
    wait_job(client, job_id, lambda j: j["status"] == "running" and j["progress"] is not None, 60)
    t0 = time.perf_counter()
    assert client.delete(f"/style/jobs/{job_id}").json()["status"] == "cancelled"
    r = client.post("/style/jobs", **style_files({"size": [16, 16], "steps": 2}))
    job = wait_job(client, r.json()["id"], lambda j: j["status"] in ("done", "failed"), 60)
    # the next job ran at once: well under the 8 s the cancelled one would have kept the replica
    assert job["status"] == "done" and time.perf_counter() - t0 < 6, (job, time.perf_counter() - t0)


@pytest.mark.slow
def test_a_sync_client_that_goes_away_cancels_its_job(client):
    def counts():
        return client.get("/healthz").json()["style"]["jobs"]

    before = counts().get("cancelled", 0)
    t0 = time.perf_counter()
    with pytest.raises(httpx.ReadTimeout):
        client.post("/style", **style_files({"size": [32, 32], "steps": 5000}), timeout=2.5)
    now = until("the job cancelled", lambda: (lambda c: c if c.get("cancelled", 0) > before else None)(counts()), 20)
    assert now.get("running", 0) == 0 and time.perf_counter() - t0 < 8  # before its 8 s limit: cancelled, not timed out
    r = client.post("/style", **style_files({"size": [16, 16], "steps": 2}))
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"


# ----------------------------------------------------------------------------- the job store dies


def store_actor():
    return ray.get_actor(STORE, namespace=NAMESPACE)


def watch(client, stop, seen):
    """Hit /classify and a style route until `stop`; record every status (a 500 would be a bug)."""
    with httpx.Client(base_url=URL, timeout=30) as c:
        while not stop.is_set():
            seen["classify"].append(c.post("/classify", content=png((220, 30, 30))).status_code)
            r = c.get("/style/jobs/0123456789abcdef")
            seen["style"].append(r.status_code)
            if r.status_code == 503:
                assert r.headers.get("retry-after")
            time.sleep(0.05)


@pytest.mark.slow
def test_the_job_store_restarts_mid_job_and_the_job_finishes(client):
    r = client.post("/style/jobs", **style_files({"size": [16, 16], "steps": 40}))
    job_id = r.json()["id"]
    wait_job(client, job_id, lambda j: j["status"] == "running", 60)
    seen, stop = {"classify": [], "style": []}, threading.Event()
    t = threading.Thread(target=watch, args=(client, stop, seen))
    t.start()
    try:
        ray.kill(store_actor(), no_restart=False)  # Ray restarts it; it reads its jobs back from its directory
        job = wait_job(client, job_id, lambda j: j["status"] in ("done", "failed", "cancelled"), 90)
    finally:
        stop.set()
        t.join()
    assert job["status"] == "done", (job["error"], job["progress"])
    assert client.get(f"/style/jobs/{job_id}/result").status_code == 200
    assert set(seen["classify"]) == {200}, seen
    assert set(seen["style"]) <= {404, 503}, seen  # unknown id, or the store restarting: never a 500


@pytest.mark.slow
def test_a_job_store_killed_for_good_is_recreated_from_its_directory(client):
    r = client.post("/style/jobs", **style_files({"size": [16, 16], "steps": 2}))
    done = wait_job(client, r.json()["id"], lambda j: j["status"] in ("done", "failed"), 60)
    assert done["status"] == "done"
    png_before = client.get(f"/style/jobs/{done['id']}/result").content
    seen, stop = {"classify": [], "style": []}, threading.Event()
    t = threading.Thread(target=watch, args=(client, stop, seen))
    t.start()
    try:
        ray.kill(store_actor(), no_restart=True)
        # the next store call finds it dead and creates it again under its name, from the same directory
        r = until("the result back", lambda: (lambda r: r if r.status_code == 200 else None)(
            client.get(f"/style/jobs/{done['id']}/result")), 60)
    finally:
        stop.set()
        t.join()
    assert r.content == png_before
    assert ray.get(store_actor().ping.remote()) >= 1  # it recovered jobs from disk
    assert set(seen["classify"]) == {200} and set(seen["style"]) <= {404, 503}, seen
    r = client.post("/style/jobs", **style_files({"size": [16, 16], "steps": 2}))
    assert wait_job(client, r.json()["id"], lambda j: j["status"] in ("done", "failed"), 60)["status"] == "done"


# ----------------------------------------------------------------------------- metrics


@pytest.mark.slow
def test_prometheus_metrics_appear_on_rays_metrics_endpoint(ops, client):
    for _ in range(6):
        client.post("/classify", content=png((220, 30, 30)))
    client.get("/nope")
    r = client.post("/style/jobs", **style_files({"size": [16, 16], "steps": 2}))
    assert wait_job(client, r.json()["id"], lambda j: j["status"] in ("done", "failed"), 60)["status"] == "done"
    wanted = ['ray_raycv_request_seconds_bucket{', 'route="/style/jobs/{job_id}"', 'route="unmatched"',
              "ray_raycv_classifier_batch_size_bucket", "ray_raycv_style_jobs_total", 'outcome="done"',
              "ray_raycv_style_job_seconds_bucket", "ray_raycv_style_queue_depth"]
    url = f"http://127.0.0.1:{ops['metrics_port']}/metrics"
    last = [""]

    def scraped():
        client.get("/healthz")  # refreshes the queue-depth gauge
        last[0] = httpx.get(url, timeout=10).text
        return last[0] if all(w in last[0] for w in wanted) else None

    try:
        text = until("the metrics on " + url, scraped, 90, every=2)
    except AssertionError:
        raise AssertionError(f"missing {[w for w in wanted if w not in last[0]]}; raycv lines: "
                             f"{[x for x in last[0].splitlines() if 'raycv' in x][:10]}") from None
    lines = [x for x in text.splitlines() if x.startswith("ray_raycv_request_seconds_count")
             and 'route="/classify"' in x and 'status="200"' in x]
    assert lines and sum(float(x.rsplit(" ", 1)[1]) for x in lines) >= 6, \
        [x for x in text.splitlines() if "raycv_request" in x][:20]


# ----------------------------------------------------------------------------- fit check at start


def test_the_deployments_must_fit_the_cluster():
    bug = ServeConfig(classifier="x", fast_styles="reg")  # the report: 3 x 1 CPU on a 2-CPU machine
    with pytest.raises(UserError) as e:
        check_fits(bug, 2.0, 0.0)
    assert "need 3 CPUs (classifier 1 x 1, style pool 1 x 1, trained styles 1 x 1) but Ray has 2 free" in str(e.value)
    assert "\n" not in str(e.value)
    check_fits(ServeConfig(classifier="x", fast_styles="reg", fast_style_cpus=0.5, style_cpus=0.5), 2.0, 0.0)
    check_fits(ServeConfig(classifier="x"), 2.0, 0.0)  # the default pair fits 2 CPUs
    with pytest.raises(UserError, match="need 1 GPUs"):
        check_fits(ServeConfig(classifier="x", style_gpus=1), 8.0, 0.0)
    with pytest.raises(UserError, match="must be longer than --sync-timeout-s"):
        check_serve_config(ServeConfig(classifier="x", request_timeout_s=30, sync_timeout_s=60))


@pytest.mark.slow
def test_python_m_serve_refuses_deployments_that_do_not_fit_in_one_line(ops, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_AUTH_MODE="disabled")
    r = subprocess.run([sys.executable, "-m", "serve", "--classifier", str(ops["art"]), "--style-weights", "random",
                        "--fast-styles", str(ops["tmp"] / "styles"), "--num-cpus", "2", "--port", str(free_port())],
                       capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: the deployments need 3 CPUs")
    assert "Started a local Ray instance" not in r.stdout + r.stderr  # --num-cpus known: refused before Ray starts


# ----------------------------------------------------------------------------- fuzz

HOSTILE_STRINGS = ["", " ", "../../etc/passwd", "%2e%2e%2f", "\u0000", "a" * 5000, "風景", "café", "'; DROP TABLE",
                   "{{7*7}}", "<script>", "tiny", "TINY", "tiny/../tiny", ".", "..", "nan", "-1", "1e309", "\ud800"]
OPTION_NAMES = ["size", "steps", "scales", "style_layers", "content_layers", "optimizer", "lbfgs_history", "lr",
                "lr_gamma", "lr_decay_steps", "seed", "init", "style_weight", "content_weight", "tv_weight",
                "precision", "weights", "device", "unknown"]


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(12 if depth < 3 else 8)
    if kind == 0:
        return rng.randint(-2**70, 2**70)
    if kind == 1:
        return rng.choice([0, 1, 2, 16, 32, -1, 5000, 10**6])
    if kind == 2:
        return rng.uniform(-1e6, 1e6)
    if kind == 3:
        return rng.choice(HOSTILE_STRINGS[:-1])
    if kind == 4:
        return rng.choice([True, False, None])
    if kind == 5:
        return [rng.choice([8, 16, 32, 64, 2048]), rng.choice([8, 16, 32, 64])]
    if kind == 6:
        return rng.choice(["adam", "lbfgs", "noise", "content", "fp32", "bf16"])
    if kind == 7:
        return rng.choice([0.5, 1.0, 1e-3, 1e9, 0.0])
    if kind < 10:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(OPTION_NAMES): random_value(rng, depth + 1) for _ in range(rng.randrange(3))}


def random_options(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.15:
        return rng.choice(list(HOSTILE_OPTIONS.values()))
    if roll < 0.2:
        return "".join(rng.choice(string.printable) for _ in range(rng.randrange(40)))
    if roll < 0.3:  # a job that may well be valid: small
        return json.dumps({"size": [16, 16], "steps": rng.choice([1, 2, 3])})
    return json.dumps({rng.choice(OPTION_NAMES): random_value(rng) for _ in range(rng.randrange(4))})


def random_image(rng: random.Random) -> bytes:
    return rng.choice([
        lambda: png(tuple(rng.randrange(256) for _ in range(3)), (rng.randrange(1, 64), rng.randrange(1, 64))),
        lambda: png((1, 2, 3), (rng.choice([5000, 1, 3]), rng.choice([5, 1, 3000]))),
        lambda: bomb_png(), lambda: truncated_png(), lambda: b"", lambda: os.urandom(rng.randrange(1, 2000)),
        lambda: b"GIF89a" + os.urandom(50), lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n", lambda: b"\0" * 1_100_000,
    ])()


def example(schema: dict, rng: random.Random):
    """A value for a query or path parameter from its OpenAPI schema, often wrong on purpose."""
    if rng.random() < 0.5:
        return rng.choice(HOSTILE_STRINGS[:-1])
    types = [s.get("type") for s in schema.get("anyOf", [schema])]
    return {"string": "tiny", "integer": str(rng.randint(-5, 5))}.get(types[0], "x")


def fuzz_requests(spec: dict, rng: random.Random, n: int) -> list[tuple[str, str, dict]]:
    """(method, path, httpx kwargs): each route of the schema with parameters and bodies from its
    declared fields, mutated (wrong fields, wrong types, hostile values), plus wrong methods."""
    ops_ = [(m.upper(), path, op) for path, item in spec["paths"].items() for m, op in item.items()]
    out = []
    for _ in range(n):
        method, path, op = rng.choice(ops_)
        if rng.random() < 0.05:
            method = rng.choice(["PUT", "PATCH", "DELETE", "OPTIONS", "HEAD", "POST", "GET"])
        params = {}
        for p in op.get("parameters", []):
            value = example(p.get("schema", {}), rng)
            if p["in"] == "path":
                path = path.replace("{" + p["name"] + "}", quote(value, safe="") or "x")
            elif rng.random() < 0.8:
                params[p["name"]] = value
        kwargs: dict = {"params": params}
        body = op.get("requestBody", {}).get("content", {})
        if body:
            form_fields = []
            ref = body.get("multipart/form-data", {}).get("schema", {}).get("$ref")
            if ref:
                form_fields = list(spec["components"]["schemas"][ref.rsplit("/", 1)[-1]]["properties"])
            if "application/octet-stream" in body and rng.random() < 0.4:
                kwargs["content"] = random_image(rng)
                if rng.random() < 0.3:
                    kwargs["headers"] = {"content-type": rng.choice(["image/png", "text/plain", "application/json",
                                                                     "multipart/form-data", "x/y; a=b"])}
            else:
                files, data = {}, {}
                for name in form_fields + (["extra"] if rng.random() < 0.1 else []):
                    if rng.random() < 0.15:
                        continue  # a required field missing
                    if name == "options":
                        data[name] = random_options(rng)
                    elif name == "style" and "image" in form_fields:
                        data[name] = rng.choice(["tiny", *HOSTILE_STRINGS[:-1]])
                    elif rng.random() < 0.1:
                        data[name] = rng.choice(HOSTILE_STRINGS[:-1])  # text where a file is expected
                    else:
                        files[name] = ("f.png", random_image(rng), "image/png")
                kwargs.update(files=files or None, data=data or None)
                if not files and not data:
                    kwargs["content"] = b""
        out.append((method, path, kwargs))
    return out


@pytest.mark.slow
def test_fuzz_every_route_no_5xx_replicas_alive_nothing_queued(client):
    spec = client.get("/openapi.json").json()
    before = replicas()
    rng = random.Random(15)
    requests = fuzz_requests(spec, rng, 1000)
    # hand-written hostile cases on top of the generated ones
    for text in HOSTILE_OPTIONS.values():
        for route in ("/style/jobs", "/style"):
            requests.append(("POST", route, style_files()))
            requests[-1][2]["data"] = {"options": text}
    requests += [("POST", "/classify", {"content": bomb_png()}), ("POST", "/classify", {"content": truncated_png()}),
                 ("GET", "/style/jobs/" + "a" * 10_000, {}), ("GET", "/styles/..%2F..%2Fetc/image", {}),
                 ("POST", "/style/fast", {"params": {"style": "tiny"}, "content": png((1, 2, 3), (5000, 5))}),
                 ("POST", "/style/fast", {"params": {"style": "風景"}, "content": png((1, 2, 3))}),
                 ("POST", "/classify", {"content": b"x", "headers": {"origin": "http://evil.example"}})]
    statuses: dict[int, int] = {}
    fives, accepted, lock = [], [], threading.Lock()

    spent: dict[str, float] = {}
    local, clients = threading.local(), []  # one keep-alive client per sending thread

    def send(req):
        method, path, kwargs = req
        t = time.perf_counter()
        if not hasattr(local, "c"):
            local.c = httpx.Client(base_url=URL, timeout=60)
            clients.append(local.c)
        c = local.c
        r = c.request(method, path, **{k: v for k, v in kwargs.items() if v is not None})
        if path == "/style/jobs" and r.status_code == 202:
            c.delete(f"/style/jobs/{r.json()['id']}")  # keep the queue short: cancelled at once
        with lock:
            key = f"{method} {path if len(path) < 30 else path[:30]}"
            spent[key] = spent.get(key, 0.0) + time.perf_counter() - t
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code >= 500:
                fives.append((method, path, r.status_code, r.text[:200]))
            if r.status_code == 202:
                accepted.append(r.json()["id"])
            if r.status_code >= 400 and method != "HEAD":
                assert "error" in r.json(), (method, path, r.text[:200])

    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(send, requests))
    finally:
        for c in clients:
            c.close()
    took = time.perf_counter() - t0
    assert sum(statuses.values()) >= 1000
    assert not fives, fives[:10]
    assert statuses.get(200, 0) > 50 and statuses.get(422, 0) > 100, statuses
    # every replica alive (the same actors), nothing left queued or running, the service ready
    assert replicas() == before
    until("the queue empty", lambda: not {k: v for k, v in client.get("/healthz").json()["style"]["jobs"].items()
                                          if k in ("queued", "running")}, 60)
    assert client.get("/readyz").status_code == 200
    assert client.post("/classify", content=png((220, 30, 30))).json()["label"] == "red"
    print(f"fuzz: {sum(statuses.values())} requests in {took:.0f} s: {dict(sorted(statuses.items()))}; slowest "
          f"{sorted(spent.items(), key=lambda kv: -kv[1])[:6]}")
