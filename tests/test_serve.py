"""Ray Serve end to end: real Serve on a local Ray (one instance for the module), real HTTP.

The classifier serves a tiny CIFAR ResNet-18 trained here for a few steps to tell red images
from blue ones; the style pool uses random VGG weights at 16x16 pixels.
"""
import asyncio
import dataclasses
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import pytest
import ray
import torch
import yaml
from PIL import Image
from ray import serve

from jobs.artifact import load_artifact, save_artifact
from jobs.cli import UserError
from jobs.models import build_model
from jobs.precision import autocast_dtype, dtype_name
from jobs.presets import Preset
from serve.app import build_app
from serve.config import PRECISIONS, ServeConfig, config_from_dict
from serve.errors import ApiError, Unavailable, json_error

ROOT = Path(__file__).resolve().parents[1]
PORT = 18010
URL = f"http://127.0.0.1:{PORT}"
CHROMIUM = "/usr/bin/chromium"


# ----------------------------------------------------------------------------- inputs


def png(color, size=(24, 20), noise=0) -> bytes:
    """A PNG of one colour (plus optional noise, which makes it compress badly)."""
    img = Image.new("RGB", size, color)
    if noise:
        g = torch.Generator().manual_seed(noise)
        arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
        img = Image.fromarray(arr)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width=60000, height=60000) -> bytes:
    """A valid tiny PNG whose header claims width x height pixels (a decompression bomb's header)."""
    data = bytearray(png((0, 0, 0), (1, 1)))
    ihdr = 8 + 8  # signature, then length + "IHDR"
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:ihdr + 13]))  # over "IHDR" + its 13 data bytes
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def colour_batch(n, generator):
    """n images (n, 3, 16, 16) in [0, 1]: label 0 = reddish, 1 = bluish, with noise."""
    labels = torch.randint(0, 2, (n,), generator=generator)
    x = torch.rand(n, 3, 16, 16, generator=generator) * 0.4
    x[labels == 0, 0] += 0.6
    x[labels == 1, 2] += 0.6
    return x, labels


def train_red_blue(path):
    """A tiny trained artifact: CIFAR ResNet-18 at 16 px telling red from blue (a few Adam steps)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the cores are shared with Ray's workers
    model = build_model("cifar_resnet18", 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(6):
        x, y = colour_batch(16, g)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, y = colour_batch(64, g)
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    torch.set_num_threads(threads)
    assert acc > 0.9, f"the tiny model did not learn red vs blue (accuracy {acc})"
    return save_artifact(path, model.state_dict(), "cifar_resnet18", ["red", "blue"], Preset.plain(16),
                         {"test_acc": acc})


# fp32 serving (the fixture's) equals local fp32 to rounding (batching and thread counts differ);
# bf16 to its ~3 significant digits
TOLERANCE = {None: 1e-5, torch.bfloat16: 3e-2}


def local_probabilities(artifact, data: bytes, dtype=None) -> dict:
    """What serving must answer: the artifact's model on its own eval transform, computed here
    (with the replica's autocast and memory format)."""
    model, classes, preset, _ = load_artifact(artifact)
    x = preset.eval_transform()(Image.open(io.BytesIO(data)).convert("RGB"))[None]
    if dtype is not None:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        p = torch.softmax(model(x).float(), 1)[0]
    return dict(zip(classes, p.tolist()))


# ----------------------------------------------------------------------------- the server


def deploy(args: dict, classifier_user_config: dict | None = None) -> None:
    """Deploy the app from a config, exactly as `serve deploy serve/config.yaml` does.

    Declarative on purpose: Serve keeps the running replicas when a new config changes only a
    deployment's user_config (the hot swap); `serve.run(app)` would replace every replica.
    (The Python API has no public call for this; the `serve` CLI uses the same client method.)
    """
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    app = {"name": "raycv", "route_prefix": "/", "import_path": "serve.app:build_app", "args": args,
           "runtime_env": {"env_vars": {"PYTHONPATH": str(ROOT)}}}
    if classifier_user_config:
        app["deployments"] = [{"name": "ClassifierDeployment", "user_config": classifier_user_config}]
    schema = ServeDeploySchema.model_validate({"http_options": {"host": "127.0.0.1", "port": PORT},
                                               "applications": [app]})
    _get_global_client().deploy_apps(schema)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    art_a = train_red_blue(tmp / "a")
    torch.manual_seed(1)
    art_b = save_artifact(tmp / "b", build_model("cifar_resnet18", 3).state_dict(), "cifar_resnet18",
                          ["x", "y", "z"], Preset.plain(16))
    # the raylet waits for its metrics agent; on a busy shared machine the default 30 s can expire
    os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")
    # replicas' log lines (Serve's access log included) stay in /tmp/ray/session_latest/logs, out of pytest's output
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 * 1024**2, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    # fp32, not "auto": answers equal the artifact's own evaluation on any CPU
    cfg = dict(classifier=str(art_a), max_batch_size=4, classifier_cpus=0.25, classifier_precision="fp32",
               style_weights="random",
               style_cpus=0.25, max_style_jobs=3, sync_max_size=32 * 32, sync_timeout_s=4.0, max_body_mb=1.0,
               max_pixels=1_000_000, classify_max_pixels=1_000_000, style_max_steps=5000, job_max_attempts=2, job_lease_s=60.0, style_max_queued=4,
               allow_origin="http://allowed.example:3000, https://other.example",
               job_store_dir=str(tmp / "jobs"))  # not the default under $TMPDIR: no jobs from an earlier run
    deploy(cfg)
    with httpx.Client(base_url=URL, timeout=60) as client:
        deadline = time.time() + 240  # replicas start in seconds, but the machine may be busy
        while True:
            try:
                if client.get("/readyz").status_code == 200:  # every replica warm, not only the ingress (/healthz)
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, f"the app did not start: {serve.status()}"
            time.sleep(0.5)
        yield {"client": client, "cfg": cfg, "a": art_a, "b": art_b, "tmp": tmp}
    serve.shutdown()
    ray.shutdown()


@pytest.fixture
def client(server):
    return server["client"]


def wait_job(client, job_id, until, timeout=60):
    """Poll a job until `until(job)` holds; return the job."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/style/jobs/{job_id}").json()
        if until(job):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never reached the expected state: {job}")


def submit_job(client, options, timeout=90):
    """POST /style/jobs as a client should after a replica died: retry a 503 (+ Retry-After) until the
    replacement replica runs (the ingress's view of the replicas can lag the kill by a refresh)."""
    deadline = time.time() + timeout
    while (r := client.post("/style/jobs", **style_files(options))).status_code == 503:
        assert r.headers["retry-after"] and time.time() < deadline, r.text
        time.sleep(0.5)
    return r


def style_files(options=None, content=None, style=None):
    files = {"content": ("c.png", content or png((200, 40, 40), noise=1), "image/png"),
             "style": ("s.png", style or png((40, 40, 200), noise=2), "image/png")}
    data = {"options": json.dumps(options)} if options is not None else {}
    return {"files": files, "data": data}


def replica_actor(deployment):
    """The (single) live replica actor of `deployment` in app raycv."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::raycv#{deployment}#")]
    assert len(names) == 1, names
    return names[0], ray.get_actor(names[0], namespace="serve")


# ----------------------------------------------------------------------------- classifier


@pytest.mark.slow
def test_classify_round_trip_raw_and_multipart(server, client):
    red, blue = png((220, 30, 30)), png((30, 30, 220))
    r = client.post("/classify", content=red, headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"label", "score", "probabilities", "model_version"}
    assert out["label"] == "red" and out["score"] == max(out["probabilities"].values())
    assert sum(out["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    # serving equals the artifact's own eval transform + model, computed locally
    for name, p in local_probabilities(server["a"], red).items():
        assert out["probabilities"][name] == pytest.approx(p, abs=TOLERANCE[None])
    r = client.post("/classify", files={"file": ("b.png", blue, "image/png")})
    assert r.status_code == 200 and r.json()["label"] == "blue"
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["classifier"]["classes"] == ["red", "blue"]
    assert health["classifier"]["precision"] == "fp32"
    assert health["classifier"]["max_batch_size"] == 4


@pytest.mark.slow
def test_healthz_names_the_artifact_without_its_path(server, client):
    from serve.classifier import content_hash

    health = client.get("/healthz")
    info = health.json()["classifier"]
    assert info["artifact"] == server["a"].name and info["artifact_sha256"] == content_hash(str(server["a"]))
    assert len(info["artifact_sha256"]) == 16 and content_hash(str(server["b"])) != info["artifact_sha256"]
    assert str(server["tmp"]) not in health.text and os.sep + "tmp" not in health.text


@pytest.mark.slow
def test_concurrent_requests_are_batched_and_all_answered(client):
    images = [png((220, 30, 30)) if i % 2 else png((30, 30, 220)) for i in range(16)]
    out = [None] * len(images)

    def call(i):
        out[i] = client.post("/classify", content=images[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in out] == [200] * len(images)
    assert [r.json()["label"] for r in out] == ["red" if i % 2 else "blue" for i in range(len(images))]


@pytest.mark.slow
def test_hot_reload_swaps_the_model_and_precision_without_downtime(server, client):
    before, _ = replica_actor("ClassifierDeployment")
    red = png((220, 30, 30))
    codes, stop = [], threading.Event()

    def hammer():
        with httpx.Client(base_url=URL, timeout=30) as c:
            while not stop.is_set():
                codes.append(c.post("/classify", content=red).status_code)

    t = threading.Thread(target=hammer)
    t.start()
    try:
        # only the classifier's user_config changes: a new artifact, and bf16 forced (on any CPU)
        deploy(server["cfg"], {"artifact": str(server["b"]), "precision": "bf16"})
        deadline = time.time() + 60
        while client.post("/classify", content=red).json()["label"] not in ("x", "y", "z"):
            assert time.time() < deadline, "the new artifact was never served"
            time.sleep(0.2)
    finally:
        stop.set()
        t.join()
    out = client.post("/classify", content=red).json()
    for name, p in local_probabilities(server["b"], red, torch.bfloat16).items():
        assert out["probabilities"][name] == pytest.approx(p, abs=TOLERANCE[torch.bfloat16])
    assert codes and set(codes) == {200}, f"requests failed during the swap: {set(codes)}"
    from serve.classifier import content_hash

    assert out["model_version"] == content_hash(str(server["b"]))[:12] != content_hash(str(server["a"]))[:12]
    after, _ = replica_actor("ClassifierDeployment")
    assert after == before, "the replica was restarted instead of reconfigured"
    info = client.get("/healthz").json()["classifier"]
    assert info["classes"] == ["x", "y", "z"] and info["precision"] == "bf16"
    assert info["max_batch_size"] == 4  # unchanged knobs kept
    deploy(server["cfg"], {"artifact": str(server["a"])})  # back to the red/blue model, in the app's fp32
    deadline = time.time() + 60
    while client.post("/classify", content=red).json()["label"] != "red":
        assert time.time() < deadline
        time.sleep(0.2)
    assert client.get("/healthz").json()["classifier"]["precision"] == "fp32"


# ----------------------------------------------------------------------------- style jobs


@pytest.mark.slow
def test_style_job_lifecycle(client):
    r = client.post("/style/jobs", **style_files({"size": [16, 16], "steps": 30}))
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert r.headers["location"] == f"/style/jobs/{job_id}"
    seen = []
    job = wait_job(client, job_id, lambda j: seen.append(j["status"]) or j["status"] in ("done", "failed"))
    assert job["status"] == "done", job
    assert job["attempt"] == 1 and job["error"] is None
    p = job["progress"]
    assert p["step"] == 29 and p["steps"] == 30 and all(p[k] >= 0 for k in ("content", "style", "tv"))
    assert job["summary"]["steps"] == 30
    res = client.get(f"/style/jobs/{job_id}/result")
    assert res.status_code == 200 and res.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(res.content)).size == (16, 16)
    assert client.get("/style/jobs/nope").status_code == 404
    assert client.get("/style/jobs/nope/result").status_code == 404


@pytest.mark.slow
def test_style_sync_small_answers_png_and_408_past_the_timeout(client):
    r = client.post("/style", **style_files({"size": [16, 16], "steps": 5}))
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    assert Image.open(io.BytesIO(r.content)).size == (16, 16)
    r = client.post("/style", **style_files({"size": [32, 32], "steps": 5000}))
    assert r.status_code == 408, r.text
    job = wait_job(client, r.json()["job"], lambda j: j["status"] != "running", timeout=10)
    assert job["status"] == "cancelled"  # the pool is freed, not left computing for nobody
    r = client.post("/style", **style_files({"size": [64, 64], "steps": 5}))
    assert r.status_code == 422 and "POST /style/jobs" in r.json()["error"]


@pytest.mark.slow
def test_queue_full_gives_503_with_retry_after_at_once(client):
    ids = []
    try:
        for _ in range(3):  # max_style_jobs = 3: one runs, two wait
            r = client.post("/style/jobs", **style_files({"size": [16, 16], "steps": 5000}))
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        t0 = time.perf_counter()
        r = client.post("/style/jobs", **style_files({"size": [16, 16], "steps": 5}))
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert time.perf_counter() - t0 < 2.0 and "full" in r.json()["error"]
        wait_job(client, ids[0], lambda j: j["status"] == "running")
        assert client.get(f"/style/jobs/{ids[2]}").json()["queue_position"] == 1
    finally:
        for i in ids:
            assert client.delete(f"/style/jobs/{i}").json()["status"] == "cancelled"
    assert client.get(f"/style/jobs/{ids[0]}/result").status_code == 409
    r = client.post("/style/jobs", **style_files({"size": [16, 16], "steps": 5}))
    assert r.status_code == 202
    assert wait_job(client, r.json()["id"], lambda j: j["status"] in ("done", "failed"))["status"] == "done"


@pytest.mark.slow
def test_a_job_whose_replica_dies_is_retried_then_marked_failed(client):
    r = client.post("/style/jobs", **style_files({"size": [16, 16], "steps": 5000}))
    job_id = r.json()["id"]
    for attempt in (1, 2):
        job = wait_job(client, job_id, lambda j: j["status"] == "running" and j["attempt"] == attempt
                       and j["progress"] is not None, timeout=90)
        name, actor = replica_actor("StylePool")
        assert name.endswith(job["replica"])
        ray.kill(actor, no_restart=True)  # Serve starts a replacement replica
        if attempt == 1:
            job = wait_job(client, job_id, lambda j: j["attempt"] == 2, timeout=30)
            assert "replica died" in job["retried_because"]
    job = wait_job(client, job_id, lambda j: j["status"] == "failed", timeout=30)
    assert "gave up after 2 attempt" in job["error"]
    # the replacement replica serves new jobs (503 + Retry-After at once until it runs)
    r = submit_job(client, {"size": [16, 16], "steps": 3})
    assert wait_job(client, r.json()["id"], lambda j: j["status"] in ("done", "failed"), 90)["status"] == "done"


@pytest.mark.slow
def test_a_job_whose_replica_dies_once_is_retried_and_finishes(client):
    """The other half of the retry rule: one replica death mid-job costs the attempt, not the job."""
    r = submit_job(client, {"size": [16, 16], "steps": 150})  # the test before killed a replica
    job_id = r.json()["id"]
    job = wait_job(client, job_id, lambda j: j["status"] == "running" and j["progress"] is not None, timeout=90)
    name, actor = replica_actor("StylePool")
    assert name.endswith(job["replica"])
    ray.kill(actor, no_restart=True)
    job = wait_job(client, job_id, lambda j: j["status"] in ("done", "failed"), timeout=180)
    assert (job["status"], job["attempt"]) == ("done", 2), job
    assert "replica died" in job["retried_because"]
    png = client.get(f"/style/jobs/{job_id}/result")
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")


@pytest.mark.slow
def test_cancelled_queued_jobs_leave_the_pool_queue(client):
    """A submit-then-DELETE loop (3x style_max_queued) behind a running job: each cancelled job's request
    is withdrawn from the StylePool router, so its max_queued_requests never fills for the next job."""
    r = submit_job(client, {"size": [16, 16], "steps": 5000})  # the tests before killed replicas
    busy = r.json()["id"]
    try:
        wait_job(client, busy, lambda j: j["status"] == "running")
        for _ in range(12):
            r = client.post("/style/jobs", **style_files({"size": [16, 16], "steps": 5}))
            assert r.status_code == 202, r.text
            assert client.delete(f"/style/jobs/{r.json()['id']}").json()["status"] == "cancelled"
        r = client.post("/style/jobs", **style_files({"size": [16, 16], "steps": 5}))
        assert r.status_code == 202
        after = r.json()["id"]
        time.sleep(1)
        assert client.get(f"/style/jobs/{after}").json()["status"] == "queued"  # not failed: the pool had room
    finally:
        client.delete(f"/style/jobs/{busy}")
    assert wait_job(client, after, lambda j: j["status"] in ("done", "failed"))["status"] == "done"


def test_every_deployment_has_a_queue_limit(tmp_path):
    app = build_app({"classifier": str(tmp_path), "fast_styles": str(tmp_path), "classifier_max_queued": 5,
                     "style_max_queued": 7, "fast_style_max_queued": 9, "fast_style_max_ongoing": 2})
    deployments = {a._bound_deployment.name: a._bound_deployment for a in app._bound_deployment.init_args
                   if hasattr(a, "_bound_deployment")}
    assert {name: d.max_queued_requests for name, d in deployments.items()} == {
        "ClassifierDeployment": 5, "StylePool": 7, "FastStylePool": 9}
    assert deployments["FastStylePool"].max_ongoing_requests == 2
    defaults = ServeConfig()
    assert defaults.style_max_queued >= defaults.max_style_jobs and defaults.fast_style_max_queued > 0


# ----------------------------------------------------------------------------- bad input


def truncated_png() -> bytes:
    data = png((0, 0, 0), (64, 64), noise=3)
    return data[: len(data) // 2]


PART_HEAD = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
BAD_CLASSIFY = {
    "non-image bytes": (dict(content=b"this is not an image"), 422),
    "truncated image": (dict(content=truncated_png()), 422),
    "decompression bomb header": (dict(content=bomb_png()), 422),
    "too many pixels": (dict(content=png((1, 2, 3), (1100, 1000))), 422),
    "empty body": (dict(content=b""), 400),
    # FastAPI reads a url-encoded body for the route's Form parameters: once a 500 ("Stream consumed")
    "url-encoded form": (dict(data={"x": "abc"}), 415),
    "empty url-encoded form": (dict(content=b"", headers={"content-type": "application/x-www-form-urlencoded"}), 400),
    "wrong field name": (dict(files={"image": ("a.png", png((1, 2, 3)), "image/png")}), 422),
    "field is text not file": (dict(data={"file": "hello"}, files={"other": ("x", b"1")}), 422),
    "oversized body": (dict(content=b"\0" * (1024 * 1024 + 1)), 413),
    "oversized chunked body": (dict(content=iter([b"\0" * 600_000, b"\0" * 600_000])), 413),
    # counted while FastAPI's multipart parser reads it: refused mid-stream, not after buffering
    "oversized chunked multipart": (dict(content=iter([PART_HEAD + b"\0" * 600_000, b"\0" * 600_000, b"\r\n--xyz--\r\n"]),
                                         headers={"content-type": "multipart/form-data; boundary=xyz"}), 413),
    "repeated file field": (dict(files=[("file", ("a.png", png((1, 2, 3)))), ("file", ("b.png", png((1, 2, 3))))]), 422),
    "extra form field": (dict(files={"file": ("a.png", png((1, 2, 3))), "other": ("b", b"1")}), 422),
    "empty file": (dict(files={"file": ("a.png", b"")}), 400),
    "multipart without parts": (dict(content=b"--xyz\r\nnonsense", headers={"content-type": "multipart/form-data; boundary=xyz"}), 422),
    "multipart without boundary": (dict(content=b"abc", headers={"content-type": "multipart/form-data"}), 400),
}

BAD_STYLE = {
    "unknown option": ({"sizes": [16, 16]}, 422),
    "server-fixed option": ({"weights": "imagenet"}, 422),
    "negative steps": ({"steps": -1}, 422),
    "too many steps": ({"steps": 10**6}, 422),
    "fractional steps": ({"steps": 2.5}, 422),
    "size too large": ({"size": [2000, 2000]}, 422),
    "size not a pair": ({"size": [16]}, 422),
    "size not numbers": ({"size": "big"}, 422),
    "unknown optimizer": ({"optimizer": "sgd"}, 422),
    "infinite weight": ({"style_weight": float("inf")}, 422),
    "bad layer": ({"style_layers": [99]}, 422),
    "options not an object": ([1, 2], 422),
}


# issue 15: options that reached the replica (or crashed the ingress) before; raw JSON text, as a client sends it
HOSTILE_OPTIONS = {
    "NaN size": '{"size": [NaN, 64]}',
    "Infinity layer": '{"content_layers": [Infinity]}',
    "-Infinity lr": '{"lr": -Infinity}',
    "NaN lr_gamma": '{"lr_gamma": NaN}',
    "nested deeply": '{"size": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "huge integer": '{"steps": 1' + "0" * 5000 + "}",
    "lr_decay_steps 0": '{"lr_decay_steps": 0}',
    "lbfgs_history 0": '{"optimizer": "lbfgs", "lbfgs_history": 0}',
    "lbfgs_history negative": '{"optimizer": "lbfgs", "lbfgs_history": -5}',
    "lbfgs_history huge": '{"optimizer": "lbfgs", "lbfgs_history": 1500000000}',
    "lbfgs history memory": '{"optimizer": "lbfgs", "lbfgs_history": 1000, "size": [1000, 1000], "steps": 1}',
    "seed over 2^63": '{"seed": 9223372036854775808, "init": "noise"}',
    "seed over 2^64": '{"seed": 18446744073709551617, "init": "noise"}',
    "thin size": '{"size": [8, 2048]}',
    "scale under VGG minimum": '{"size": [64, 64], "scales": [0.2]}',
    "deep layer at 16 px": '{"size": [16, 16], "style_layers": [36]}',
    "duplicate scales": '{"size": [16, 16], "scales": [1, 1]}',
    "too many scales": json.dumps({"scales": [1] * 5000}),
    "five distinct scales": '{"size": [512, 512], "scales": [0.2, 0.4, 0.6, 0.8, 1]}',
    "duplicate style layers": json.dumps({"style_layers": [28] * 12000}),
    "duplicate content layers": '{"content_layers": [25, 25]}',
    "too many layers": json.dumps({"style_layers": list(range(17))}),
    "total work": '{"size": [32, 32], "steps": 5000, "scales": [0.5, 1]}',
    "size a string list": '{"size": ["16", "16"]}',
    "options a string": '"{}"',
    "options null": "null",
}


def test_hostile_style_options_are_a_422_before_any_queue():
    """The ingress's checks (no Ray): each hostile option set is an ApiError(422) naming the problem."""
    from serve.style_jobs import style_job_config

    cfg = ServeConfig(classifier="x", style_weights="random", style_max_steps=5000, style_max_work=50_000)
    for case, options in HOSTILE_OPTIONS.items():
        with pytest.raises(ApiError) as caught:
            style_job_config(options, cfg, sync=False)
        assert caught.value.status_code == 422 and caught.value.detail, case
    # the limits still let every ordinary job through
    for options in ('{"size": [16, 16], "steps": 30}', '{"size": [64, 64], "scales": [0.25, 1]}',
                    '{"optimizer": "lbfgs", "size": [300, 450]}', '{"size": [16, 16], "style_layers": [0, 5, 10, 19, 28]}'):
        style_job_config(options, cfg, sync=False)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(HOSTILE_OPTIONS))
@pytest.mark.parametrize("route", ["/style/jobs", "/style"])
def test_hostile_style_options_are_a_4xx_json_live(client, case, route):
    r = client.post(route, files=style_files()["files"], data={"options": HOSTILE_OPTIONS[case]})
    assert 400 <= r.status_code < 500, r.text
    assert r.headers["content-type"] == "application/json" and isinstance(r.json()["error"], str)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_CLASSIFY))
def test_bad_classify_input_is_a_4xx_json(client, case):
    kwargs, status = BAD_CLASSIFY[case]
    r = client.post("/classify", **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["error"]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_STYLE))
def test_bad_style_options_are_a_422(client, case):
    options, status = BAD_STYLE[case]
    r = client.post("/style/jobs", **style_files(options))
    assert r.status_code == status, r.text
    assert r.json()["error"]


@pytest.mark.slow
def test_bad_style_requests_are_4xx(client):
    bad = [
        (dict(**style_files({}, content=b"GIF89a nonsense")), 422),
        (dict(**style_files({}, style=bomb_png())), 422),
        (dict(files={"content": ("c.png", png((1, 2, 3)))}), 422),  # style missing
        (dict(files={**style_files({})["files"], "extra": ("e", b"1")}), 422),
        (dict(files=style_files(None)["files"], data={"options": "{not json"}), 422),
        (dict(content=png((1, 2, 3))), 415),
        (dict(content=b""), 400),
        (dict(data={"content": "a", "style": "b"}), 415),  # url-encoded: once a 500 ("Stream consumed")
    ]
    for kwargs, status in bad:
        r = client.post("/style/jobs", **kwargs)
        assert r.status_code == status, (kwargs.keys(), r.text)
        assert r.json()["error"]
    assert client.post("/style/jobs/abc").status_code == 405


def encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 30, 30)).save(buf, format=fmt)
    return buf.getvalue()


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
REFUSED_FORMATS = {"EPS": EPS, "ICO": encoded("ICO"), "PPM": encoded("PPM"), "PCX": encoded("PCX")}


def test_image_formats_outside_the_allowlist_are_refused_before_decoding():
    from jobs.images import IMAGE_FORMATS, ImageInputError, UnsupportedImageFormat, load_image

    assert IMAGE_FORMATS == ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
    for fmt in IMAGE_FORMATS:
        assert load_image(encoded(fmt)).size == (20, 20), fmt
    for fmt, data in REFUSED_FORMATS.items():
        with pytest.raises(UnsupportedImageFormat, match=f"is {fmt}; accepted formats: PNG"):
            load_image(data)
    assert load_image(encoded("PPM"), formats=["PPM"]).size == (20, 20)  # the caller may widen the list
    assert load_image(encoded("PPM"), formats=None).size == (20, 20)
    with pytest.raises(ImageInputError) as caught:  # garbage is still "not an image", a 422
        load_image(b"garbage garbage garbage")
    assert type(caught.value) is ImageInputError and caught.value.status == 422
    response = asyncio.run(json_error(_request(), UnsupportedImageFormat("image is EPS")))
    assert response.status_code == 415 and json.loads(response.body) == {"error": "image is EPS"}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", list(REFUSED_FORMATS))
def test_image_formats_outside_the_allowlist_are_a_415_live(client, fmt):
    data = REFUSED_FORMATS[fmt]
    for r in (client.post("/classify", content=data),
              client.post("/classify", files={"file": ("x", data)}),
              client.post("/style/jobs", **style_files({"size": [16, 16]}, content=data)),
              client.post("/style", **style_files({"size": [16, 16]}, style=data))):
        assert r.status_code == 415 and f"is {fmt}" in r.json()["error"], r.text


@pytest.mark.slow
def test_replicas_survive_bad_input(client):
    """After every bad request above, the same replicas still answer correctly."""
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.post("/classify", content=png((220, 30, 30))).json()["label"] == "red"


@pytest.mark.slow
def test_cross_origin_writes_are_refused_unless_allowed(client):
    red = png((220, 30, 30))
    for origin, status in ((None, 200), (URL, 200),  # curl; the service's own page (what a browser sends)
                           ("http://localhost:%d" % PORT, 403),  # another host name is another origin
                           ("http://evil.example", 403), ("null", 403), ("http://127.0.0.1:1", 403),
                           ("http://allowed.example:3000", 200), ("https://other.example", 200)):
        headers = {"origin": origin} if origin else {}
        r = client.post("/classify", content=red, headers=headers)
        assert r.status_code == status, (origin, r.text)
        if status == 403:
            assert "cross-origin POST" in r.json()["error"] and "--allow-origin" in r.json()["error"]
    evil = {"origin": "http://evil.example"}
    assert client.delete("/style/jobs/abc", headers=evil).status_code == 403
    assert client.delete("/style/jobs/abc", headers={"origin": URL}).status_code == 404
    assert client.post("/style/jobs", headers=evil, **style_files({"size": [16, 16]})).status_code == 403
    assert client.get("/healthz", headers=evil).status_code == 200  # reads pass
    # the web page's own requests, as a browser sends them: same origin
    page = client.get("/")
    assert page.status_code == 200 and "fetch(" in page.text
    r = client.post("/style/jobs", headers={"origin": URL, "referer": URL + "/"}, **style_files({"size": [16, 16], "steps": 2}))
    assert r.status_code == 202, r.text
    client.delete(f"/style/jobs/{r.json()['id']}", headers={"origin": URL})


def test_origin_rules_without_a_server():
    from serve.origin import normalize, parse_allowed

    assert normalize("HTTP://LocalHost:80") == "http://localhost" and normalize("https://a.b:443/") == "https://a.b"
    assert normalize("http://127.0.0.1:8000") == "http://127.0.0.1:8000"
    for bad in ("null", "file://", "http://a.b/path", "ftp://a.b", "a.b", "http://a.b:99999"):
        assert normalize(bad) is None, bad
    assert parse_allowed(" http://a.b:3000 ,https://c.d,") == ["http://a.b:3000", "https://c.d"]
    with pytest.raises(UserError, match="--allow-origin 'nope' is not an origin"):
        config_from_dict({"classifier": "x", "allow_origin": "http://ok.example,nope"})


# ----------------------------------------------------------------------------- page, docs, config, CLI


def form_schema(spec, path) -> dict:
    """The multipart form FastAPI generated for POST `path`: {field: schema}, and the required fields."""
    content = spec["paths"][path]["post"]["requestBody"]["content"]
    ref = content["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[-1]
    schema = spec["components"]["schemas"][ref]
    return schema["properties"], set(schema.get("required", ()))


@pytest.mark.slow
def test_openapi_docs_come_from_the_route_signatures(client):
    spec = client.get("/openapi.json").json()
    for path in ("/classify", "/style/jobs", "/style/jobs/{job_id}", "/style/jobs/{job_id}/result", "/style",
                 "/healthz", "/styles", "/style/fast"):
        assert path in spec["paths"]
    for path in ("/style/jobs", "/style"):
        fields, required = form_schema(spec, path)
        assert set(fields) == {"content", "style", "options"} and required == {"content", "style"}
        assert fields["content"]["contentMediaType"] == "application/octet-stream"
    fields, required = form_schema(spec, "/classify")
    assert set(fields) == {"file"} and required == set()  # the raw body is the other way
    assert "application/octet-stream" in spec["paths"]["/classify"]["post"]["requestBody"]["content"]
    fields, _ = form_schema(spec, "/style/fast")
    assert set(fields) == {"image", "style"}
    assert [p["name"] for p in spec["paths"]["/style/fast"]["post"]["parameters"]] == ["style"]
    assert client.get("/docs").status_code == 200


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} absent (apt-get install chromium)")
def test_web_page_in_headless_chromium(server, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    red, content, style = tmp_path / "red.png", tmp_path / "content.png", tmp_path / "style.png"
    red.write_bytes(png((220, 30, 30), (40, 30)))
    content.write_bytes(png((200, 40, 40), noise=1))
    style.write_bytes(png((40, 40, 200), noise=2))
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            page.goto(URL + "/")
            page.set_input_files("#classify-file", str(red))
            page.click("#classify-submit")
            page.wait_for_function("document.getElementById('label').textContent.length > 0", timeout=30_000)
            assert page.text_content("#label") == "red"
            assert "red" in page.text_content("#probabilities")
            # stylize: submit, watch the progress, see the image
            page.set_input_files("#content-file", str(content))
            page.set_input_files("#style-file", str(style))
            page.fill("#height", "16")
            page.fill("#width", "16")
            page.fill("#steps", "20")
            page.click("#style-submit")
            page.wait_for_selector("#style-result:not([hidden])", timeout=60_000)
            assert "done" in page.text_content("#style-status")
            assert page.evaluate("document.getElementById('style-result').naturalWidth") == 16
            assert page.evaluate("document.getElementById('style-progress').value") == 20
        finally:
            browser.close()


@pytest.mark.slow
def test_config_yaml_is_a_valid_serve_config(server):
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    assert schema.http_options.host == "127.0.0.1"
    (application,) = raw["applications"]
    assert application["import_path"] == "serve.app:build_app" and application["route_prefix"] == "/"
    # every arg lands in the config unchanged (the fixture deploys build_app itself, from such args)
    args = {**application["args"], "classifier": str(server["a"])}
    cfg = config_from_dict(args)
    assert {k: getattr(cfg, k) for k in args} == args
    with pytest.raises(UserError, match="is not a directory"):
        build_app({**args, "classifier": str(server["tmp"] / "missing")})
    with pytest.raises(UserError, match="unknown field"):
        build_app({**args, "batch_size": 3})


@pytest.mark.slow
def test_cli_user_errors_are_one_line(server, tmp_path, capsys):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "serve", "--classifier", str(tmp_path / "missing")], capture_output=True,
                       text=True, env=env, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    assert "not a model artifact" in r.stderr
    # the other checks run in-process: main() raises UserError (run_cli prints it) before any Ray starts
    from jobs.cli import run_cli
    from serve.__main__ import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_cli(main, ["--classifier", str(server["a"]), "--max-batch-size", "x"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "invalid int value" in err and len(err.strip().splitlines()) == 1, err

    for argv, message in ((["--max-batch-size", "0"], "--max-batch-size must be at least 1"),
                          (["--classifier-precision", "fp8"], "invalid choice: 'fp8'"),
                          (["--max-body-mb", "0"], "--max-body-mb must be positive"),
                          (["--batch-wait-ms", "5", "--batch-wait-timeout-s", "0.1"], "not both"),
                          (["--style-replicas", "0"], "--style-replicas must be at least 1 with the style pool"),
                          (["--style-weights", str(tmp_path / "nope.pt")], "weights must be imagenet, random or")):
        with pytest.raises(UserError, match=message):
            main(["--classifier", str(server["a"]), *argv])
    with pytest.raises(UserError, match="classifier artifact directory is required"):
        main([])
    with pytest.raises(UserError, match="unknown field"):
        config_from_dict({"classifier": "x", "batch_size": 3})
    with pytest.raises(UserError, match="--classifier-precision must be one of auto, fp32, bf16"):
        config_from_dict({"classifier": "x", "classifier_precision": "fp8"})


# ----------------------------------------------------------------------------- without a server


def test_every_config_field_is_a_flag():
    from serve.__main__ import build_cli, config_from

    parser = build_cli()
    help_text = parser.format_help()
    for f in dataclasses.fields(ServeConfig):
        assert "--" + f.name.replace("_", "-") in help_text, f.name
    cfg = config_from(parser.parse_args(["--classifier", "x", "--batch-wait-ms", "5", "--no-style",
                                         "--style-replicas", "0", "--job-ttl-s", "7"]))
    assert (cfg.batch_wait_timeout_s, cfg.style, cfg.style_replicas, cfg.job_ttl_s) == (0.005, False, 0, 7.0)
    assert cfg == dataclasses.replace(ServeConfig(), classifier="x", batch_wait_timeout_s=0.005, style=False,
                                      style_replicas=0, job_ttl_s=7.0)  # and nothing else changed


# (precision, device, workload, native bf16 CPU) -> autocast dtype (None: fp32), from the table in jobs/precision.py
PRECISION_TABLE = [
    ("fp32", "cpu", "classify", True, None),
    ("fp32", "cuda", "classify", None, None),
    ("bf16", "cpu", "classify", False, torch.bfloat16),
    ("bf16", "cuda", "stylize", None, torch.bfloat16),
    ("auto", "cpu", "classify", False, None),
    ("auto", "cpu", "classify", True, torch.bfloat16),
    ("auto", "cuda", "classify", None, torch.float16),
    ("auto", "cpu", "stylize", False, None),
    ("auto", "cpu", "stylize", True, torch.bfloat16),
    ("auto", "cuda", "stylize", None, None),  # the style network was checked in fp32 on GPU, not fp16
]


@pytest.mark.parametrize("precision, device, workload, native, expected", PRECISION_TABLE)
def test_the_precision_rule_the_replicas_use(precision, device, workload, native, expected):
    assert precision in PRECISIONS
    assert autocast_dtype(precision, device, workload, native_bf16=native) is expected
    assert dtype_name(expected) == {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[expected]


def test_errors_from_a_replica_keep_their_answer():
    from ray.exceptions import RayTaskError

    e = pickle.loads(pickle.dumps(Unavailable("queue full", retry_after=3, job="j1")))  # as Ray ships it
    assert type(e) is Unavailable and (e.status_code, e.detail, e.extra) == (503, "queue full", {"job": "j1"})
    wrapped = RayTaskError("classify", "Traceback ...", ApiError(404, "unknown style 'x'")).as_instanceof_cause()
    for raised, status, body, headers in ((e, 503, {"error": "queue full", "job": "j1"}, {"retry-after": "3"}),
                                          (wrapped, 404, {"error": "unknown style 'x'"}, {}),
                                          (RuntimeError("bug"), 500, {"error": "internal error (RuntimeError)"}, {})):
        response = asyncio.run(json_error(_request(), raised))
        assert response.status_code == status and json.loads(response.body) == body
        assert {k: v for k, v in response.headers.items() if k == "retry-after"} == headers


def test_the_style_header_is_ascii_for_any_style_name():
    from urllib.parse import unquote

    from serve.app import style_headers

    assert style_headers("tiny", 3.14159) == {"X-Style": "tiny", "X-Inference-Ms": "3.1"}
    for name in ("風景", "café", "Звезда_1", "a.b-c"):
        value = style_headers(name, 1.0)["X-Style"]
        value.encode("latin-1")  # what Starlette does with a header value
        assert value.isascii() and unquote(value) == name


def _request():
    from starlette.requests import Request

    return Request({"type": "http", "method": "POST", "path": "/classify", "headers": [], "query_string": b""})
