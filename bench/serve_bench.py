"""Closed-loop load test of the classifier over loopback HTTP: Serve batched vs unbatched vs plain FastAPI.

    flock -x /tmp/heavy.lock python bench/serve_bench.py            # about 10 minutes on 2 cores

One run starts, side by side on one machine:
  - "serve-batched":   the real service (serve.app:build_app, style pool off), @serve.batch up to 16;
  - "serve-unbatched": the same with max_batch_size 1 (both at --precision, default the service's auto);
  - "plain-fastapi":   what a user would otherwise write: one uvicorn process, FastAPI, the same
                       artifact and eval transform, one forward per request (see `plain_app`);
  - with --malloc-ablation also each of the three with the other choice of malloc settings
    (jobs.hostmem, opt-in: RAYCV_KEEP_FREED_MEMORY=1 gives them to the batching app), e.g.
    "serve-batched-keep-freed-memory", "serve-unbatched-keep-freed-memory", "plain-fastapi-keep-freed-memory".
Each gets the same model (ResNet-18 at 224x224 by default, random weights: speed only) and
the same JPEG. For concurrency 1, 8, 32 a closed loop of C clients sends requests back to
back, bounded by --requests-per-client and --max-seconds; the cells are interleaved and
repeated --repeats times, the median is reported. Then an overload run at twice the
batched service's capacity (ongoing + queued) counts the answers by status: the target is
no errors other than 503.
"""

import argparse
import asyncio
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jobs import hostmem  # noqa: E402


# ----------------------------------------------------------------------------- the plain server


def plain_app(artifact: str, threads: int):
    """The baseline: FastAPI + PyTorch as a tutorial writes it (decode, transform, forward, softmax)."""
    import torch
    from fastapi import FastAPI, Request
    from PIL import Image

    from jobs.artifact import load_artifact

    torch.set_num_threads(threads)
    model, classes, preset, _ = load_artifact(artifact)
    transform = preset.eval_transform()
    app = FastAPI()

    # (Request is resolved from this function's scope: no `from __future__ import annotations` here)
    @app.post("/classify")
    async def classify(request: Request):
        img = Image.open(io.BytesIO(await request.body())).convert("RGB")
        with torch.inference_mode():
            p = torch.softmax(model(transform(img)[None]), 1)[0]
        i = int(p.argmax())
        return {"label": classes[i], "score": float(p[i]), "probabilities": dict(zip(classes, p.tolist()))}

    return app


def run_plain_server(artifact: str, port: int, threads: int) -> None:
    import uvicorn

    uvicorn.run(plain_app(artifact, threads), host="127.0.0.1", port=port, log_level="warning")


# ----------------------------------------------------------------------------- load generator


async def closed_loop(url: str, body: bytes, concurrency: int, per_client: int, max_seconds: float,
                      backoff_503_s: float = 0.0) -> dict:
    """C clients, each sending its next request when the previous answer arrives.

    Stops after per_client requests per client or max_seconds. Returns req/s (2xx only),
    latency percentiles of 2xx answers, and counts by status ("transport" = no HTTP answer).
    """
    import httpx

    latencies: list[float] = []
    statuses: dict[str, int] = {}
    deadline = time.perf_counter() + max_seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def worker():
            for _ in range(per_client):
                if time.perf_counter() > deadline:
                    return
                t = time.perf_counter()
                try:
                    r = await client.post(url, content=body, headers={"content-type": "image/jpeg"})
                    key = str(r.status_code)
                except httpx.HTTPError as e:
                    key = f"transport:{type(e).__name__}"
                statuses[key] = statuses.get(key, 0) + 1
                if key == "200":
                    latencies.append(time.perf_counter() - t)
                elif key == "503" and backoff_503_s:
                    await asyncio.sleep(backoff_503_s)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    latencies.sort()

    def pct(q):
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else float("nan")

    return {"ok": len(latencies), "wall_s": wall, "rps": len(latencies) / wall, "p50_ms": pct(0.5),
            "p99_ms": pct(0.99), "statuses": statuses}


def wait_http(url: str, timeout: float = 300) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not come up in {timeout} s")


# ----------------------------------------------------------------------------- main


def make_inputs(tmp: Path, arch: str, crop: int, image: str | None) -> tuple[Path, bytes]:
    import torch
    from PIL import Image

    from jobs.artifact import save_artifact
    from jobs.models import build_model
    from jobs.presets import Preset

    torch.manual_seed(0)
    preset = Preset.imagenet(crop) if arch == "resnet18" else Preset.plain(crop)
    art = save_artifact(tmp / "model", build_model(arch, 2).state_dict(), arch, ["hotdog", "not-hotdog"], preset)
    if image:
        body = Path(image).read_bytes()
    else:  # a 320x240 photo-sized JPEG of noise
        g = torch.Generator().manual_seed(0)
        arr = (torch.rand(240, 320, 3, generator=g) * 255).to(torch.uint8).numpy()
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        body = buf.getvalue()
    return art, body


def measure(args, artifact: Path, body: bytes, plain_ports: dict[str, int]):
    """Start the Serve apps, wait for every server, run the interleaved cells and the overload."""
    import httpx
    import ray
    from ray import serve

    from serve.app import build_app

    # logical CPUs: each classifier replica reserves `threads` of them; only one server is loaded at a time
    for attempt in range(3):  # a raylet start can time out on a heavily loaded machine: try again
        try:
            ray.init(num_cpus=(4 if args.malloc_ablation else 2) * args.threads, include_dashboard=False, object_store_memory=256 * 1024**2,
                     log_to_driver=False)
            break
        except Exception as e:  # noqa: BLE001 - ray raises a bare Exception for this
            print(f"ray.init failed ({str(e)[:80]}); retrying", flush=True)
            ray.shutdown()
            if attempt == 2:
                raise
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    common = dict(classifier=str(artifact), style=False, classifier_cpus=args.threads, classifier_max_ongoing=32,
                  classifier_max_queued=64, batch_wait_timeout_s=0.01, classifier_precision=args.precision)
    apps = {"batched": args.max_batch_size, "unbatched": 1}
    for name, batch in apps.items():
        serve.run(build_app({**common, "max_batch_size": batch}), name=name, route_prefix=f"/{name}")
    names = list(apps)
    if args.malloc_ablation:  # each app with the other choice of malloc settings for its replicas (jobs.hostmem)
        for name, batch in apps.items():
            keep = not hostmem.runtime_env(batch > 1)  # the other one (forced, for the unbatched app)
            names.append(f"{name}-{'keep-freed-memory' if keep else 'default-malloc'}")
            os.environ[hostmem.SWITCH] = "force" if keep else "0"
            try:
                serve.run(build_app({**common, "max_batch_size": batch}), name=names[-1], route_prefix=f"/{names[-1]}")
            finally:
                del os.environ[hostmem.SWITCH]
    servers = {f"serve-{name}": f"http://127.0.0.1:{args.port}/{name}/classify" for name in names}
    servers.update({name: f"http://127.0.0.1:{port}/classify" for name, port in plain_ports.items()})
    for name in names:
        wait_http(f"http://127.0.0.1:{args.port}/{name}/healthz")

    deadline = time.time() + 300
    for name in plain_ports:
        while True:  # the plain server has no health route: wait for a real answer
            try:
                if httpx.post(servers[name], content=body, timeout=30).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise SystemExit(f"{name} server did not start")
            time.sleep(0.5)

    levels = [int(c) for c in args.concurrency.split(",")]
    cells: dict[str, dict[int, list[dict]]] = {s: {c: [] for c in levels} for s in servers}
    for name, url in servers.items():  # warm-up: first batches, allocator, connection pools
        asyncio.run(closed_loop(url, body, 8, 3, 30))
    for r in range(args.repeats):  # interleaved, so drift in machine load hits every server alike
        for c in levels:
            for name, url in servers.items():
                n = max(args.requests_per_client, -(-24 // c))
                res = asyncio.run(closed_loop(url, body, c, n, args.max_seconds))
                cells[name][c].append(res)
                print(f"repeat {r + 1} c={c:3d} {name:16s} {res['rps']:7.2f} req/s  p50 {res['p50_ms']:7.1f} ms  "
                      f"p99 {res['p99_ms']:7.1f} ms  {res['statuses']}", flush=True)
    overload = None
    if args.overload_seconds > 0:
        capacity = 32 + 64  # classifier_max_ongoing + classifier_max_queued of the batched app
        overload = asyncio.run(closed_loop(servers["serve-batched"], body, 2 * capacity, 10**6,
                                           args.overload_seconds, backoff_503_s=0.1))
        overload["concurrency"] = 2 * capacity
        print(f"overload c={2 * capacity}: {overload['statuses']}  ({overload['rps']:.2f} req/s answered 200)")
    return cells, overload, levels, servers


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18", choices=["resnet18", "cifar_resnet18"], help="model architecture")
    p.add_argument("--crop", type=int, default=224, help="model input size")
    p.add_argument("--image", default=None, help="JPEG to send (default: a generated 320x240 JPEG)")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated closed-loop client counts")
    p.add_argument("--requests-per-client", type=int, default=8, help="requests each client sends per cell (at least 24 in all)")
    p.add_argument("--max-seconds", type=float, default=25.0, help="time bound per cell")
    p.add_argument("--repeats", type=int, default=3, help="repeats per cell (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of every server's model")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="the Serve classifier's precision, both variants (default auto: bf16 on a CPU with native "
                        "bfloat16); the plain server stays fp32, as a user's own server would")
    p.add_argument("--max-batch-size", type=int, default=16, help="batched service: @serve.batch size")
    p.add_argument("--overload-seconds", type=float, default=30.0, help="duration of the 2x overload run (0: skip)")
    p.add_argument("--malloc-ablation", action="store_true",
                   help="also measure each server with the other choice of malloc settings (jobs.hostmem, opt-in "
                        "by RAYCV_KEEP_FREED_MEMORY=1), interleaved with the rest")
    p.add_argument("--port", type=int, default=18050, help="Serve HTTP port; the plain servers use port + 1 and + 2")
    p.add_argument("--out", default="results/serve_bench.json", help="where to write all figures")
    p.add_argument("--plain-server", metavar="ARTIFACT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.plain_server:
        run_plain_server(args.plain_server, args.port, args.threads)
        return 0

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # on a loaded machine the raylet's wait for its metrics agent (default 30 s) can expire
    os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")
    import ray
    from ray import serve

    tmp = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    artifact, body = make_inputs(tmp, args.arch, args.crop, args.image)
    plain_ports = {"plain-fastapi": args.port + 1}
    if args.malloc_ablation:  # and the plain server with the settings the Serve replicas get
        plain_ports["plain-fastapi-keep-freed-memory"] = args.port + 2
    plains = [subprocess.Popen([sys.executable, __file__, "--plain-server", str(artifact), "--port", str(port),
                                "--threads", str(args.threads)], cwd=ROOT, stdout=subprocess.DEVNULL,
                               env={**os.environ, **(hostmem.ENV if name.endswith("keep-freed-memory") else {})})
              for name, port in plain_ports.items()]
    try:
        cells, overload, levels, servers = measure(args, artifact, body, plain_ports)
    finally:
        for plain in plains:
            plain.terminate()
            plain.wait(timeout=30)
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()

    def med(name, c, key):
        return statistics.median(x[key] for x in cells[name][c])

    summary = {name: {c: {k: med(name, c, k) for k in ("rps", "p50_ms", "p99_ms")} for c in levels} for name in servers}
    errors = {name: sorted({k for c in levels for x in cells[name][c] for k in x["statuses"] if k != "200"})
              for name in servers}
    print("\n| server | concurrency | req/s | p50 ms | p99 ms |\n|---|---:|---:|---:|---:|")
    for name in servers:
        for c in levels:
            s = summary[name][c]
            print(f"| {name} | {c} | {s['rps']:.1f} | {s['p50_ms']:.0f} | {s['p99_ms']:.0f} |")
    for c in levels:
        print(f"batched / unbatched at c={c}: {summary['serve-batched'][c]['rps'] / summary['serve-unbatched'][c]['rps']:.2f}x;"
              f" batched / plain: {summary['serve-batched'][c]['rps'] / summary['plain-fastapi'][c]['rps']:.2f}x")
        if args.malloc_ablation:
            rps = {name: summary[name][c]["rps"] for name in servers}
            def ratio(server):  # with the settings / without, whichever of the pair has them
                other = next(k for k in rps if k.startswith(server + "-"))
                return rps[server] / rps[other] if other.endswith("default-malloc") else rps[other] / rps[server]
            print("  the malloc settings (jobs.hostmem), with / without: batched "
                  f"{ratio('serve-batched'):.2f}x, unbatched {ratio('serve-unbatched'):.2f}x, plain "
                  f"{ratio('plain-fastapi'):.2f}x")
    print("non-200 answers in the measured cells:", errors)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from jobs.precision import cpu_features
    out.write_text(json.dumps({"args": vars(args), "machine": platform.platform(), "cpus": os.cpu_count(),
                               "cpu": cpu_features(),
                               "summary": summary, "cells": cells, "overload": overload}, indent=2, default=str))
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
