"""Per layer: PyTorch's convolution against NNPACK's (jobs.fastconv), fp32, one image, this machine's CPU.

The layers are those of the style networks at their benchmark sizes (Gatys' VGG-19 at 300x450 up to
conv5_1, the feed-forward TransformerNet at 512x512) plus ResNet-18's 3x3 layers at 224 px (the
classifier, where fastconv is NOT used: this shows why). Each cell is the median of `--repeats` calls
after one warm-up, forward only; PyTorch's side runs NCHW and channels_last and the faster is quoted.
Run it alone: `python bench/winograd_layers.py --out bench/results/winograd_layers.json`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from jobs import fastconv  # noqa: E402
from jobs.precision import cpu_features  # noqa: E402

# (network, layer, in channels, out channels, kernel, padding, input H, input W); stride 1 throughout
LAYERS = [
    ("vgg19 300x450", "conv1_1", 3, 64, 3, 1, 300, 450),
    ("vgg19 300x450", "conv1_2", 64, 64, 3, 1, 300, 450),
    ("vgg19 300x450", "conv2_1", 64, 128, 3, 1, 150, 225),
    ("vgg19 300x450", "conv2_2", 128, 128, 3, 1, 150, 225),
    ("vgg19 300x450", "conv3_1", 128, 256, 3, 1, 75, 112),
    ("vgg19 300x450", "conv3_2..4", 256, 256, 3, 1, 75, 112),
    ("vgg19 300x450", "conv4_1", 256, 512, 3, 1, 37, 56),
    ("vgg19 300x450", "conv4_2..4", 512, 512, 3, 1, 37, 56),
    ("vgg19 300x450", "conv5_1", 512, 512, 3, 1, 18, 28),
    ("transformer_net 512", "conv1 9x9", 3, 32, 9, 0, 520, 520),
    ("transformer_net 512", "residual 3x3", 128, 128, 3, 0, 130, 130),
    ("transformer_net 512", "up1 3x3 (at 2x)", 128, 64, 3, 0, 258, 258),
    ("transformer_net 512", "up2 3x3 (at 2x)", 64, 32, 3, 0, 514, 514),
    ("transformer_net 512", "conv_out 9x9", 32, 3, 9, 0, 520, 520),
    ("resnet18 224", "layer1 3x3", 64, 64, 3, 1, 56, 56),
    ("resnet18 224", "layer2 3x3", 128, 128, 3, 1, 28, 28),
    ("resnet18 224", "layer3 3x3", 256, 256, 3, 1, 14, 14),
    ("resnet18 224", "layer4 3x3", 512, 512, 3, 1, 7, 7),
]


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="torch threads (NNPACK's pool takes the same count)")
    p.add_argument("--repeats", type=int, default=7, help="timed calls per cell (median)")
    p.add_argument("--out", default="bench/results/winograd_layers.json", help="results JSON")
    args = p.parse_args()
    torch.set_num_threads(args.threads)  # before the first NNPACK call: its thread pool is sized then
    if not fastconv.available():
        raise SystemExit("this torch build has no NNPACK for this CPU")
    torch.manual_seed(0)
    rows = []
    with torch.inference_mode():
        for net, name, c_in, c_out, k, pad, h, w in LAYERS:
            x = torch.randn(1, c_in, h, w)
            weight, bias = 0.05 * torch.randn(c_out, c_in, k, k), torch.zeros(c_out)
            xc = x.contiguous(memory_format=torch.channels_last)
            nchw = median_ms(lambda: F.conv2d(x, weight, bias, padding=pad), args.repeats)
            cl = median_ms(lambda: F.conv2d(xc, weight, bias, padding=pad), args.repeats)
            nnpack = median_ms(lambda: torch._nnpack_spatial_convolution(x, weight, bias, [pad, pad], [1, 1]),
                               args.repeats)
            rows.append({"network": net, "layer": name, "shape": [c_in, c_out, k, h, w], "nchw_ms": nchw,
                         "channels_last_ms": cl, "nnpack_ms": nnpack, "speedup": min(nchw, cl) / nnpack})
            print(f"{net:20s} {name:16s} default {min(nchw, cl):7.1f} ms  nnpack {nnpack:7.1f} ms  "
                  f"x{min(nchw, cl) / nnpack:.2f}", flush=True)
    out = {"command": " ".join(sys.argv), "torch": torch.__version__, "threads": args.threads,
           "repeats": args.repeats, "cpu": cpu_features(), "layers": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
