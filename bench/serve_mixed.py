"""Mixed load on the real service (issue 15): does classification keep its latency while style jobs
run and a client floods bad inputs?

    python bench/serve_mixed.py --seconds 45 --repeats 3 --out bench/results/serve_mixed.json

One Serve app (`serve.app:build_app`: classifier + style pool with random VGG weights, job store).
Two phases of `--seconds` each, classify load at `--concurrency` closed-loop clients in both:
  1. classify only;
  2. classify, while `--style-jobs` style jobs are kept running (each resubmitted when it ends) and
     `--flooders` clients send bad requests back to back (truncated and random bytes, an EPS header,
     hostile style options, a cross-origin POST).
The pair runs `--repeats` times (alternating on one service). Reports the classifier's req/s, p50
and p99 per phase (2xx only), every status seen, and the target's two checks: phase-2 p99 within
2x of phase 1 (medians over the repeats, and each pair's ratio), and zero 5xx anywhere except 503
(queue full, with Retry-After) on the classify load.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve_bench import closed_loop, make_inputs, wait_http  # noqa: E402

BAD = [  # (path, kwargs for httpx.post): each must be a 4xx
    ("/classify", {"content": b"\xff\xd8\xff\xe0 truncated jpeg", "headers": {"content-type": "image/jpeg"}}),
    ("/classify", {"content": os.urandom(2048), "headers": {"content-type": "application/octet-stream"}}),
    ("/classify", {"content": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "headers": {}}),
    ("/style/jobs", {"data": {"options": '{"size": [NaN, 64]}'}}),
    ("/style/jobs", {"data": {"options": '{"scales": [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]}'}}),
    ("/classify", {"content": b"x", "headers": {"origin": "http://evil.example"}}),
]


def png(color, size=(64, 64)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


async def style_keeper(base: str, jobs: int, until: float, statuses: dict) -> None:
    """Keep `jobs` style jobs queued or running until `until` (resubmitting each one that ends)."""
    import httpx

    files = {"content": ("c.png", png((200, 60, 60)), "image/png"), "style": ("s.png", png((60, 60, 200)), "image/png")}
    opts = json.dumps({"size": [96, 96], "steps": 200})
    async with httpx.AsyncClient(timeout=60) as client:
        async def one():
            while time.perf_counter() < until:
                r = await client.post(f"{base}/style/jobs", files=files, data={"options": opts})
                key = f"submit:{r.status_code}"
                statuses[key] = statuses.get(key, 0) + 1
                if r.status_code != 202:
                    await asyncio.sleep(1)
                    continue
                job_id = r.json()["id"]
                while time.perf_counter() < until:
                    j = await client.get(f"{base}/style/jobs/{job_id}")
                    status = j.json().get("status") if j.status_code == 200 else f"http:{j.status_code}"
                    if status not in ("queued", "running"):
                        statuses[f"job:{status}"] = statuses.get(f"job:{status}", 0) + 1
                        break
                    await asyncio.sleep(0.5)
                else:
                    await client.delete(f"{base}/style/jobs/{job_id}")
        await asyncio.gather(*(one() for _ in range(jobs)))


async def flooder(base: str, until: float, statuses: dict) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=60) as client:
        i = 0
        while time.perf_counter() < until:
            path, kwargs = BAD[i % len(BAD)]
            i += 1
            try:
                r = await client.post(base + path, **kwargs)
                key = str(r.status_code)
            except httpx.HTTPError as e:
                key = f"transport:{type(e).__name__}"
            statuses[key] = statuses.get(key, 0) + 1


async def mixed_phase(base: str, body: bytes, args) -> dict:
    until = time.perf_counter() + args.seconds
    style_statuses: dict = {}
    bad_statuses: dict = {}
    classify, *_ = await asyncio.gather(
        closed_loop(f"{base}/classify", body, args.concurrency, 10**6, args.seconds),
        style_keeper(base, args.style_jobs, until, style_statuses),
        *(flooder(base, until, bad_statuses) for _ in range(args.flooders)))
    return {"classify": classify, "style": style_statuses, "bad_inputs": bad_statuses}


def unexpected(only: dict, mixed: dict) -> dict:
    """Answers no phase may give: a 503 (queue full, Retry-After) is allowed on the classify load and to
    style submits, never to a bad input; any other 5xx or transport error is unexpected everywhere."""
    c = mixed["classify"]
    parts = {"classify_only": (only["statuses"], True), "classify_mixed": (c["statuses"], True),
             "bad_inputs": (mixed["bad_inputs"], False),
             "style": ({k.removeprefix("submit:"): v for k, v in mixed["style"].items() if k.startswith("submit:")}, True)}
    return {f"{part}:{k}": v for part, (statuses, busy_ok) in parts.items() for k, v in statuses.items()
            if (k.startswith("5") and not (busy_ok and k == "503")) or k.startswith("transport")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60, help="length of each phase (default 60)")
    p.add_argument("--concurrency", type=int, default=32, help="closed-loop classify clients (default 32)")
    p.add_argument("--style-jobs", type=int, default=4, help="style jobs kept running in phase 2 (default 4)")
    p.add_argument("--flooders", type=int, default=4, help="concurrent bad-input clients in phase 2 (default 4)")
    p.add_argument("--repeats", type=int, default=3, help="classify-only + mixed pairs (medians reported)")
    p.add_argument("--arch", default="resnet18", help="classifier network (default resnet18, random weights)")
    p.add_argument("--crop", type=int, default=224, help="classifier input size (default 224)")
    p.add_argument("--port", type=int, default=8431, help="HTTP port (default 8431)")
    p.add_argument("--precision", default="auto", help="classifier precision (default auto)")
    p.add_argument("--out", default="bench/results/serve_mixed.json", help="results JSON")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from jobs.precision import cpu_features
    from serve.app import build_app

    with tempfile.TemporaryDirectory() as tmp:
        artifact, body = make_inputs(Path(tmp), args.arch, args.crop, None)
        ray.init(num_cpus=3, include_dashboard=False, object_store_memory=256 * 1024**2, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(build_app({"classifier": str(artifact), "style": True, "style_weights": "random",
                             "classifier_cpus": 1, "style_cpus": 1, "classifier_precision": args.precision,
                             "job_store_dir": os.path.join(tmp, "jobs")}), name="raycv", route_prefix="/")
        base = f"http://127.0.0.1:{args.port}"
        wait_http(f"{base}/readyz", timeout=600)
        asyncio.run(closed_loop(f"{base}/classify", body, 8, 3, 30))  # warm-up
        pairs = []
        for r in range(args.repeats):
            only = asyncio.run(closed_loop(f"{base}/classify", body, args.concurrency, 10**6, args.seconds))
            print(f"[{r}] classify only: {only['rps']:.2f} req/s, p50 {only['p50_ms']:.0f} ms, p99 {only['p99_ms']:.0f} "
                  f"ms, {only['statuses']}", flush=True)
            mixed = asyncio.run(mixed_phase(base, body, args))
            c = mixed["classify"]
            print(f"[{r}] mixed: classify {c['rps']:.2f} req/s, p50 {c['p50_ms']:.0f} ms, p99 {c['p99_ms']:.0f} ms, "
                  f"{c['statuses']}; style {mixed['style']}; bad inputs {mixed['bad_inputs']}", flush=True)
            pairs.append({"classify_only": only, "mixed": mixed, "p99_ratio": c["p99_ms"] / only["p99_ms"],
                          "unexpected": unexpected(only, mixed)})
        ray.shutdown()
    med = statistics.median
    p99_only = med([x["classify_only"]["p99_ms"] for x in pairs])
    p99_mixed = med([x["mixed"]["classify"]["p99_ms"] for x in pairs])
    fives = {f"{i}:{k}": v for i, x in enumerate(pairs) for k, v in x["unexpected"].items()}
    result = {"args": vars(args), "cpu": cpu_features(), "pairs": pairs,
              "median": {"classify_only_p99_ms": p99_only, "mixed_p99_ms": p99_mixed,
                         "classify_only_rps": med([x["classify_only"]["rps"] for x in pairs]),
                         "mixed_rps": med([x["mixed"]["classify"]["rps"] for x in pairs]),
                         "bad_requests_per_phase": med([sum(x["mixed"]["bad_inputs"].values()) for x in pairs])},
              "p99_ratio_of_medians": p99_mixed / p99_only, "p99_ratio_each": [x["p99_ratio"] for x in pairs],
              "unexpected": fives}
    print(f"p99 (median of {args.repeats}) mixed {p99_mixed:.0f} ms / classify-only {p99_only:.0f} ms = "
          f"{result['p99_ratio_of_medians']:.2f} (target <= 2; each pair {', '.join(f'{x:.2f}' for x in result['p99_ratio_each'])}); "
          f"unexpected answers: {fives or 'none'}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
