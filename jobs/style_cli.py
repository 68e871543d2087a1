"""`python -m jobs.style`: one content x style pair locally, or many pairs as a batch on Ray.

    python -m jobs.style --content C.jpg --style S.jpg --out out.png            # single, no Ray
    python -m jobs.style --content A.jpg B.jpg --style S.jpg T.jpg --out-dir runs/batch [--address ...] [--use-gpu]

Single mode writes OUT.png, OUT-losses.png (loss curves) and OUT.json (config + history).
Batch mode runs one Ray task per pair (1 GPU each with --use-gpu, else 1 CPU) and writes
one PNG per pair, `contact_sheet.png` (styles across, contents down) and `result.json`.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

from jobs.cli import UserError, init_ray
from jobs.config import add_options, load_config
from jobs.outputs import figure
from jobs.images import contact_sheet, load_image
from jobs.precision import autocast_dtype, cpu_features, describe_cpu, dtype_name
from jobs.style import (StyleConfig, build_extractor, cached_extractor, config_dict, conv_kernels, resolve_device,
                        stylize, winograd_wanted)
from jobs.vgg import RANDOM_WEIGHTS_WARNING


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.style", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--content", nargs="+", required=True, help="content image(s)")
    p.add_argument("--style", nargs="+", required=True, help="style image(s)")
    p.add_argument("--out", help="single mode: output PNG (one content and one style)")
    p.add_argument("--out-dir", help="batch mode: directory for every content x style pair, run on Ray")
    p.add_argument("--config", metavar="FILE.json", help="JSON file with StyleConfig fields (flags override it)")
    add_options(p.add_argument_group("the style transfer (StyleConfig)"), StyleConfig)
    g = p.add_argument_group("batch mode on Ray")
    g.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    g.add_argument("--use-gpu", action="store_true", help="one GPU per pair")
    g.add_argument("--num-cpus", type=int, help="CPUs of the embedded local Ray (default: all)")
    return p


class ProgressBar:
    """Step counter on stderr: a redrawn bar on a terminal, a line every 5% in logs."""

    def __init__(self, total: int, stream=None):
        stream = stream or sys.stderr  # looked up now, not at import (a redirected stderr is followed)
        self.total, self.stream, self.tty = max(total, 1), stream, stream.isatty()
        self.every = max(1, self.total // 20)

    def __call__(self, rec: dict) -> None:
        n = rec["step"] + 1
        text = (f"step {n}/{self.total} total {rec['total']:.4g} content {rec['content']:.3g} "
                f"style {rec['style']:.3g} tv {rec['tv']:.3g} ({rec['time_s']:.1f}s this scale)")
        if self.tty:
            done = int(30 * n / self.total)
            self.stream.write(f"\r[{'#' * done}{'.' * (30 - done)}] {text}")
            if n == self.total:
                self.stream.write("\n")
        elif n % self.every == 0 or n == self.total or n == 1:
            self.stream.write(text + "\n")
        self.stream.flush()


def plot_losses(history: list[dict], path: str) -> None:
    """Loss curves (log scale) of one run: total, content, style, TV against the step."""
    steps = [r["step"] for r in history]
    with figure(path) as ax:
        for key in ("total", "content", "style", "tv"):
            ax.plot(steps, [max(r[key], 1e-12) for r in history], label=key)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("weighted loss")


def run_single(cfg: StyleConfig, content: str, style: str, out: str) -> dict:
    """Stylize one pair in this process; write OUT.png, OUT-losses.png, OUT.json."""
    if not out.lower().endswith(".png"):
        raise UserError(f"--out must be a .png path, got {out}")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    t0 = time.perf_counter()
    extractor = build_extractor(cfg)
    precision = dtype_name(autocast_dtype(cfg.precision, resolve_device(cfg.device), "gatys"))
    convolutions = conv_kernels(extractor, cfg.precision)
    print(f"{describe_cpu(cpu_features())}; precision {precision}; convolutions {convolutions}", flush=True)
    image, history = stylize(content, style, cfg, extractor, progress=ProgressBar(cfg.steps * len(cfg.scales)))
    seconds = time.perf_counter() - t0
    image.save(out)
    stem = out[:-4]
    plot_losses(history, stem + "-losses.png")
    result = {"config": config_dict(cfg), "precision": precision, "convolutions": convolutions,
              "content": content, "style": style, "output": out,
              "seconds": seconds, "final": history[-1] if history else None, "history": history}
    if cfg.weights == "random":
        result["warning"] = RANDOM_WEIGHTS_WARNING
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}, {stem}-losses.png, {stem}.json ({seconds:.1f}s)")
    return result


def stylize_pair(content_bytes: bytes, style_bytes: bytes, cfg_dict: dict) -> tuple[bytes, list[dict], float, str]:
    """Ray task body: one pair -> (PNG bytes, history, seconds, convolutions). VGG is loaded once per worker."""
    cfg = StyleConfig(**cfg_dict)
    ext = cached_extractor(cfg.weights, cfg.seed, cfg.device, max(cfg.content_layers + cfg.style_layers),
                           cfg.channels_last, cfg.precision, winograd_wanted(cfg))
    t0 = time.perf_counter()
    image, history = stylize(content_bytes, style_bytes, cfg, extractor=ext)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue(), history, time.perf_counter() - t0, conv_kernels(ext, cfg.precision)


def run_batch(cfg: StyleConfig, contents: list[str], styles: list[str], out_dir: str, use_gpu: bool = False,
              address: str | None = None, num_cpus: int | None = None) -> dict:
    """Every content x style pair as one Ray task; write the PNGs, contact_sheet.png, result.json."""
    import ray
    from PIL import Image

    # validate every input here, so a bad file is one clear line and not a failed task later
    content_imgs = [load_image(p, cfg.max_pixels, "content image") for p in contents]
    style_imgs = [load_image(p, cfg.max_pixels, "style image") for p in styles]
    content_bytes = [Path(p).read_bytes() for p in contents]  # bytes travel: workers need no shared disk
    style_bytes = [Path(p).read_bytes() for p in styles]
    init_ray(address, num_cpus=num_cpus)
    if use_gpu and ray.cluster_resources().get("GPU", 0) < 1:
        raise UserError("--use-gpu given but the Ray cluster has no GPU")  # else the tasks wait forever
    cfg_dict = config_dict(cfg)
    cfg_dict["device"] = "cuda" if use_gpu else "cpu"
    task = ray.remote(stylize_pair).options(num_gpus=1 if use_gpu else 0, num_cpus=1)
    refs = {task.remote(content_bytes[i], style_bytes[j], cfg_dict): (i, j)
            for i in range(len(contents)) for j in range(len(styles))}
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    pairs, results, pending = [], {}, list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        i, j = refs[done[0]]
        png, history, seconds, convolutions = ray.get(done[0])
        name = f"{i:02d}-{_stem(contents[i])}__{j:02d}-{_stem(styles[j])}.png"
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(png)
        results[(i, j)] = Image.open(io.BytesIO(png)).convert("RGB")
        pairs.append({"content": contents[i], "style": styles[j], "output": name, "seconds": seconds,
                      "convolutions": convolutions, "final": history[-1] if history else None, "history": history})
        print(f"[{len(results)}/{len(refs)}] {name} ({seconds:.1f}s, total loss "
              f"{history[-1]['total'] if history else float('nan'):.4g})", flush=True)
    # styles across the top, contents down the left, each result where its row and column meet
    tiles = [None, *style_imgs] + [t for i, c in enumerate(content_imgs)
                                   for t in (c, *(results[(i, j)] for j in range(len(styles))))]
    contact_sheet(tiles, cols=len(styles) + 1).save(os.path.join(out_dir, "contact_sheet.png"))
    result = {"config": cfg_dict, "use_gpu": use_gpu, "seconds": time.perf_counter() - t0,
              "pairs": sorted(pairs, key=lambda r: r["output"])}
    if cfg.weights == "random":
        result["warning"] = RANDOM_WEIGHTS_WARNING
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {len(pairs)} images, contact_sheet.png and result.json to {out_dir}")
    return result


def _stem(path: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in os.path.splitext(os.path.basename(path))[0])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (args.out is None) == (args.out_dir is None):
        raise UserError("give exactly one of --out (single pair) or --out-dir (batch on Ray)")
    if args.out and (len(args.content) != 1 or len(args.style) != 1):
        raise UserError("--out takes one --content and one --style; use --out-dir for several")
    cfg = load_config(StyleConfig, args, args.config).validate()
    print("config:", json.dumps(config_dict(cfg)))
    if cfg.weights == "random":
        print(RANDOM_WEIGHTS_WARNING, file=sys.stderr)
        print(RANDOM_WEIGHTS_WARNING)
    if args.out:
        run_single(cfg, args.content[0], args.style[0], args.out)
    else:
        run_batch(cfg, args.content, args.style, args.out_dir, args.use_gpu, args.address, args.num_cpus)
    return 0


if __name__ == "__main__":
    from jobs.cli import run_cli

    run_cli(main)
