"""Test-time augmentation variants on trained CIFAR-10 models: the same weights, each `--tta` the
recipe offers (issue 16's lever "lighter or heavier TTA": it costs evaluation time, never training
time, so it can be measured on runs already trained).

    python bench/tta_eval.py RUN_DIR [RUN_DIR ...] --out bench/results/tta_eval.json

Each RUN_DIR is a `jobs.augment` run (its `model/` artifact and `result.json`); the test set is the
run's own `--data`, decoded through its `--data-root` cache. For every run and TTA it prints the
accuracy over the whole test set and the evaluation's wall time; the column of the run's last
evaluation (--final-tta; --tta in runs before it existed) must equal its recorded test_acc (a check
that this evaluation is the loop's).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.airbench import TTA  # noqa: E402
from jobs.artifact import load_artifact  # noqa: E402
from jobs.data import load_image_data  # noqa: E402
from jobs.precision import cpu_features, describe_cpu  # noqa: E402


@torch.no_grad()
def accuracy(model, x_uint8: torch.Tensor, y: torch.Tensor, preset, tta: str, batch: int = 1000) -> float:
    mean = torch.tensor(preset.mean or (0.0,) * 3).view(1, 3, 1, 1) * 255
    scale = 1 / (torch.tensor(preset.std or (1.0,) * 3).view(1, 3, 1, 1) * 255)
    correct = 0
    for i in range(0, len(y), batch):
        x = ((x_uint8[i:i + batch].float() - mean) * scale).contiguous(memory_format=torch.channels_last)
        correct += (TTA[tta](model, x).argmax(1) == y[i:i + batch]).sum().item()
    return correct / len(y)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="jobs.augment run directories (with model/ and result.json)")
    p.add_argument("--tta", nargs="+", choices=list(TTA), default=list(TTA), help="variants to evaluate")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--out", default="bench/results/tta_eval.json", help="JSON of the results")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cpu = cpu_features()
    print(describe_cpu(cpu), flush=True)
    rows = []
    for run in map(Path, args.runs):
        result = json.loads((run / "result.json").read_text())
        cfg = result["config"]
        model, _, preset, _ = load_artifact(run / "model")
        model = model.to(memory_format=torch.channels_last)
        data = load_image_data(cfg["data"], cfg["data_root"], image_size=cfg.get("image_size"))
        row = {"run": str(run), "arch": cfg["arch"], "recorded_test_acc": result["test_acc"],
               "recorded_tta": cfg.get("final_tta", cfg["tta"]), "acc": {}, "eval_s": {}}
        for tta in args.tta:
            t0 = time.perf_counter()
            row["acc"][tta] = accuracy(model, data.test_x, data.test_y, preset, tta)
            row["eval_s"][tta] = round(time.perf_counter() - t0, 2)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print("\n| run | arch | recorded (tta) | " + " | ".join(args.tta) + " |")
    print("|---|---|---:|" + "---:|" * len(args.tta))
    for r in rows:
        print(f"| {Path(r['run']).name} | {r['arch']} | {r['recorded_test_acc']:.4f} ({r['recorded_tta']}) | "
              + " | ".join(f"{r['acc'][t]:.4f} ({r['eval_s'][t]:.0f} s)" for t in args.tta) + " |")
    gains = {t: statistics.median(r["acc"][t] - r["acc"].get("flip", r["recorded_test_acc"]) for r in rows)
             for t in args.tta}
    print("median gain over flip, points: " + ", ".join(f"{t} {100 * g:+.2f}" for t, g in gains.items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"cpu": cpu, "cpu_line": describe_cpu(cpu), "rows": rows,
                                          "median_gain_over_flip": gains,
                                          "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())},
                                         indent=2) + "\n")
    print(f"results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
