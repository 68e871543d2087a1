"""How much batching can pay for the classifier on this CPU, before any server: ResNet-18 forward
throughput (images/s) at batch 1 and batch 16, NCHW and channels_last, fp32, 2 torch threads.

    python bench/batch_probe.py --out bench/results/batch_probe.json

The ratio batch-16 / batch-1 bounds what `@serve.batch` can gain from the model alone; anything a
served batch gains beyond it comes from amortising per-request overheads (hops, decoding, Python).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torchvision

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from jobs.precision import cpu_features  # noqa: E402


def rate(model: torch.nn.Module, batch: int, channels_last: bool, calls: int, size: int) -> float:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.rand(batch, 3, size, size).contiguous(memory_format=fmt)
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--size", type=int, default=224, help="input side (default 224)")
    p.add_argument("--batch", type=int, default=16, help="the batched size (default 16, the service's max)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians reported (default 3)")
    p.add_argument("--out", default="bench/results/batch_probe.json", help="results JSON")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=2).eval()
    rounds = []  # interleaved, so drift in the machine's speed hits every cell alike
    for r in range(args.repeats):
        for channels_last in (False, True):
            one = rate(model, 1, channels_last, 20, args.size)
            many = rate(model, args.batch, channels_last, 5, args.size)
            rounds.append({"round": r, "channels_last": channels_last, "batch1_img_s": one,
                           "batched_img_s": many, "ratio": many / one})
            print(f"round {r}: {'channels_last' if channels_last else 'NCHW'}: batch 1 {one:.1f} img/s, "
                  f"batch {args.batch} {many:.1f} img/s, ratio {many / one:.2f}x", flush=True)
    rows = []
    for channels_last in (False, True):
        mine = [x for x in rounds if x["channels_last"] == channels_last]
        row = {"channels_last": channels_last, "batch": args.batch,
               **{k: statistics.median(x[k] for x in mine) for k in ("batch1_img_s", "batched_img_s", "ratio")}}
        rows.append(row)
        print(f"median {'channels_last' if channels_last else 'NCHW'}: ratio {row['ratio']:.2f}x", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"threads": args.threads, "size": args.size, "torch": torch.__version__, "cpu": cpu_features(),
                   "rows": rows, "rounds": rounds}, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
