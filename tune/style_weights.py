"""Style-transfer loss-weight sweeps: which content/style/TV weighting looks right?

    python -m tune.style_weights --content rainier.jpg --style autumn-oak.jpg --grid-points 3
    python -m tune.style_weights --content C.jpg --style S.jpg --search random --num-samples 12 \\
        --style-weight-range 1e2 1e5 --tv-weight-range 1 100 --steps 300 --use-gpu

Weighted losses cannot be compared across weightings, so every trial (one `jobs.style.stylize` run)
reports the UNWEIGHTED content and style distances of its result at fixed VGG-19 layers
(content 25, style 0 5 10 19 28). The sweep marks the trials no other trial beats on both
distances (the Pareto front) and writes to <storage-path>/<name>/: results.csv, contact_sheet.png
(every result labelled with its weights, the front marked), pareto.png and images/*.png.
Every flag that is not the sweep's own goes to the style job (`python -m jobs.style --help`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from jobs.cli import UserError, init_ray, run_cli
from jobs.config import load_config
from jobs.outputs import figure
from jobs.images import contact_sheet, load_image
from jobs.style import StyleConfig, cached_extractor, distances, stylize, winograd_wanted
from jobs.vgg import RANDOM_WEIGHTS_WARNING
from jobs.style_cli import build_parser as style_parser
from tune.sweep import (OutputDir, check_restore, format_table, pareto_front, read_sweep_file, sweep_path,
                        trial_concurrency, tune_storage, write_csv)

WEIGHTS = ("content_weight", "style_weight", "tv_weight")
# the yardstick every trial is measured with, whatever layers its own loss uses (SPEC section 3)
CONTENT_LAYERS, STYLE_LAYERS = (25,), (0, 5, 10, 19, 28)
RESULT_PNG = "result.png"


def style_trial(config: dict[str, Any], content: bytes, style: bytes) -> None:
    """One trial: stylize with this trial's weights, then report the unweighted distances of the
    result, with the image as the trial's checkpoint. config = {"base": StyleConfig dict, <weights>}."""
    import ray.tune

    cfg = StyleConfig(**{**config["base"], **{k: config[k] for k in WEIGHTS}})
    last = max([*cfg.content_layers, *cfg.style_layers, *CONTENT_LAYERS, *STYLE_LAYERS])
    extractor = cached_extractor(cfg.weights, cfg.seed, cfg.device, last, cfg.channels_last, cfg.precision,
                                 winograd_wanted(cfg))
    image, history = stylize(content, style, cfg, extractor=extractor)
    measured = distances(image, content, style, extractor, size=cfg.size, content_layers=CONTENT_LAYERS,
                         style_layers=STYLE_LAYERS, precision=cfg.precision)
    final = history[-1] if history else {}
    metrics = {"content_distance": measured["content"], "style_distance": measured["style"],
               "tv_distance": measured["tv"], "weighted_total": final.get("total", float("nan")),
               "seconds": final.get("time_s", 0.0)}
    with tempfile.TemporaryDirectory() as tmp:
        image.save(Path(tmp) / RESULT_PNG)
        ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(tmp))


# ----------------------------------------------------------------------------- command line

def sweep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tune.style_weights", description=__doc__, add_help=False, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-h", "--help", action="store_true", help="this help, then the style job's flags")
    p.add_argument("--search", choices=["grid", "random"], default="grid",
                   help="grid: --grid-points log-spaced values per swept weight, every combination; "
                        "random: --num-samples log-uniform draws (default grid)")
    p.add_argument("--grid-points", type=int, default=3, help="grid: values per swept weight (default 3)")
    p.add_argument("--num-samples", type=int, default=9, help="random: trials (default 9)")
    p.add_argument("--content-weight-range", type=float, nargs=2, metavar=("MIN", "MAX"), default=[1.0, 1.0],
                   help="content weight range; MIN == MAX keeps it fixed (default 1 1: with Adam only the "
                        "ratios of the weights matter)")
    p.add_argument("--style-weight-range", type=float, nargs=2, metavar=("MIN", "MAX"), default=[1e2, 1e4],
                   help="style weight range (default 1e2 1e4)")
    p.add_argument("--tv-weight-range", type=float, nargs=2, metavar=("MIN", "MAX"), default=[1.0, 100.0],
                   help="total-variation weight range (default 1 100)")
    p.add_argument("--max-concurrent", type=int, help="at most this many trials at once (default: as many as fit)")
    p.add_argument("--storage-path", default="results", help="where sweeps live: local directory or s3://bucket/prefix (default results)")
    p.add_argument("--name", default="style-weights", help="sweep name: the sweep directory is <storage-path>/<name> (default style-weights)")
    p.add_argument("--resume", action="store_true", help="finish the interrupted sweep <storage-path>/<name> (other flags ignored)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
    return p


def parse_args(argv=None) -> tuple[argparse.Namespace, argparse.Namespace]:
    """(sweep args, style job args)."""
    args, rest = sweep_parser().parse_known_args(argv)
    if args.help:
        sweep_parser().print_help()
        print("\nstyle job flags (python -m jobs.style), applied to every trial:")
        style_parser().parse_args(["--help"])
    if args.resume and "--content" not in rest:  # the style parser insists on them; the sweep has its own
        rest = [*rest, "--content", "-", "--style", "-"]
    job = style_parser().parse_args(rest)
    if job.out or job.out_dir:
        raise UserError("--out/--out-dir do not apply to a sweep: results go to <storage-path>/<name>")
    return args, job


def weight_values(lo: float, hi: float, points: int) -> list[float]:
    """`points` log-spaced values from lo to hi (one value when lo == hi)."""
    if not (0 < lo <= hi and math.isfinite(hi)):
        raise UserError(f"a weight range needs 0 < MIN <= MAX, got {lo:g} {hi:g}")
    if lo == hi or points == 1:
        return [lo] if lo == hi else [math.sqrt(lo * hi)]
    step = math.log(hi / lo) / (points - 1)
    return [float(f"{lo * math.exp(i * step):.4g}") for i in range(points)]


def search_space(args) -> tuple[dict[str, Any], int]:
    """The weights' space and Tune's num_samples: an exact grid, or log-uniform draws."""
    from ray import tune

    ranges = dict(zip(WEIGHTS, (args.content_weight_range, args.style_weight_range, args.tv_weight_range)))
    if args.search == "grid":
        if args.grid_points < 1:
            raise UserError("--grid-points must be at least 1")
        return {k: tune.grid_search(weight_values(lo, hi, args.grid_points)) for k, (lo, hi) in ranges.items()}, 1
    if args.num_samples < 1:
        raise UserError("--num-samples must be at least 1")
    space = {}
    for k, (lo, hi) in ranges.items():
        weight_values(lo, hi, 1)  # validates the range
        space[k] = lo if lo == hi else tune.loguniform(lo, hi)
    return space, args.num_samples


# ----------------------------------------------------------------------------- results

def weights_label(row: dict[str, Any]) -> str:
    return f"c {row['content_weight']:.3g}  s {row['style_weight']:.3g}  tv {row['tv_weight']:.3g}"


def results_sheet(content, style, rows: list[dict[str, Any]], images: dict[str, Any]):
    """The inputs, then every result, each with its weights and distances underneath; results on
    the Pareto front get a red frame and a star. Returns a PIL image."""
    shown = [r for r in rows if r["trial_id"] in images]
    tiles = [content, style, *(images[r["trial_id"]] for r in shown)]
    captions = [("content image", ""), ("style image", "")] + [
        (weights_label(r), f"{'* ' if r['pareto'] else ''}dc {r['content_distance']:.3g}  ds {r['style_distance']:.3g}")
        for r in shown]
    cols = min(len(tiles), max(3, math.ceil(math.sqrt(len(tiles)))))
    return contact_sheet(tiles, cols, cell=180, captions=captions, marked=[False, False, *(r["pareto"] for r in shown)])


def plot_front(rows: list[dict[str, Any]], path: Path) -> None:
    """Style distance against content distance (log-log); the front joined and labelled."""
    ok = [r for r in rows if r["content_distance"] is not None]
    rest = [r for r in ok if not r["pareto"]]
    front = sorted((r for r in ok if r["pareto"]), key=lambda r: r["content_distance"])
    with figure(path, (6, 4.5)) as ax:
        if rest:
            ax.scatter([r["content_distance"] for r in rest], [r["style_distance"] for r in rest], c="gray",
                       label="dominated")
        ax.plot([r["content_distance"] for r in front], [r["style_distance"] for r in front], "o-", c="red",
                label="Pareto front")
        for r in front:
            ax.annotate(f"s {r['style_weight']:.2g}, tv {r['tv_weight']:.2g}", (r["content_distance"], r["style_distance"]),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")
        if all(r["content_distance"] > 0 and r["style_distance"] > 0 for r in ok):
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_xlabel("content distance (unweighted, layer 25)")
        ax.set_ylabel("style distance (unweighted, layers 0 5 10 19 28)")


def summarize(results, saved: dict[str, Any], out: OutputDir) -> list[dict[str, Any]]:
    """Rows (Pareto flag included) -> printed table, results.csv, images/, contact_sheet.png, pareto.png."""
    from PIL import Image

    rows, images = [], {}
    (out / "images").mkdir(exist_ok=True)
    for r in results:
        if not r.config:
            continue
        m = r.metrics or {}
        trial_id = m.get("trial_id") or Path(r.path).name
        row = {"trial_id": trial_id, **{k: r.config[k] for k in WEIGHTS},
               **{k: m.get(k) for k in ("content_distance", "style_distance", "tv_distance", "weighted_total", "seconds")},
               "status": "error" if r.error else ("done" if "content_distance" in m else "unfinished"), "image": ""}
        if r.checkpoint is not None and "content_distance" in m:
            with r.checkpoint.as_directory() as d:
                images[trial_id] = Image.open(Path(d) / RESULT_PNG).convert("RGB")
            row["image"] = f"images/{trial_id}.png"
            images[trial_id].save(out / row["image"])
        rows.append(row)
    done = [r for r in rows if r["status"] == "done"]
    for r, front in zip(done, pareto_front([(r["content_distance"], r["style_distance"]) for r in done])):
        r["pareto"] = front
    for r in rows:
        r.setdefault("pareto", False)
    rows.sort(key=lambda r: (not r["pareto"], r["style_distance"] if r["style_distance"] is not None else math.inf))
    columns = ["trial_id", *WEIGHTS, "content_distance", "style_distance", "tv_distance", "pareto", "status", "seconds"]
    print(format_table(rows, columns), flush=True)
    write_csv(rows, out / "results.csv")
    content = load_image(saved["content_path"], name="content image")
    style = load_image(saved["style_path"], name="style image")
    results_sheet(content, style, rows, images).save(out / "contact_sheet.png")
    plot_front(rows, out / "pareto.png")
    return rows


def main(argv=None) -> int:
    args, job = parse_args(argv)
    path = sweep_path(args.storage_path, args.name)
    restore = check_restore(path, args.resume)
    out = OutputDir(path)
    if restore:
        saved = json.loads(read_sweep_file(path, "sweep.json"))
    else:
        if len(job.content) != 1 or len(job.style) != 1:
            raise UserError("a weight sweep takes one --content and one --style image")
        cfg = load_config(StyleConfig, job, job.config)
        cfg.device = "cuda" if job.use_gpu else "cpu"  # each trial gets one GPU with --use-gpu
        cfg.validate()
        space, num_samples = search_space(args)
        for p in (job.content[0], job.style[0]):
            load_image(p, cfg.max_pixels)  # one clear line for a bad input, before any trial starts
        saved = {"base": dataclasses.asdict(cfg), "content_path": os.path.abspath(job.content[0]),
                 "style_path": os.path.abspath(job.style[0]), "use_gpu": bool(job.use_gpu),
                 "sweep": {k: v for k, v in vars(args).items() if k != "help"}}
    if saved["base"]["weights"] == "random":
        print(RANDOM_WEIGHTS_WARNING, flush=True)
    from ray import tune

    init_ray(args.address)
    per_trial = {"CPU": 1, "GPU": 1 if saved["use_gpu"] else 0}
    images = {k: Path(saved[f"{k}_path"]).read_bytes() for k in ("content", "style")}
    trainable = tune.with_resources(tune.with_parameters(style_trial, **images), per_trial)
    if restore:
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        concurrency = trial_concurrency(per_trial["CPU"], per_trial["GPU"], args.max_concurrent)
        print("sweep:", saved["sweep"], flush=True)
        print("base config:", saved["base"], flush=True)
        (out / "sweep.json").write_text(json.dumps(saved, indent=2) + "\n")
        out.publish()
        tuner = tune.Tuner(
            trainable, param_space={"base": saved["base"], **space},
            tune_config=tune.TuneConfig(num_samples=num_samples, max_concurrent_trials=concurrency),
            run_config=tune.RunConfig(name=args.name, storage_path=tune_storage(args.storage_path),
                                      failure_config=tune.FailureConfig(max_failures=1)))
    results = tuner.fit()
    rows = summarize(results, saved, out)
    where = out.publish()
    unfinished = sum(r["status"] != "done" for r in rows)
    if unfinished:
        print(f"{unfinished} trial(s) did not finish; finish them with: python -m tune.style_weights "
              f"--storage-path {args.storage_path} --name {args.name} --resume", flush=True)
        return 1
    front = [weights_label(r) for r in rows if r["pareto"]]
    print(f"Pareto front ({len(front)} of {len(rows)}): " + "; ".join(front))
    print(f"{where}/ has results.csv, contact_sheet.png, pareto.png, images/")
    return 0


if __name__ == "__main__":
    run_cli(main)
