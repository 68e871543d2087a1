"""ASHA against the full grid over the same learning rates, on the same data (`tune.lr`).

    flock -x /tmp/heavy.lock python bench/asha_vs_grid.py            # the BENCHMARKS.md figures

For each seed: one sweep runs every learning rate of the grid for all epochs (`--scheduler none`),
one runs the same grid under ASHA (`--scheduler asha`). Both are plain `tune.lr` sweeps in one Ray
instance; training is deterministic for a seed (one thread per trial), so a learning rate that
ASHA lets finish reaches the same accuracy as in the grid. Reported: each sweep's best final test
accuracy and its training epochs (summed over trials, from results.csv), and ASHA's ratio.
Targets: ASHA's best within 1 point of the grid's, with <= 40% of the grid's epochs.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tune import lr  # noqa: E402

LRS = "1e-4,3e-4,1e-3,3e-3,1e-2,3e-2"


def grid_order(lrs: str, seed: int, shuffle: bool) -> str:
    """The grid as given, or shuffled with `seed`: Tune starts grid points in list order, and async
    ASHA promotes the first trials to reach a rung almost unopposed, so an ascending grid hands
    those free promotions to the smallest learning rates. The grid sweep does not depend on it."""
    values = lrs.split(",")
    if shuffle:
        random.Random(seed).shuffle(values)
    return ",".join(values)


def sweep(kind: str, seed: int, args) -> dict:
    name = f"{kind}-seed{seed}"
    limit = ["--limit-train", str(args.limit_train)] if args.limit_train else []
    argv = ["--job", "augment", "--data", args.data, *limit, *shlex.split(args.job_flags),
            "--epochs", str(args.epochs), "--num-workers", "1", "--seed", str(seed),
            "--data-root", args.data_root, "--lr-grid", grid_order(args.lrs, seed, args.shuffle), "--num-samples", "1",
            "--scheduler", "none" if kind == "grid" else "asha", "--grace-period", "1", "--reduction-factor", "3",
            "--storage-path", args.out, "--name", name]
    t0 = time.perf_counter()
    assert lr.main(argv) == 0, f"{name} failed"
    seconds = time.perf_counter() - t0
    with open(Path(args.out) / name / "results.csv") as f:
        rows = list(csv.DictReader(f))
    return {"best_test_acc": max(float(r["test_acc"]) for r in rows), "epochs": sum(int(r["epochs"]) for r in rows),
            "seconds": seconds, "trials": [{k: r[k] for k in ("lr", "epochs", "status", "test_acc")} for r in rows]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="synthetic:1024", help="dataset (default synthetic:1024: 1024 train, 256 test images)")
    p.add_argument("--limit-train", type=int, default=0, help="train on N images, a fixed random draw (default 0: all)")
    p.add_argument("--epochs", type=int, default=9, help="epochs per full trial (default 9: ASHA rungs at 1, 3, 9)")
    p.add_argument("--lrs", default=LRS, help=f"the learning-rate grid (default {LRS})")
    p.add_argument("--job-flags", default="--image-size 16 --batch-size 32",
                   help="more jobs.augment flags for every trial (default '--image-size 16 --batch-size 32')")
    p.add_argument("--shuffle", action="store_true", help="start the grid's points in an order shuffled by the seed")
    p.add_argument("--seeds", type=int, default=1, help="repeats with seeds 0..N-1 (default 1)")
    p.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed .. first-seed+N-1 (default 0)")
    p.add_argument("--out", default="results/bench-asha", help="where the sweeps go (default results/bench-asha)")
    p.add_argument("--data-root", default="data", help="dataset cache (default data)")
    args = p.parse_args()
    args.out, args.data_root = os.path.abspath(args.out), os.path.abspath(args.data_root)
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024**2)
    runs = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        grid, asha = sweep("grid", seed, args), sweep("asha", seed, args)
        runs.append({"seed": seed, "grid": grid, "asha": asha, "epoch_ratio": asha["epochs"] / grid["epochs"],
                     "acc_gap_points": 100 * (grid["best_test_acc"] - asha["best_test_acc"])})
        print(json.dumps(runs[-1], indent=1), flush=True)
        summary = {"command": " ".join(sys.argv), "args": vars(args), "runs": runs,
                   "median_epoch_ratio": statistics.median(r["epoch_ratio"] for r in runs),
                   "median_acc_gap_points": statistics.median(r["acc_gap_points"] for r in runs)}
        (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")  # after every seed
    ray.shutdown()
    print("| seed | grid best acc | grid epochs | ASHA best acc | ASHA epochs | ASHA/grid epochs | gap (points) |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['seed']} | {r['grid']['best_test_acc']:.3f} | {r['grid']['epochs']} | {r['asha']['best_test_acc']:.3f} "
              f"| {r['asha']['epochs']} | {100 * r['epoch_ratio']:.0f}% | {r['acc_gap_points']:.1f} |")
    print(f"median: ASHA used {100 * summary['median_epoch_ratio']:.0f}% of the grid's epochs, "
          f"best accuracy {summary['median_acc_gap_points']:.1f} points below the grid's")


if __name__ == "__main__":
    main()
