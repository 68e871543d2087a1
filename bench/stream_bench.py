"""Stream mode vs resident mode (issue 14): memory, data throughput, epoch time and accuracy.

The benchmark builds its own data: CIFAR-10 JPEGs (32 px, from the ImageFolder zip) upscaled to
256 px (bicubic, JPEG quality 90) and written as ImageFolder trees on local disk, at two sizes N and
4N (~10% test, equal images per class), plus a small set for the 224 px epoch-time runs. The
smaller sets are hard links into the 4N set (the same bytes). Nothing is written into the repo but
the JSON of results.

Phases (`--phases`, in this order):

- memory: the same fine-tuning job (`jobs.finetune --weights none --mode scratch --image-size 224`, i.e.
  decoded at 256 px, `--time-budget` seconds of training, then the whole test set evaluated) at N
  and 4N images, in stream and resident mode. Per run: the training workers' peak RSS
  (result.json's `worker_peak_rss_mb`, the max over ranks of ru_maxrss), the driver's peak RSS
  (the `python -m jobs.finetune` process, polled with psutil every --poll-s), and the peak sum of
  RSS over the driver's whole process tree (Ray's daemons, Train workers, Ray Data decode workers;
  shared pages count once per process). Each run has its own --data-root (deleted after), so
  resident mode decodes on the driver and caches once per run, as a first run does.
- throughput: images/s delivered to a training loop with no model, in this process
  (ray.init(num_cpus=2), torch 1 thread, the job's batch per rank): `jobs.stream.StreamShards`
  (world 1, decode tasks of 1 CPU) + `Preset.train_batch` (RandomResizedCrop 224 + flip +
  normalise, batched) vs torchvision `ImageFolder` + `DataLoader(num_workers=2)` with
  RandomResizedCrop(224) + RandomHorizontalFlip + ToTensor + Normalize, and two Ray Data
  alternatives ending in the same `train_batch`: `read_images` (+ labels from the paths) and
  `read_binary_files` + decoding in `map_batches`. Same files, same count, per-epoch start-up
  included (a fresh pipeline / DataLoader workers per pass, as the job does each epoch); repeats
  interleaved, medians.
- e2e: the same 2-epoch `jobs.finetune` at 224 px on a small set, stream vs resident, --job-repeats
  times interleaved, with the history's per-epoch times (training and evaluation); medians.
- accuracy: the same 2-epoch `jobs.finetune` (same data, seed, schedule) in both modes on the N set
  at --acc-image-size, for --acc-seeds seeds; test accuracy compared per seed.

Every job runs on the embedded Ray (2 logical CPUs here) with --num-workers Ray Train workers x 1
CPU and --decode-cpus. Default: 1 worker, decode tasks of 1 CPU (the other CPU). With 2 workers the
job only accepts --decode-cpus 0, and 0-CPU decode tasks are not bounded by CPUs (see BENCHMARKS.md).

    python bench/stream_bench.py --out bench/results/stream_bench.json       # the issue's sizes (N = 5,000)

`--time-budget` counts training steps only (from each pass's first batch), so the memory runs'
peaks hold backward passes in both modes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
from jobs.precision import cpu_features, describe_cpu  # noqa: E402

PHASES = ("memory", "throughput", "e2e", "accuracy")
SIZE = 256


def load() -> str:
    return "%.1f %.1f %.1f" % os.getloadavg()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {load()}] {msg}", flush=True)


# ----------------------------------------------------------------------------- the data

_ZIPS: dict[str, zipfile.ZipFile] = {}  # per pool process: the zip's directory (60,000 entries) is read once


def _upscale(job):
    src_zip, members = job
    import io

    from PIL import Image

    zf = _ZIPS.get(src_zip) or _ZIPS.setdefault(src_zip, zipfile.ZipFile(src_zip))
    for name, dest in members:
        with Image.open(io.BytesIO(zf.read(name))) as im:
            im.convert("RGB").resize((SIZE, SIZE), Image.BICUBIC).save(dest, "JPEG", quality=90)
    return len(members)


def build_sets(cifar: Path, work: Path, n: int, test_frac: float, e2e_train: int, e2e_test: int) -> dict[str, Path]:
    """ImageFolder trees under `work`: big (4N), small (N), e2e; the smaller ones hard-link the big one's files."""
    from multiprocessing import Pool

    per_class = lambda total: max(1, total // 10)  # noqa: E731 - CIFAR-10: 10 classes
    big_n = 4 * n
    counts = {"big": (per_class(round(big_n * (1 - test_frac))), per_class(round(big_n * test_frac))),
              "small": (per_class(round(n * (1 - test_frac))), per_class(round(n * test_frac))),
              "e2e": (per_class(e2e_train), per_class(e2e_test))}
    sets = {k: work / f"{k}-{tr * 10}-{te * 10}" for k, (tr, te) in counts.items()}
    if all((d / ".done").exists() for d in sets.values()):
        return sets
    with zipfile.ZipFile(cifar) as zf:
        names = sorted(m for m in zf.namelist() if m.lower().endswith(".jpg"))
    by: dict[tuple[str, str], list[str]] = {}
    for m in names:
        split, cls = m.split("/")[-3:-1]
        by.setdefault((split, cls), []).append(m)
    classes = sorted({c for _, c in by})
    big = sets["big"]
    if not (big / ".done").exists():
        shutil.rmtree(big, ignore_errors=True)
        jobs = []
        for split, k in (("train", counts["big"][0]), ("test", counts["big"][1])):
            for cls in classes:
                (big / split / cls).mkdir(parents=True, exist_ok=True)
                members = by[(split, cls)][:k]
                if len(members) < k:
                    sys.exit(f"{cifar} has only {len(members)} {split} images of {cls}; lower --n")
                dests = [str(big / split / cls / Path(m).name) for m in members]
                pairs = list(zip(members, dests))
                jobs += [(str(cifar), pairs[i:i + 250]) for i in range(0, len(pairs), 250)]
        t0 = time.perf_counter()
        with Pool(os.cpu_count() or 2) as pool:
            done = sum(pool.map(_upscale, jobs))
        (big / ".done").write_text(f"{done} images\n")
        log(f"wrote {done} images at {SIZE} px to {big} in {time.perf_counter() - t0:.0f} s")
    for key in ("small", "e2e"):
        d = sets[key]
        if (d / ".done").exists():
            continue
        shutil.rmtree(d, ignore_errors=True)
        for split, k in (("train", counts[key][0]), ("test", counts[key][1])):
            for cls in classes:
                (d / split / cls).mkdir(parents=True, exist_ok=True)
                for f in sorted((big / split / cls).iterdir())[:k]:
                    os.link(f, d / split / cls / f.name)
        (d / ".done").write_text("hard links into " + big.name + "\n")
    return sets


def set_info(d: Path) -> dict:
    n_train = sum(1 for _ in (d / "train").rglob("*.jpg"))
    n_test = sum(1 for _ in (d / "test").rglob("*.jpg"))
    size = sum(f.stat().st_size for f in d.rglob("*.jpg"))
    return {"path": str(d), "train": n_train, "test": n_test, "jpeg_mb": round(size / 1e6, 1),
            "decoded_gb_at_256": round((n_train + n_test) * 3 * SIZE * SIZE / 1e9, 2)}


# ----------------------------------------------------------------------------- running a job

class TreePoller(threading.Thread):
    """Peak RSS of a process (the driver) and of the sum over its process tree, polled."""

    def __init__(self, pid: int, every: float):
        super().__init__(daemon=True)
        import ray  # puts Ray's bundled psutil on sys.path (the venv has no other)
        import psutil

        assert ray

        self.proc, self.every, self.stop = psutil.Process(pid), every, threading.Event()
        self.driver_mb = self.tree_mb = 0.0
        self.max_procs = 0

    def run(self):
        import psutil

        while not self.stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                rss = []
                for p in procs:
                    try:
                        rss.append(p.memory_info().rss)
                    except psutil.Error:
                        rss.append(0)
                self.driver_mb = max(self.driver_mb, rss[0] / 2**20)
                self.tree_mb = max(self.tree_mb, sum(rss) / 2**20)
                self.max_procs = max(self.max_procs, len(procs))
            except psutil.Error:
                break
            self.stop.wait(self.every)


def run_job(args, name: str, data: Path, mode: str, extra: list[str], module: str = "jobs.finetune") -> dict:
    """One `python -m jobs.finetune` run (or another job `module`) in a subprocess (embedded Ray);
    returns its figures."""
    record = Path(args.work) / f"{name}.record.json"
    if args.reuse and record.exists():
        log(f"{name}: reusing {record} (--reuse)")
        return json.loads(record.read_text())
    for attempt in range(3):
        try:
            out = _run_job_once(args, name, data, mode, extra, module)
            record.write_text(json.dumps(out, indent=2) + "\n")
            return out
        except RayStartError as e:
            log(f"{name}: {e}; retrying ({attempt + 1}/2)")
            time.sleep(10)
    sys.exit(f"{name}: Ray did not start three times")


class RayStartError(Exception):
    pass


def _run_job_once(args, name: str, data: Path, mode: str, extra: list[str], module: str) -> dict:
    runs, data_root = Path(args.work) / "runs", Path(args.work) / f"dataroot-{name}"
    shutil.rmtree(runs / name, ignore_errors=True)  # the same name would resume a finished run
    shutil.rmtree(data_root, ignore_errors=True)
    cmd = [sys.executable, "-m", module, "--data", str(data), "--weights", "none", "--mode", "scratch",
           "--data-mode", mode, "--decode-cpus", f"{args.decode_cpus:g}", "--num-workers", str(args.num_workers),
           "--seed", "0",
           "--storage-path", str(runs), "--data-root", str(data_root), "--name", name, *extra]
    shown = ("PYTHONPATH=. " if module.startswith("bench.") else "") + "python " + " ".join(cmd[1:]).replace(str(Path(args.work)), args.work)
    log(f"$ {shown}")
    logfile = Path(args.work) / f"{name}.log"
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with open(logfile, "w") as f:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1",  # the Train workers import `module` too
                                  "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
        poller = TreePoller(p.pid, args.poll_s)
        poller.start()
        for line in p.stdout:
            f.write(line)
            if line.startswith(("epoch ", "done", "error", "data mode")):
                print("    " + line.rstrip(), flush=True)
        rc = p.wait()
        poller.stop.set()
        poller.join()
    wall = time.perf_counter() - t0
    if rc != 0:
        text = logfile.read_text(errors="replace")
        if "timed out during startup" in text:  # the embedded Ray's start on a loaded machine: transient
            raise RayStartError(f"the embedded Ray timed out during startup (see {logfile})")
        sys.exit(f"{name} failed ({rc}); see {logfile}")
    r = json.loads((runs / name / "result.json").read_text())
    shutil.rmtree(data_root, ignore_errors=True)
    hist = r["history"]
    return {"command": shown, "mode": mode, "wall_s": round(wall, 1), "load_before": [round(x, 1) for x in load_before],
            "load_after": [round(x, 1) for x in os.getloadavg()],
            "worker_peak_rss_mb": round(max(h["worker_peak_rss_mb"] for h in hist), 1),
            "driver_peak_rss_mb": round(poller.driver_mb, 1), "tree_peak_rss_mb": round(poller.tree_mb, 1),
            "max_processes": poller.max_procs, "test_acc": r["test_acc"],
            "train_examples": [h["train_examples"] for h in hist], "test_examples": [h["test_examples"] for h in hist],
            "bad_files": sum(h.get("bad_train_files", 0) + h.get("bad_test_files", 0) for h in hist),
            "data_mode_reason": r["config"].get("data_mode_reason"),
            "epochs": [{k: (round(h[k], 4) if isinstance(h[k], float) else h[k]) for k in
                        ("epoch", "epoch_time_s", "examples_per_sec", "train_time_s", "train_acc", "test_acc",
                         "steps", "train_examples", "test_examples")} for h in hist]}


# ----------------------------------------------------------------------------- phases

def phase_memory(args, sets) -> dict:
    out = {}
    modes = args.memory_modes
    for mode in modes:
        for key in ("small", "big"):
            name = f"mem-{mode}-{key}-b{args.memory_budget:g}"
            out[f"{mode}/{key}"] = run_job(args, name, sets[key], mode,
                                           ["--image-size", "224", "--time-budget", f"{args.memory_budget:g}",
                                            "--batch-size", str(args.memory_batch)])
            r = out[f"{mode}/{key}"]
            log(f"{name}: worker peak {r['worker_peak_rss_mb']:.0f} MB, driver peak {r['driver_peak_rss_mb']:.0f} MB, "
                f"tree {r['tree_peak_rss_mb']:.0f} MB, {r['wall_s']:.0f} s")
    for mode in modes:
        a, b = out[f"{mode}/small"], out[f"{mode}/big"]
        out[f"{mode}/growth"] = {k: round(b[k] / a[k] - 1, 4) for k in ("worker_peak_rss_mb", "driver_peak_rss_mb",
                                                                      "tree_peak_rss_mb")}
    return out


def _paths_labels(d: Path, n: int, seed: int):
    from jobs.sources import FileSource, index_image_folder

    index = index_image_folder(FileSource(d)).subset(train=n, test=0)
    return index


def _train_batch_sink(preset, batch_iter, seed: int) -> int:
    """Consume (uint8 NCHW, labels) batches through Preset.train_batch; returns the images seen."""
    import torch

    g = torch.Generator().manual_seed(seed)
    count = 0
    for images, labels in batch_iter:
        x = preset.train_batch(images, g, (0.08, 1.0))
        count += len(labels)
    assert x.shape[1:] == (3, 224, 224), x.shape
    return count


def tp_stream(index, preset, batch, epoch):
    import torch

    from jobs.stream import StreamShards

    shards = StreamShards(index, 0, 1, batch, torch.device("cpu"), 0, SIZE, "center", decode_cpus=1.0)
    return _train_batch_sink(preset, shards.train_batches(epoch), epoch)


def tp_torchvision(index, preset, batch, epoch):
    import torch
    import torchvision
    from torch.utils.data import DataLoader
    from torchvision import transforms as T

    tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(preset.mean, preset.std)])
    keep = {str(Path(index.location) / n) for n in index.train}
    folder = torchvision.datasets.ImageFolder(str(Path(index.location) / "train"), transform=tf,
                                              is_valid_file=lambda p: p in keep)
    assert len(folder) == len(index.train), (len(folder), len(index.train))
    loader = DataLoader(folder, batch_size=batch, shuffle=True, num_workers=2,
                        generator=torch.Generator().manual_seed(epoch))
    count = 0
    for x, y in loader:
        count += len(y)
    assert x.shape[1:] == (3, 224, 224)
    return count


def _shuffled_paths(index, epoch):
    from jobs.data import shard_indices

    idx = shard_indices(len(index.train), 0, 1, epoch, 0).tolist()
    classes = {c: i for i, c in enumerate(index.classes)}
    return [str(Path(index.location) / index.train[i]) for i in idx], classes


def _label_from_path(paths, classes):
    import numpy as np

    return np.array([classes[Path(str(p)).parent.name] for p in paths], np.int64)


def _ray_batches(ds, batch):
    for b in ds.iter_torch_batches(batch_size=batch, prefetch_batches=2, device="cpu"):
        yield b["image"].permute(0, 3, 1, 2), b["label"]


def tp_read_images(index, preset, batch, epoch):
    import ray.data

    paths, classes = _shuffled_paths(index, epoch)

    def label(b):
        return {"image": b["image"], "label": _label_from_path(b["path"], classes)}

    ds = ray.data.read_images(paths, mode="RGB", include_paths=True).map_batches(label, batch_size=32)
    return _train_batch_sink(preset, _ray_batches(ds, batch), epoch)


def tp_read_binary(index, preset, batch, epoch):
    import numpy as np
    import ray.data

    paths, classes = _shuffled_paths(index, epoch)

    def decode(b):
        from jobs.images import decode_pixels

        images = np.stack([decode_pixels(raw, str(p), SIZE, "center") for raw, p in zip(b["bytes"], b["path"])])
        return {"image": images, "label": _label_from_path(b["path"], classes)}

    ds = ray.data.read_binary_files(paths, include_paths=True).map_batches(decode, batch_size=32)
    return _train_batch_sink(preset, _ray_batches(ds, batch), epoch)


def phase_throughput(args, sets) -> dict:
    import ray
    import torch

    from jobs.presets import Preset
    from jobs.stream import quiet_ray_data

    torch.set_num_threads(1)  # as a training worker with --cpus-per-worker 1
    preset = Preset.imagenet(224)
    index = _paths_labels(sets["small"], args.throughput_images, 0)
    batch = args.batch_size // args.num_workers  # one rank's batch in the job
    pipelines = {"stream (StreamShards + train_batch)": tp_stream,
                 "torchvision ImageFolder + DataLoader(num_workers=2)": tp_torchvision,
                 "Ray Data read_images + train_batch": tp_read_images,
                 "Ray Data read_binary_files + decode in map_batches + train_batch": tp_read_binary}
    rows: dict[str, list] = {k: [] for k in pipelines}
    loads: list[str] = []
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=512 * 1024**2, log_to_driver=False)
    try:
        quiet_ray_data()
        for k, fn in pipelines.items():  # warm-up: imports, Ray worker processes (not counted)
            fn(_paths_labels(sets["small"], 128, 0), preset, batch, 99)
        for r in range(args.repeats):
            for k, fn in pipelines.items():
                t0 = time.perf_counter()
                n = fn(index, preset, batch, r)
                rate = n / (time.perf_counter() - t0)
                rows[k].append(round(rate, 1))
                loads.append(load())
                log(f"repeat {r} {k}: {n} images, {rate:.1f} images/s")
    finally:
        ray.shutdown()
    med = {k: statistics.median(v) for k, v in rows.items()}
    ref = med["torchvision ImageFolder + DataLoader(num_workers=2)"]
    return {"images": len(index.train), "batch": batch, "repeats": args.repeats, "all_images_per_s": rows,
            "median_images_per_s": med, "ratio_to_torchvision": {k: round(v / ref, 3) for k, v in med.items()},
            "load_during": loads}


def phase_e2e(args, sets) -> dict:
    runs: dict[str, list] = {"stream": [], "resident": []}
    for r in range(args.job_repeats):  # interleaved, the first mode alternating
        for mode in (("stream", "resident") if r % 2 == 0 else ("resident", "stream")):
            runs[mode].append(run_job(args, f"e2e-{mode}-{r}", sets["e2e"], mode,
                                      ["--image-size", "224", "--epochs", "2", "--batch-size", str(args.e2e_batch)]))
    out: dict = {"runs": runs, "median": {}}
    for mode, rs in runs.items():
        med = out["median"][mode] = {"wall_s": statistics.median(r["wall_s"] for r in rs)}
        for e in range(2):
            eps = [r["epochs"][e] for r in rs]
            med[f"epoch{e + 1}_s"] = round(statistics.median(x["epoch_time_s"] for x in eps), 2)
            # the training pass's wall time (examples_per_sec is over it, start-up included)
            med[f"epoch{e + 1}_train_s"] = round(statistics.median(x["train_examples"] / x["examples_per_sec"]
                                                                   for x in eps), 2)
    s, r = out["median"]["stream"], out["median"]["resident"]
    out["stream_over_resident"] = {k: round(s[k] / r[k], 3) for k in s}
    return out


def phase_accuracy(args, sets) -> dict:
    out: dict = {"seeds": {}}
    for seed in range(args.acc_seeds):
        runs = {mode: run_job(args, f"acc-{mode}-s{seed}", sets["small"], mode,
                              ["--image-size", str(args.acc_image_size), "--epochs", "2", "--lr", f"{args.acc_lr:g}",
                               "--momentum", f"{args.acc_momentum:g}", "--batch-size", str(args.batch_size),
                               "--seed", str(seed)])
                for mode in ("stream", "resident")}
        runs["difference_points"] = round(100 * (runs["stream"]["test_acc"] - runs["resident"]["test_acc"]), 2)
        out["seeds"][seed] = runs
    diffs = [v["difference_points"] for v in out["seeds"].values()]
    out["difference_points"] = {"each": diffs, "median": statistics.median(diffs), "max_abs": max(map(abs, diffs))}
    return out


# ----------------------------------------------------------------------------- report

def print_tables(res: dict) -> None:
    m = res.get("memory")
    if m:
        print("\n| mode | set | worker peak RSS MB | driver peak RSS MB | process tree peak MB | wall s |")
        print("|---|---|---:|---:|---:|---:|")
        for mode in ("stream", "resident"):
            if f"{mode}/small" not in m:
                continue
            for key in ("small", "big"):
                r = m[f"{mode}/{key}"]
                s = res["sets"][key]
                print(f"| {mode} | {s['train'] + s['test']:,} | {r['worker_peak_rss_mb']:,.0f} | "
                      f"{r['driver_peak_rss_mb']:,.0f} | {r['tree_peak_rss_mb']:,.0f} | {r['wall_s']:.0f} |")
            g = m[f"{mode}/growth"]
            print(f"| {mode} | growth N->4N | {100 * g['worker_peak_rss_mb']:+.1f}% | "
                  f"{100 * g['driver_peak_rss_mb']:+.1f}% | {100 * g['tree_peak_rss_mb']:+.1f}% | |")
    t = res.get("throughput")
    if t:
        print(f"\n| pipeline ({t['images']} images, batch {t['batch']}) | images/s median | runs | vs torchvision |")
        print("|---|---:|---|---:|")
        for k, v in t["median_images_per_s"].items():
            print(f"| {k} | {v:.1f} | {', '.join(f'{x:.1f}' for x in t['all_images_per_s'][k])} | "
                  f"{t['ratio_to_torchvision'][k]:.2f}x |")
    e = res.get("e2e")
    if e:
        print("\n| mode (median of runs) | epoch 1 s | epoch 2 s | training pass 1 s | training pass 2 s | wall s |")
        print("|---|---:|---:|---:|---:|---:|")
        for mode, m in e["median"].items():
            print(f"| {mode} | {m['epoch1_s']:.1f} | {m['epoch2_s']:.1f} | {m['epoch1_train_s']:.1f} | "
                  f"{m['epoch2_train_s']:.1f} | {m['wall_s']:.0f} |")
        q = e["stream_over_resident"]
        print(f"| stream / resident | {q['epoch1_s']:.3f} | {q['epoch2_s']:.3f} | {q['epoch1_train_s']:.3f} | "
              f"{q['epoch2_train_s']:.3f} | {q['wall_s']:.3f} |")
    a = res.get("accuracy")
    if a:
        print("\n| seed | stream test acc | resident test acc | difference (points) |")
        print("|---|---:|---:|---:|")
        for seed, v in a["seeds"].items():
            print(f"| {seed} | {v['stream']['test_acc']:.4f} | {v['resident']['test_acc']:.4f} | "
                  f"{v['difference_points']:+.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cifar", default=str(ROOT.parent / "shared/data/cifar10-jpeg.zip"),
                   help="CIFAR-10 ImageFolder zip (train/<class>/*.jpg, test/<class>/*.jpg), the source of the images")
    p.add_argument("--work", default="/tmp/streambench", help="where the generated sets, runs and logs go (not the repo)")
    p.add_argument("--n", type=int, default=5000, help="images in the small set N (the big one has 4N)")
    p.add_argument("--test-frac", type=float, default=0.1, help="fraction of each set held out as test images")
    p.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES), help="what to measure")
    p.add_argument("--num-workers", type=int, default=1, help="Ray Train workers of every job (x 1 CPU)")
    p.add_argument("--decode-cpus", type=float, default=1.0, help="the jobs' --decode-cpus (stream mode); with "
                   "2 workers on the 2-CPU embedded Ray only 0 is accepted")
    p.add_argument("--batch-size", type=int, default=64, help="global batch of the accuracy jobs (the throughput "
                   "phase uses one rank's share of it)")
    p.add_argument("--memory-budget", type=float, default=30, help="--time-budget (s of training) of the memory runs")
    p.add_argument("--memory-modes", nargs="+", choices=("stream", "resident"), default=["stream", "resident"],
                   help="data modes of the memory runs")
    p.add_argument("--memory-batch", type=int, default=64, help="global batch of the memory runs")
    p.add_argument("--poll-s", type=float, default=0.25, help="how often the driver's and the tree's RSS are polled")
    p.add_argument("--throughput-images", type=int, default=1536, help="training images per throughput measurement")
    p.add_argument("--repeats", type=int, default=3, help="throughput repeats (interleaved; medians reported)")
    p.add_argument("--e2e-train", type=int, default=160, help="training images of the 224 px epoch-time set")
    p.add_argument("--e2e-test", type=int, default=64, help="test images of the 224 px epoch-time set")
    p.add_argument("--e2e-batch", type=int, default=32, help="global batch of the 224 px epoch-time runs")
    p.add_argument("--job-repeats", type=int, default=3, help="runs per mode of the epoch-time jobs (interleaved; medians)")
    p.add_argument("--acc-image-size", type=int, default=64, help="--image-size of the accuracy runs (on the N set)")
    p.add_argument("--acc-seeds", type=int, default=3, help="seeds of the accuracy runs (each in both modes)")
    p.add_argument("--acc-lr", type=float, default=0.05, help="--lr of the accuracy runs")
    p.add_argument("--acc-momentum", type=float, default=0.9, help="--momentum of the accuracy runs (so that 2 epochs "
                   "from scratch learn something to compare)")
    p.add_argument("--reuse", action="store_true", help="reuse each job run recorded in --work by an earlier "
                   "invocation (<name>.record.json) instead of running it again")
    p.add_argument("--keep-data", action="store_true", help="keep the generated sets in --work afterwards")
    p.add_argument("--out", default=str(ROOT / "bench/results/stream_bench.json"), help="JSON of the results")
    args = p.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cpu = cpu_features()
    log(describe_cpu(cpu))
    t_start = time.perf_counter()
    sets = build_sets(Path(args.cifar), work, args.n, args.test_frac, args.e2e_train, args.e2e_test)
    res: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "cpu": cpu,
                 "cpu_line": describe_cpu(cpu), "cpus": os.cpu_count(), "settings": vars(args),
                 "sets": {k: set_info(d) for k, d in sets.items()}, "load_start": load()}
    phases = {"memory": phase_memory, "throughput": phase_throughput, "e2e": phase_e2e, "accuracy": phase_accuracy}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in PHASES:
        if name in args.phases:
            t0 = time.perf_counter()
            log(f"phase {name}")
            res[name] = phases[name](args, sets)
            res.setdefault("phase_s", {})[name] = round(time.perf_counter() - t0, 1)
            out.write_text(json.dumps(res, indent=2) + "\n")  # partial results survive a later failure
    res["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    res["total_s"] = round(time.perf_counter() - t_start, 1)
    res["load_end"] = load()
    out.write_text(json.dumps(res, indent=2) + "\n")
    print_tables(res)
    print(f"\n{res['cpu_line']}; {res['started']} -> {res['finished']}; load start {res['load_start']}, "
          f"end {res['load_end']}; results in {out}")
    if not args.keep_data:
        for d in sets.values():
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
