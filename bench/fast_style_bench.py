"""Real-time style transfer vs Gatys: stylizing one 512x512 image on this machine, in one run.

Feed-forward: `jobs.transformer_net.stylize_image` (PIL in -> PIL out: ToTensor, one TransformerNet
forward, clamp, to PIL), `--repeats` timed calls after `--warmup`, median; in fp32 NCHW with PyTorch's
default convolutions (the ratios' baseline), fp32 with NNPACK's Winograd/FFT convolutions (`jobs.fastconv`,
what a CPU without native bf16 serves), fp32 channels_last, fp32 compiled, and bf16 autocast NCHW and
channels_last. Gatys: `jobs.style.stylize` (Adam, the SPEC's layers and
weights) at the same size with a pre-built VGG-19 extractor. A 500-step run takes far too long on 2
cores, so each of `--gatys-repeats` runs does `--gatys-steps` steps and the 500-step time is
extrapolated: (wall time - time spent in the steps) + 500 x the median step time.

Latency does not depend on the weights' values: the TransformerNet is random-initialised unless
`--model DIR` names a trained one, and VGG uses `--weights` (random by default: no ImageNet weights
offline). Run it alone: `flock -x /tmp/heavy.lock python bench/fast_style_bench.py`.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time
from typing import Callable

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from jobs import fastconv  # noqa: E402
from jobs import style as S  # noqa: E402
from jobs.images import load_image  # noqa: E402
from jobs.precision import autocast_dtype, cpu_features, dtype_name, native_bf16_cpu  # noqa: E402
from jobs.transformer_net import TransformerNet, load_style_model, stylize_image  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def time_calls(fn, warmup: int, repeats: int) -> tuple[list[float], list[float]]:
    """(wall seconds, process CPU seconds) of `repeats` calls of fn() after `warmup` untimed ones.

    CPU time (all threads) is reported beside wall time because the 2 cores are shared: a
    contended run stretches wall time, while CPU time moves much less.
    """
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


VARIANTS = ("fp32", "fp32-winograd", "fp32-cl", "fp32-compiled", "bf16", "bf16-cl")


def variant_model(model: TransformerNet, variant: str) -> tuple[TransformerNet, Callable]:
    """A copy of `model` for `variant` and the context its calls run in (a factory): Winograd layers for
    fp32-winograd, PyTorch's own convolutions (`fastconv.disabled`) for every other variant."""
    m = copy.deepcopy(model)
    if variant == "fp32-winograd":
        fastconv.winograd_convs(m)
        return m, contextlib.nullcontext
    return m, fastconv.disabled


def feed_forward(model: TransformerNet, img: Image.Image, variant: str, warmup: int, repeats: int) -> dict:
    """Median latency of one stylize_image call in `variant` (VARIANTS: -cl = channels_last,
    -winograd = NNPACK's convolutions, -compiled = torch.compile of the network, inductor's default
    mode; its first call, which compiles, is timed apart as compile_s)."""
    m, kernels = variant_model(model, variant)
    m = m.to(memory_format=torch.channels_last if variant.endswith("-cl") else torch.contiguous_format)
    precision = variant.split("-")[0]
    compile_s = None
    if variant.endswith("-compiled"):
        m = torch.compile(m)
        t0 = time.perf_counter()
        with kernels():
            stylize_image(m, img, precision=precision)
        compile_s = time.perf_counter() - t0

    def run():
        with kernels():
            return stylize_image(m, img, precision=precision)
    wall, cpu = time_calls(run, warmup, repeats)
    return {"variant": variant, "median_s": statistics.median(wall), "median_cpu_s": statistics.median(cpu),
            "times_s": wall, "cpu_s": cpu, "compile_s": compile_s}


def gatys(content: Image.Image, style: Image.Image, size: int, steps: int, repeats: int, weights: str) -> dict:
    """Per-step time of jobs.style at size x size (Adam, its defaults: Winograd convolutions in fp32 on a
    CPU), extrapolated to a 500-step run."""
    cfg = S.StyleConfig(size=[size, size], steps=steps, optimizer="adam", weights=weights)
    extractor = S.build_extractor(cfg)  # built once, as a StylePool replica does
    runs = []
    for _ in range(repeats):
        rec_times: list[float] = []
        t0, c0 = time.perf_counter(), time.process_time()
        S.stylize(content, style, cfg, extractor=extractor, progress=lambda r: rec_times.append(r["time_s"]))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        # time_s is taken after each step's loss+backward, before its update: consecutive differences
        # are whole steps; the first record covers the first evaluation only
        step_times = [b - a for a, b in zip(rec_times, rec_times[1:])]
        step = statistics.median(step_times)
        overhead = wall - rec_times[-1]  # preprocessing, targets, the last update, postprocessing
        runs.append({"wall_s": wall, "cpu_s": cpu, "cpu_per_step_s": cpu / steps, "steps": steps, "median_step_s": step, "overhead_s": overhead,
                     "extrapolated_500_s": overhead + 500 * step})
    return {"runs": runs, "convolutions": S.conv_kernels(extractor, cfg.precision),
            "median_step_s": statistics.median(r["median_step_s"] for r in runs),
            "median_cpu_per_step_s": statistics.median(r["cpu_per_step_s"] for r in runs),
            "extrapolated_500_s": statistics.median(r["extrapolated_500_s"] for r in runs)}


def train_steps(style: Image.Image, steps: int, batch: int, size: int, weights: str) -> dict:
    """Seconds per feed-forward training step (jobs.fast_style.perceptual_step, backward, Adam) at `batch` x
    `size` px, with PyTorch's convolutions and with NNPACK's (network and VGG converted), alternating;
    the first step of each is left out."""
    from jobs.fast_style import perceptual_step
    from jobs.vgg import VGGFeatures, load_vgg

    scfg = S.StyleConfig(weights=weights)
    layers = sorted(set(scfg.content_layers + scfg.style_layers))
    extractor = VGGFeatures(load_vgg(weights, 0), max(layers))
    style_x = S.preprocess(style, [size, size])
    with torch.no_grad():
        grams = {i: S.gram(f) for i, f in extractor(style_x, layers).items() if i in scfg.style_layers}
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    setups = {}
    for name in ("default", "winograd"):
        model, ext = TransformerNet(), copy.deepcopy(extractor)
        if name == "winograd":
            fastconv.winograd_convs(model)
            fastconv.winograd_convs(ext)
        setups[name] = (model, ext, torch.optim.Adam(model.parameters(), lr=1e-3))
    times: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(steps + 1):
        for name, (model, ext, opt) in setups.items():
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            perceptual_step(model, ext, grams, scfg, x)[0].backward()
            opt.step()
            times[name].append(time.perf_counter() - t0)
    out = {name: {"median_s": statistics.median(t[1:]), "times_s": t[1:]} for name, t in times.items()}
    out.update(batch=batch, size=size, speedup=out["default"]["median_s"] / out["winograd"]["median_s"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--content", default=os.path.join(DATA, "rainier.jpg"), help="content image")
    p.add_argument("--style", default=os.path.join(DATA, "autumn-oak.jpg"), help="style image (Gatys)")
    p.add_argument("--size", type=int, default=512, help="square working size")
    p.add_argument("--model", help="a trained style model directory (default: random-initialised TransformerNet)")
    p.add_argument("--weights", default="random", help="VGG-19 weights for Gatys (imagenet | random | PATH)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10, help="timed feed-forward calls per variant")
    p.add_argument("--gatys-steps", type=int, default=6, help="Adam steps per Gatys run (then extrapolated to 500)")
    p.add_argument("--gatys-repeats", type=int, default=3)
    p.add_argument("--variants", help=f"comma-separated, of {', '.join(VARIANTS)} (default: all, without the bf16 "
                   "ones on a CPU without native bf16, where one emulated call takes over 30 s)")
    p.add_argument("--train-steps", type=int, default=0, help="also time this many feed-forward training steps "
                   "(batch 4, 256 px) with PyTorch's and NNPACK's convolutions (0: skip)")
    p.add_argument("--out", default="results/fast_style_bench.json", help="JSON with every timing")
    args = p.parse_args()
    variants = args.variants.split(",") if args.variants else [
        v for v in VARIANTS if native_bf16_cpu() or not v.startswith("bf16")]
    if set(variants) - set(VARIANTS) or "fp32" not in variants:
        p.error(f"--variants: choose from {', '.join(VARIANTS)}, fp32 included (the ratios' baseline)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    content = load_image(args.content).resize((args.size, args.size), Image.BILINEAR)
    style = load_image(args.style)
    model = load_style_model(args.model)[0] if args.model else TransformerNet().eval()
    result = {"size": args.size, "threads": args.threads, "torch": torch.__version__,
              "model": args.model or "random-init TransformerNet", "vgg_weights": args.weights, "feed_forward": []}
    dtype = autocast_dtype("auto", "cpu", "stylize")  # what FastStylePool runs here by default (NCHW)
    served = "fp32-winograd" if fastconv.applies("cpu", dtype) else dtype_name(dtype)
    result["served_precision"], result["served_variant"] = dtype_name(dtype), served
    for variant in variants:
        r = feed_forward(model, content, variant, args.warmup, args.repeats)
        print(f"feed-forward {variant}: median {r['median_s']:.3f} s wall, {r['median_cpu_s']:.3f} s CPU "
              f"over {args.repeats}", flush=True)
        result["feed_forward"].append(r)
    if args.train_steps:
        result["train_step"] = t = train_steps(style, args.train_steps, 4, 256, args.weights)
        print(f"training step (batch 4, 256 px): default {t['default']['median_s']:.2f} s, winograd "
              f"{t['winograd']['median_s']:.2f} s, x{t['speedup']:.2f}", flush=True)
    result["gatys"] = gatys(content, style, args.size, args.gatys_steps, args.gatys_repeats, args.weights)
    g = result["gatys"]
    print(f"gatys: median step {g['median_step_s']:.2f} s wall ({g['median_cpu_per_step_s']:.2f} s CPU per step "
          f"incl. set-up); 500 steps extrapolated {g['extrapolated_500_s']:.0f} s", flush=True)
    best = min(result["feed_forward"], key=lambda r: r["median_s"])
    fp32 = next(r for r in result["feed_forward"] if r["variant"] == "fp32")
    result["speedup_fp32"] = g["extrapolated_500_s"] / fp32["median_s"]
    result["speedup_best"] = g["extrapolated_500_s"] / best["median_s"]
    # the same ratio in CPU seconds: 500 x CPU per Gatys step vs one feed-forward call's CPU
    result["speedup_fp32_cpu"] = 500 * g["median_cpu_per_step_s"] / fp32["median_cpu_s"]
    result["best_variant"] = best["variant"]
    serving = next((r for r in result["feed_forward"] if r["variant"] == served), fp32)
    result["served_median_s"] = serving["median_s"]
    result["speedup_served"] = g["extrapolated_500_s"] / serving["median_s"]
    print(f"served here ({served}, NCHW): {serving['median_s']:.3f} s, {result['speedup_served']:.0f}x Gatys",
          flush=True)
    if "fp32-winograd" in variants:
        # what the Winograd/FFT kernels change in the output: 0..255 pixel differences against fp32 direct
        plain, wino = (variant_model(model, v) for v in ("fp32", "fp32-winograd"))
        with plain[1]():
            a = np.asarray(stylize_image(plain[0], content, precision="fp32"), dtype=np.float32)
        b = np.asarray(stylize_image(wino[0], content, precision="fp32"), dtype=np.float32)
        diff = np.abs(a - b)
        result["winograd_vs_fp32_pixels"] = {"mean_abs": float(diff.mean()), "max_abs": float(diff.max()),
                                             "share_changed": float((diff > 0).mean())}
        print(f"winograd vs fp32 output: mean |diff| {diff.mean():.4f}/255, max {diff.max():.0f}/255, "
              f"{100 * (diff > 0).mean():.3f}% of values changed", flush=True)
    if any(v.startswith("bf16") for v in variants):
        # what bf16 changes in the output: 0..255 pixel differences against fp32, same image and weights
        with fastconv.disabled():
            a = np.asarray(stylize_image(model, content, precision="fp32"), dtype=np.float32)
            b = np.asarray(stylize_image(model, content, precision="bf16"), dtype=np.float32)
        diff = np.abs(a - b)
        result["bf16_vs_fp32_pixels"] = {"mean_abs": float(diff.mean()), "p99_abs": float(np.percentile(diff, 99)),
                                         "max_abs": float(diff.max())}
        print(f"bf16 vs fp32 output: mean |diff| {diff.mean():.2f}/255, p99 {np.percentile(diff, 99):.0f}/255",
              flush=True)
    print(f"speed-up vs 500-step Gatys: fp32 {result['speedup_fp32']:.0f}x, best ({best['variant']}) "
          f"{result['speedup_best']:.0f}x; in CPU time (fp32) {result['speedup_fp32_cpu']:.0f}x", flush=True)
    result["cpu"] = cpu_features()  # the figures hold for this kind of CPU (bf16 native or not)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
