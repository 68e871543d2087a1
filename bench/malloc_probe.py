"""What glibc's malloc settings of `jobs.hostmem` change for the models' large maps, before any server.

    python bench/malloc_probe.py --rounds 2 --out bench/results/malloc_probe.json

For each workload, each round starts two fresh processes, one with glibc's defaults and one with
`jobs.hostmem.ENV` in its environment (as the Serve replicas that compute large maps start), and runs
the work in a thread other than the main one (as a replica does), with 2 torch threads, random weights:
  - classifier-b16: ResNet-18 at 224 px, channels_last, a batch of 16 (its first maps: 51 MB);
  - classifier-b1:  the same, one image (small maps: nothing to gain, the shared arena's cost shows);
  - style-512:      the style network at 512x512 (Winograd convolutions, as FastStylePool runs it);
  - gatys-300x450:  8 Adam steps of `jobs.style.stylize` at 300x450 (set-up included; StylePool's work).
Each process reports the median call time over the calls after the first 4, the minor page faults of
its last call and its resident memory at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jobs import hostmem  # noqa: E402

WORKLOADS = ("classifier-b16", "classifier-b1", "style-512", "gatys-300x450")

CHILD = r"""
import json, resource, sys, threading, time
import torch
torch.set_num_threads(2)
kind, calls = sys.argv[1], int(sys.argv[2])
if kind.startswith("classifier"):
    import torchvision
    m = torchvision.models.resnet18().eval().to(memory_format=torch.channels_last)
    x = torch.rand(16 if kind.endswith("b16") else 1, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    def call():
        with torch.inference_mode():
            m(x)
elif kind == "style-512":
    from jobs import fastconv
    from jobs.transformer_net import TransformerNet
    m = TransformerNet().eval()
    fastconv.winograd_convs(m)
    x = torch.rand(1, 3, 512, 512)
    def call():
        with torch.inference_mode():
            m(x)
else:
    from PIL import Image
    from jobs.style import StyleConfig, stylize
    content, style = Image.new("RGB", (450, 300), (120, 90, 60)), Image.effect_noise((450, 300), 40).convert("RGB")
    def call():
        stylize(content, style, StyleConfig(weights="random", steps=8, size=[300, 450]))
out = {}
def run():
    times = []
    for _ in range(calls):
        f0, t = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
        out["faults_last_call"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    steady = times[4:] or times
    out["median_s"] = sorted(steady)[len(steady) // 2]
    out["rss_mb"] = int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
th = threading.Thread(target=run)
th.start()
th.join()
print(json.dumps(out))
"""


def child(kind: str, calls: int, keep: bool) -> dict:
    env = {**os.environ, **(hostmem.ENV if keep else {})}
    r = subprocess.run([sys.executable, "-c", CHILD, kind, str(calls)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"{kind}: {r.stderr.strip().splitlines()[-1]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, of {', '.join(WORKLOADS)}")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (each: one process per setting)")
    p.add_argument("--calls", type=int, default=16, help="calls per process (Gatys: 6 runs of 8 steps)")
    p.add_argument("--out", default="results/malloc_probe.json", help="results JSON")
    args = p.parse_args(argv)
    unknown = set(args.workloads.split(",")) - set(WORKLOADS)
    if unknown:
        raise SystemExit(f"error: unknown --workloads {', '.join(sorted(unknown))} (choose from {', '.join(WORKLOADS)})")
    if hostmem._glibc() is None:
        raise SystemExit("error: the settings are glibc's: nothing to measure with this C library")
    from jobs.precision import cpu_features

    results: dict[str, dict[str, list[dict]]] = {}
    for r in range(args.rounds):
        for kind in args.workloads.split(","):
            calls = 6 if kind.startswith("gatys") else args.calls
            for setting in ("default", "keep-freed-memory"):
                res = child(kind, calls, setting != "default")
                results.setdefault(kind, {}).setdefault(setting, []).append(res)
                print(f"round {r + 1} {kind:15s} {setting:18s} {res['median_s']:.3f} s  faults {res['faults_last_call']:>7d}"
                      f"  RSS {res['rss_mb']:.0f} MB", flush=True)
    print("\n| workload | default malloc, s | with the settings, s | speed-up | faults per call | RSS MB |\n|---|---:|---:|---:|---:|---:|")
    for kind, by in results.items():
        med = {s: statistics.median(x["median_s"] for x in v) for s, v in by.items()}
        faults = {s: statistics.median(x["faults_last_call"] for x in v) for s, v in by.items()}
        rss = {s: statistics.median(x["rss_mb"] for x in v) for s, v in by.items()}
        print(f"| {kind} | {med['default']:.3f} | {med['keep-freed-memory']:.3f} | "
              f"{med['default'] / med['keep-freed-memory']:.2f}x | {faults['default']:.0f} -> {faults['keep-freed-memory']:.0f} | "
              f"{rss['default']:.0f} -> {rss['keep-freed-memory']:.0f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "cpu": cpu_features(), "env": hostmem.ENV, "torch": __import__("torch").__version__,
                               "results": results}, indent=2))
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
