"""Transfer on real data, the reference experiment at a size a 2-core CPU can run.

Source: CIFAR-10 without cat and dog (8 classes), trained with `jobs.augment`.
Target: cat vs dog, 500 training images per class, the full 1000 + 1000 test images.
Fine-tuned from the source run vs the same architecture from scratch, same epochs, same flags.

    flock -x /tmp/heavy.lock python bench/finetune_bench.py --cifar ../shared/data/cifar10-jpeg.zip

Writes bench/results/finetune_bench.json and prints the BENCHMARKS.md table. Every training run is
the real command line (printed), so the figures are what a user gets.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = ("cat", "dog")


def build_subsets(cifar_zip: Path, work: Path, source_per_class: int, source_test_per_class: int,
                  target_per_class: int) -> tuple[Path, Path]:
    """Write source.zip (8 classes) and target.zip (cat/dog) ImageFolder archives from the CIFAR JPEG zip.

    Images are taken in sorted-name order per class, so the subsets are the same on every run."""
    source = work / f"source-{source_per_class}-{source_test_per_class}.zip"
    target = work / f"target-{target_per_class}.zip"
    if source.exists() and target.exists():
        return source, target
    with zipfile.ZipFile(cifar_zip) as zf:
        names = sorted(n for n in zf.namelist() if n.lower().endswith(".jpg"))
        by = {}
        for n in names:
            split, cls = n.split("/")[-3:-1]
            by.setdefault((split, cls), []).append(n)
        classes = sorted({cls for _, cls in by})
        plan = {source: [], target: []}
        for cls in classes:
            if cls in TARGET:
                plan[target] += by[("train", cls)][:target_per_class] + by[("test", cls)]
            else:
                plan[source] += by[("train", cls)][:source_per_class] + by[("test", cls)][:source_test_per_class]
        for out, members in plan.items():
            tmp = out.with_suffix(".tmp")
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as dst:
                for n in members:
                    dst.writestr("/".join(n.split("/")[-3:]), zf.read(n))
            os.replace(tmp, out)
    return source, target


def run(cmd: list[str], log: Path) -> float:
    """Run one job's command line, tee its output to `log`; return the wall time."""
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
        for line in p.stdout:
            f.write(line)
            if line.startswith(("epoch ", "done", "error")):
                print("   ", line.rstrip(), flush=True)
        if p.wait() != 0:
            sys.exit(f"command failed ({p.returncode}); see {log}")
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cifar", default=str(ROOT.parent / "shared/data/cifar10-jpeg.zip"), help="CIFAR-10 ImageFolder zip")
    p.add_argument("--work", default="/tmp/finetune-bench", help="data, cache and runs of the benchmark")
    p.add_argument("--source-per-class", type=int, default=1000, help="source training images per class")
    p.add_argument("--source-test-per-class", type=int, default=200, help="source test images per class")
    p.add_argument("--source-epochs", type=int, default=4, help="jobs.augment epochs on the source")
    p.add_argument("--source-recipe", choices=("reference", "fast"), default="reference",
                   help="jobs.augment --recipe of the source run (fast: FastCifarNet, so both target runs use it too)")
    p.add_argument("--source-budget", type=float, default=0, help="jobs.augment --time-budget of the source run (0: none)")
    p.add_argument("--target-per-class", type=int, default=500, help="cat/dog training images per class")
    p.add_argument("--epochs", type=int, default=5, help="target epochs, both runs")
    p.add_argument("--seeds", type=int, default=1, help="target runs per mode (seeds 0..N-1); the gap is of the medians")
    p.add_argument("--finetune-lr", type=float, help="base lr of the fine-tuned run (default: jobs.finetune's, 0.01)")
    p.add_argument("--scratch-lr", type=float, help="lr of the scratch run (default: jobs.finetune's, 0.1)")
    p.add_argument("--out", default=str(ROOT / "bench/results/finetune_bench.json"))
    args = p.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    source, target = build_subsets(Path(args.cifar), work, args.source_per_class, args.source_test_per_class,
                                   args.target_per_class)
    py = [sys.executable, "-m"]
    common = ["--data-root", str(work / "data"), "--storage-path", str(work / "runs"), "--num-workers", "2"]
    # every run name says what it depends on: a re-run under an existing name resumes (or reuses) that run
    source_name = (f"source-{args.source_recipe}-{args.source_per_class}-"
                   + (f"b{args.source_budget:g}" if args.source_budget else f"e{args.source_epochs}"))
    budget = ["--time-budget", f"{args.source_budget:g}"] if args.source_budget else []
    commands = {
        "source": py + ["jobs.augment", "--recipe", args.source_recipe, "--data", str(source),
                        "--epochs", str(args.source_epochs), *budget, "--name", source_name, *common]
                  + (["--batch-size", "128"] if args.source_recipe == "reference" else []),
    }
    for seed in range(args.seeds):
        target_flags = ["--data", str(target), "--weights", str(work / "runs" / source_name),
                        "--epochs", str(args.epochs), "--seed", str(seed), *common]
        for mode, lr in (("finetune", args.finetune_lr), ("scratch", args.scratch_lr)):
            lr_flags = ["--lr", f"{lr:g}"] if lr else []
            name = f"{source_name.removeprefix('source-')}-{mode}{f'-lr{lr:g}' if lr else ''}-e{args.epochs}-s{seed}"
            commands[f"{mode}-s{seed}"] = py + ["jobs.finetune", *target_flags, "--mode", mode, *lr_flags, "--name", name]

    results = {}
    for key, cmd in commands.items():
        name = cmd[cmd.index("--name") + 1]
        done = work / "runs" / name / "result.json"
        if key == "source" and done.exists():
            wall = float("nan")  # the same source run (its name says so), finished by an earlier invocation
        else:
            wall = run(cmd, work / f"{name}.log")
        r = json.loads(done.read_text())
        results[key] = {"command": "python " + " ".join(cmd[1:]), "wall_s": round(wall, 1),
                        "test_acc": r["test_acc"], "train_acc": r["train_acc"], "epochs": r["epochs"],
                        "test_acc_per_epoch": [round(h["test_acc"], 4) for h in r["history"]],
                        "examples_per_sec": round(r["examples_per_sec"], 1)}
    median = {mode: statistics.median(results[f"{mode}-s{s}"]["test_acc"] for s in range(args.seeds))
              for mode in ("finetune", "scratch")}
    gap = 100 * (median["finetune"] - median["scratch"])
    summary = {"results": results, "median_test_acc": median, "gap_points": round(gap, 1), "target_met": gap >= 10,
               "settings": vars(args), "machine": f"{os.cpu_count()} CPU cores"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print("\n| run | final test acc | test acc per epoch | wall |\n|---|---|---|---|")
    for key, r in results.items():
        print(f"| {key} | {r['test_acc']:.3f} | {' '.join(f'{a:.3f}' for a in r['test_acc_per_epoch'])} | {r['wall_s']:.0f} s |")
    print(f"\nmedian over {args.seeds} seed(s): fine-tuned {median['finetune']:.3f}, scratch {median['scratch']:.3f}: "
          f"{gap:+.1f} points (target >= +10: {'met' if gap >= 10 else 'MISSED'})")


if __name__ == "__main__":
    main()
