"""Ray Train overhead: steady-state images/s of the 2-worker Ray Train job vs a plain PyTorch loop.

Same model (CIFAR ResNet-18), global batch (256), optimizer (Adam 1e-3), augmentation (flip) and
data (N real CIFAR-10 training images, a fixed random draw). The plain loop is one process using both cores
(torch threads = 2) and calls the same `train_one_epoch`; the Ray job is `jobs.augment` with 2
workers x 1 CPU (gloo DDP). Steady state = the epochs after the first; rates cover training
steps only (not evaluation), exactly as each epoch's examples/s line reports them.

    python bench/train_overhead.py --zip ../shared/data/cifar10-jpeg.zip --images 1536 --epochs 3 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
from jobs import driver  # noqa: E402
from jobs.augment import Config, build_setup  # noqa: E402
from jobs.budget import StepPlan  # noqa: E402
from jobs.loop import Amp, train_one_epoch  # noqa: E402


def plain_loop(cfg: Config) -> list[float]:
    """Single process, both cores: the loop's own epoch function without Ray or DDP."""
    torch.set_num_threads(2)
    torch.manual_seed(cfg.seed)
    cpu = torch.device("cpu")
    setup = build_setup(cfg, cpu, rank=0, world=1)
    steps = StepPlan.start(None, None, cfg.epochs, setup.steps_per_epoch, [], cpu)
    rates = []
    for epoch in range(cfg.epochs):
        g = torch.Generator().manual_seed(epoch)
        t0 = time.perf_counter()
        stats, _ = train_one_epoch(setup.model, setup, epoch, steps, Amp(None, cpu), g)
        rates.append(stats["count"] / (time.perf_counter() - t0))
    return rates


def ray_job(cfg: Config) -> list[float]:
    summary = driver.fit("jobs.augment", cfg)
    return [h["examples_per_sec"] for h in summary["history"]]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zip", default="../shared/data/cifar10-jpeg.zip", help="CIFAR-10 ImageFolder zip")
    p.add_argument("--images", type=int, default=1536, help="training images per epoch")
    p.add_argument("--epochs", type=int, default=3, help="epochs per measurement (the first is warm-up)")
    p.add_argument("--repeats", type=int, default=3, help="repetitions (median reported)")
    p.add_argument("--data-root", default="data", help="decoded-tensor cache")
    args = p.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024**2)
    rows = {"plain_1proc_2threads": [], "ray_train_2x1": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            cfg = Config(data=args.zip, data_root=args.data_root, limit_train=args.images, limit_test=256,
                         epochs=args.epochs, num_workers=2, storage_path=tmp, name=f"overhead-{r}")
            ray_rates = ray_job(cfg)
            plain_rates = plain_loop(cfg)
            rows["ray_train_2x1"].append(statistics.mean(ray_rates[1:]))
            rows["plain_1proc_2threads"].append(statistics.mean(plain_rates[1:]))
            print(f"repeat {r}: ray {ray_rates} plain {plain_rates}", flush=True)
    ray.shutdown()
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(json.dumps({"images_per_epoch": args.images, "epochs": args.epochs, "repeats": args.repeats,
                      "median_images_per_s": med, "all": rows,
                      "ratio_ray_over_plain": med["ray_train_2x1"] / med["plain_1proc_2threads"]}, indent=2))


if __name__ == "__main__":
    main()
