"""Time to accuracy on CIFAR-10: the reference recipe vs `--recipe fast`, and ablations of the fast one.

Every run trains for the same `--budget` seconds of training time (the job's --time-budget),
then evaluates once on the full test set. Run it under the machine's benchmark lock:

    flock -x /tmp/heavy.lock python bench/fast_cifar.py --runs fast,fast,fast,reference --budget 600
    flock -x /tmp/heavy.lock python bench/fast_cifar.py --runs fast,no-whiten,no-lookahead --budget 90

Each finished run is appended to `--out` (JSON lines), so an interrupted benchmark keeps what it
measured; `--table` prints the markdown table (median per configuration) from that file.

`--probe` measures the fast network's training-step throughput on this machine for each
precision (fp32, bf16 autocast), memory format (contiguous, channels_last) and process layout
(1 process x 2 threads, 2 processes x 1 thread: what 1 or 2 DDP workers get), without Ray.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs import driver  # noqa: E402
from jobs.augment import Config, validate  # noqa: E402
from jobs.cli import init_ray  # noqa: E402
from jobs.precision import COMPILE_MODES, cpu_features  # noqa: E402

# name -> (what it changes, Config overrides). Ablations switch one technique of the fast recipe off.
CONFIGS = {
    "reference": ("reference recipe (ResNet-18, Adam 1e-3, batch 256, random flips)", {"recipe": "reference"}),
    "fast": ("fast recipe, all techniques", {"recipe": "fast"}),
    "no-whiten": ("first layer trained from random init instead of patch whitening", {"recipe": "fast", "whiten": False}),
    "no-lookahead": ("no lookahead weight averaging", {"recipe": "fast", "lookahead": False}),
    "no-tta": ("no test-time augmentation", {"recipe": "fast", "tta": "none", "final_tta": "none"}),
    "final-flip": ("flip instead of flip-translate test-time augmentation in the last evaluation",
                   {"recipe": "fast", "final_tta": "flip"}),
    "no-label-smoothing": ("label smoothing 0 instead of 0.2", {"recipe": "fast", "label_smoothing": 0.0}),
    "random-flip": ("random flips instead of alternating ones", {"recipe": "fast", "aug": "flip,translate"}),
    "no-translate": ("no random 2-pixel translations", {"recipe": "fast", "aug": "altflip"}),
    "constant-lr": ("constant lr instead of warm-up and linear decay", {"recipe": "fast", "schedule": "constant"}),
    "adam": ("Adam 1e-3 instead of Nesterov SGD", {"recipe": "fast", "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0}),
    "batch-256": ("batch 256 (lr scaled with it)", {"recipe": "fast", "batch_size": 256}),
    "batch-512": ("batch 512 (lr scaled with it)", {"recipe": "fast", "batch_size": 512}),
    "batch-1024": ("batch 1024 (lr scaled with it)", {"recipe": "fast", "batch_size": 1024}),
    "no-normalize": ("inputs in [0, 1], not standardised", {"recipe": "fast", "normalize": False}),
    "fp32": ("fp32 instead of bf16 autocast (on a CPU with native bf16)", {"recipe": "fast", "precision": "fp32"}),
    "no-channels-last": ("NCHW tensors instead of channels_last", {"recipe": "fast", "channels_last": False}),
    "small-net-512": ("half-width net (32/64/64), batch 512, SGD, no progressive resizing",
                      {"recipe": "fast", "arch": "fast_cifar_net_small", "batch_size": 512, "low_res_size": 0,
                       "optimizer": "sgd", "whiten_bias": True}),
    "full-net": ("fast_cifar_net (64/128/128), batch 1024: the fast recipe before it chose by precision",
                 {"recipe": "fast", "arch": "fast_cifar_net", "batch_size": 1024, "optimizer": "sgd",
                  "whiten_bias": True}),
    "small-net-256": ("half-width net (32/64/64), batch 256, SGD", {"recipe": "fast", "arch": "fast_cifar_net_small",
                                                                   "batch_size": 256, "optimizer": "sgd", "whiten_bias": True}),
    "small-net": ("half-width net (32/64/64), the recipe's batch and optimizer", {"recipe": "fast", "arch": "fast_cifar_net_small"}),
    "small-net-512-lowres24": ("half-width net, batch 512, the first half of the steps at 24 px (progressive resizing)",
                               {"recipe": "fast", "arch": "fast_cifar_net_small", "batch_size": 512,
                                "low_res_size": 24, "low_res_until": 0.5, "optimizer": "sgd", "whiten_bias": True}),
    "small-net-512-lowres24-75": ("half-width net, batch 512, the first 75% of the steps at 24 px",
                                  {"recipe": "fast", "arch": "fast_cifar_net_small", "batch_size": 512,
                                   "low_res_size": 24, "low_res_until": 0.75, "optimizer": "sgd", "whiten_bias": True}),
    "small-net-512-muon": ("half-width net, batch 512, Muon for the convolution filters (lr 0.24, momentum 0.6)",
                           {"recipe": "fast", "arch": "fast_cifar_net_small", "batch_size": 512, "low_res_size": 0,
                            "optimizer": "muon", "muon_lr": 0.24, "whiten_bias": True}),
    "small-net-512-muon-lr12": ("half-width net, batch 512, Muon for the convolution filters at lr 0.12, the "
                                "whitening bias trained (the recipe in fp32 on a CPU before the bias was frozen)",
                                {"recipe": "fast", "arch": "fast_cifar_net_small", "batch_size": 512,
                                 "low_res_size": 0, "optimizer": "muon", "muon_lr": 0.12, "whiten_bias": True}),
    "small-net-512-muon-m8": ("half-width net, batch 512, Muon at lr 0.12 with momentum 0.8 instead of 0.6 (airbench's "
                              "ablation at half its batch: momentum 0.8 with half the lr)",
                              {"recipe": "fast", "arch": "fast_cifar_net_small", "batch_size": 512,
                               "low_res_size": 0, "optimizer": "muon", "muon_lr": 0.12, "muon_momentum": 0.8, "whiten_bias": True}),
    "small-net-512-muon-frozen-bias": ("half-width net, batch 512, Muon at lr 0.12, the whitening layer's bias frozen "
                                       "at 0 (no input gradient for the first conv): the recipe in fp32 on a CPU",
                                       {"recipe": "fast", "arch": "fast_cifar_net_small", "batch_size": 512,
                                        "low_res_size": 0, "optimizer": "muon", "muon_lr": 0.12, "whiten_bias": False}),
    "wide-net": ("airbench94's wider net (64/256/256) instead of 64/128/128", {"recipe": "fast", "arch": "fast_cifar_net_wide"}),
}


def run_one(name: str, args, index: int) -> dict:
    overrides = CONFIGS[name][1]
    precision = {"precision": args.precision} if args.precision and overrides["recipe"] == "fast" else {}
    cfg = Config(**{**overrides, **precision, "data": args.data, "data_root": args.data_root, "time_budget": args.budget,
                    "eval_every": 0, "num_workers": args.num_workers, "cpus_per_worker": args.cpus_per_worker,
                    "storage_path": args.storage_path, "seed": index,
                    "name": f"bench-{name}-{int(args.budget)}s-{index}-{int(time.time())}"})
    validate(cfg)
    t0 = time.perf_counter()
    summary = driver.fit("jobs.augment", cfg)
    return {"config": name, "budget_s": args.budget, "seed": index, "test_acc": summary["test_acc"],
            "train_time_s": summary["train_time_s"], "steps": summary["steps"],
            "epochs_seen": summary["steps"] * cfg.batch_size / 50000,
            "wall_s": time.perf_counter() - t0, "workers": args.num_workers, "threads": args.cpus_per_worker,
            "precision": summary["precision"], "channels_last": cfg.channels_last,
            "run": cfg.name, "cpu": cpu_features()}


def probe_step_rate(threads: int, batch: int, precision: str, channels_last: bool, steps: int = 6,
                    arch: str = "fast_cifar_net", size: int = 32, compile_mode: str = "none") -> float:
    """Images/s of one process doing the fast recipe's training steps (model, augmentation, SGD) on
    `size` x `size` images (below 32: what progressive resizing's low-resolution phase would get),
    the model compiled as `--compile compile_mode` would (the first two steps, which compile, are
    not timed)."""
    import torch

    from jobs.transforms import random_translate
    from jobs.airbench import sgd_param_groups
    from jobs.models import build_model
    from jobs.precision import compile_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(arch, 10).to(memory_format=fmt)
    compile_model(model, compile_mode)
    opt = torch.optim.SGD(sgd_param_groups(model, 0.1, 1e-3, 64), momentum=0.85, nesterov=True)
    images, labels = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8), torch.randint(0, 10, (batch,))
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        x = random_translate(images.float() / 255, g).contiguous(memory_format=fmt)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = torch.nn.functional.cross_entropy(model(x), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return batch / statistics.median(times[2:])


def _probe_child(args):
    return probe_step_rate(*args)


def probe(global_batch: int = 1024, arch: str = "fast_cifar_net", precisions=("fp32", "bf16"),
          sizes=(32,), repeats: int = 1, compile_modes=("none",)) -> list[dict]:
    """Total images/s per precision x memory format x layout (processes x threads = 2 cores) x
    image size x compile mode, each cell measured `repeats` times (interleaved) and the median kept."""
    import multiprocessing as mp

    cells = [(precision, channels_last, procs, size, mode) for size in sizes for precision in precisions
             for channels_last in (False, True) for procs in (2, 1) for mode in compile_modes]
    rates_of: dict[tuple, list[float]] = {c: [] for c in cells}
    for _ in range(repeats):
        for cell in cells:
            precision, channels_last, procs, size, mode = cell
            with mp.get_context("spawn").Pool(procs) as pool:
                rates = pool.map(_probe_child, [(2 // procs, global_batch // procs, precision, channels_last, 6,
                                                 arch, size, mode)] * procs)
            rates_of[cell].append(sum(rates))
    rows = []
    for (precision, channels_last, procs, size, mode), rates in rates_of.items():
        row = {"arch": arch, "batch": global_batch, "size": size, "precision": precision, "compile": mode,
               "channels_last": channels_last, "processes": procs, "threads": 2 // procs,
               "images_per_s": statistics.median(rates), "each": [round(r, 1) for r in rates]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def table(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["budget_s"], r["config"]), []).append(r)
    base = {b: statistics.median(r["test_acc"] for r in g) for (b, c), g in groups.items() if c == "fast"}
    lines = ["| budget | configuration | what changes | runs | test acc (median) | vs fast | epochs seen | train time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for (b, c), g in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1] != "fast", kv[0][1])):
        acc = statistics.median(r["test_acc"] for r in g)
        delta = f"{(acc - base[b]) * 100:+.1f} pt" if b in base and c != "fast" else ""
        each = ", ".join(f"{r['test_acc']:.4f}" for r in g)
        lines.append(f"| {b:g} s | {c} | {CONFIGS[c][0]} | {len(g)} | {acc:.4f} ({each}) "
                     f"| {delta} | {statistics.median(r['epochs_seen'] for r in g):.2f} | {statistics.median(r['train_time_s'] for r in g):.0f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="fast,reference", help=f"comma-separated configurations, repeated as listed: {', '.join(CONFIGS)}")
    p.add_argument("--budget", type=float, default=600, help="training seconds per run (default 600)")
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg.zip"),
                   help="CIFAR-10 as an ImageFolder zip (default ../shared/data/cifar10-jpeg.zip)")
    p.add_argument("--data-root", default="data", help="decoded-tensor cache (default data)")
    p.add_argument("--num-workers", type=int, default=2, help="DDP workers (default 2)")
    p.add_argument("--cpus-per-worker", type=int, default=1, help="threads per worker (default 1)")
    p.add_argument("--storage-path", default="/tmp/raycv-bench-fast", help="run directories (default /tmp/raycv-bench-fast)")
    p.add_argument("--out", default="bench/results/fast_cifar.jsonl", help="results, one JSON line per run")
    p.add_argument("--precision", choices=["auto", "fast", "bf16", "fp32"], help="autocast of the fast configurations (default: the recipe's, i.e. fast: bf16 on a CPU with native bfloat16)")
    p.add_argument("--first-seed", type=int, default=0, help="seed of each configuration's first run (the "
                   "next runs of the same configuration count up from it)")
    p.add_argument("--stop-by", type=float, help="UNIX time: skip runs that would not finish by then (a shared machine's lock slot)")
    p.add_argument("--table", action="store_true", help="only print the table from --out")
    p.add_argument("--probe", action="store_true", help="measure step throughput per precision/format/layout and exit")
    p.add_argument("--probe-arch", default="fast_cifar_net", help="--probe: the network (a jobs.models name)")
    p.add_argument("--probe-batch", type=int, default=1024, help="--probe: global batch (split over the processes)")
    p.add_argument("--probe-sizes", type=int, nargs="+", default=[32], help="--probe: image sizes in px")
    p.add_argument("--probe-precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"],
                   help="--probe: precisions (bf16 is emulated, and slow, on a CPU without native bf16)")
    p.add_argument("--probe-compile", nargs="+", choices=COMPILE_MODES, default=["none"],
                   help="--probe: compile modes (torch.compile, as the jobs' --compile)")
    p.add_argument("--probe-repeats", type=int, default=1, help="--probe: passes over the cells (medians kept)")
    args = p.parse_args()
    out = Path(args.out)
    if args.probe:
        rows = probe(args.probe_batch, args.probe_arch, args.probe_precisions, args.probe_sizes, args.probe_repeats,
                     args.probe_compile)
        out.parent.mkdir(parents=True, exist_ok=True)
        best = max(rows, key=lambda r: r["images_per_s"])
        out.write_text(json.dumps({"rows": rows, "best": best, "cpu": cpu_features()}, indent=2) + "\n")
        print("best:", json.dumps(best))
        return 0
    if args.table:
        print(table(out))
        return 0
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown configuration(s) {', '.join(unknown)}")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    init_ray(None, include_dashboard=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    seen: dict[str, int] = {}
    for name in names:
        if args.stop_by and time.time() + args.budget * 1.1 + 120 > args.stop_by:
            print(f"skipping {name}: it would not finish before --stop-by", flush=True)
            continue
        seen[name] = seen.get(name, 0) + 1
        row = run_one(name, args, args.first_seed + seen[name] - 1)
        print(json.dumps(row), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
    print(table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
