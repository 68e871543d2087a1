"""Time to accuracy on CIFAR-10: the reference recipe vs `--recipe fast`, and ablations of the fast one.

Every run trains for the same `--budget` seconds of training time (the engine's --time-budget),
then evaluates once on the full test set. Run it under the machine's benchmark lock:

    flock -x /tmp/heavy.lock python bench/fast_cifar.py --runs fast,fast,fast,reference --budget 600
    flock -x /tmp/heavy.lock python bench/fast_cifar.py --runs fast,no-whiten,no-lookahead --budget 90

Each finished run is appended to `--out` (JSON lines), so an interrupted benchmark keeps what it
measured; `--table` prints the markdown table (median per configuration) from that file.
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

from jobs import engine  # noqa: E402
from jobs.augment import Config, validate  # noqa: E402
from jobs.cli import init_ray  # noqa: E402

# name -> (what it changes, Config overrides). Ablations switch one technique of the fast recipe off.
CONFIGS = {
    "reference": ("reference recipe (ResNet-18, Adam 1e-3, batch 256, random flips)", {"recipe": "reference"}),
    "fast": ("fast recipe, all techniques", {"recipe": "fast"}),
    "no-whiten": ("first layer trained from random init instead of patch whitening", {"recipe": "fast", "whiten": False}),
    "no-lookahead": ("no lookahead weight averaging", {"recipe": "fast", "lookahead": False}),
    "no-tta": ("no flip test-time augmentation", {"recipe": "fast", "tta": "none"}),
    "no-label-smoothing": ("label smoothing 0 instead of 0.2", {"recipe": "fast", "label_smoothing": 0.0}),
    "random-flip": ("random flips instead of alternating ones", {"recipe": "fast", "aug": "flip,translate"}),
    "no-translate": ("no random 2-pixel translations", {"recipe": "fast", "aug": "altflip"}),
    "constant-lr": ("constant lr instead of warm-up and linear decay", {"recipe": "fast", "schedule": "constant"}),
    "adam": ("Adam 1e-3 instead of Nesterov SGD", {"recipe": "fast", "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0}),
    "batch-256": ("batch 256 instead of 1024 (lr scaled with it)", {"recipe": "fast", "batch_size": 256}),
    "no-normalize": ("inputs in [0, 1], not standardised", {"recipe": "fast", "normalize": False}),
}


def run_one(name: str, args, index: int) -> dict:
    overrides = CONFIGS[name][1]
    cfg = Config(**{**overrides, "data": args.data, "data_root": args.data_root, "time_budget": args.budget,
                    "eval_every": 0, "num_workers": args.num_workers, "cpus_per_worker": args.cpus_per_worker,
                    "storage_path": args.storage_path, "seed": index,
                    "name": f"bench-{name}-{int(args.budget)}s-{index}-{int(time.time())}"})
    validate(cfg)
    t0 = time.perf_counter()
    summary = engine.fit("jobs.augment", cfg)
    return {"config": name, "budget_s": args.budget, "seed": index, "test_acc": summary["test_acc"],
            "train_time_s": summary["train_time_s"], "steps": summary["steps"],
            "epochs_seen": summary["steps"] * cfg.batch_size / 50000,
            "wall_s": time.perf_counter() - t0, "workers": args.num_workers, "threads": args.cpus_per_worker,
            "run": cfg.name}


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
        lines.append(f"| {b:g} s | {c} | {CONFIGS[c][0]} | {len(g)} | {acc:.4f} ({', '.join(f'{r['test_acc']:.4f}' for r in g)}) "
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
    p.add_argument("--table", action="store_true", help="only print the table from --out")
    args = p.parse_args()
    out = Path(args.out)
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
        seen[name] = seen.get(name, 0) + 1
        row = run_one(name, args, seen[name] - 1)
        print(json.dumps(row), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
    print(table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
