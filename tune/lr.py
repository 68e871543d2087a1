"""Learning-rate sweeps over a training job: Ray Tune samples the space, ASHA stops weak trials early.

    python -m tune.lr --job augment --data synthetic --epochs 3 --num-samples 8
    python -m tune.lr --job finetune --data hotdog.zip --num-samples 16 --use-gpu --num-workers 2
    python -m tune.lr --job augment --name lr-augment-cifar10 --resume   # finish an interrupted sweep

Every flag that is not the sweep's own goes to the job (`python -m jobs.<job> --help`) and applies to
every trial. Each trial is the job itself: with one worker the job's training loop (`jobs.loop.train`)
runs inside the trial; with more, `jobs.driver.fit` runs a TorchTrainer named after the trial id. Either
way every epoch's test accuracy reaches Tune, whose ASHA scheduler stops the weak trials. The sweep directory `<storage-path>/<name>/` receives
results.csv, best.json (`python -m jobs.<job> --config best.json` retrains the winner), lr.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
from pathlib import Path
from typing import Any

from jobs import driver, loop
from jobs.cli import UserError, init_ray, run_cli
from jobs.config import load_config
from jobs.outputs import figure
from jobs.paths import absolute as absolute_if_local, is_uri
from tune.sweep import (OutputDir, check_restore, format_table, read_sweep_file, sweep_path, trial_concurrency,
                        tune_storage, write_csv)

METRIC, MODE = "test_acc", "max"

# job -> the searched Config fields and their default log-uniform ranges
# None: a decade either side of the job's own lr (the recipe's: 1e-3 reference, 1.5 x batch/1024 fast)
JOBS: dict[str, dict[str, tuple[float, float] | None]] = {
    "augment": {"lr": None},
    "finetune": {"lr": (1e-5, 1e-1), "head_lr_mult": (1.0, 100.0), "weight_decay": (1e-5, 1e-2)},
}


def train_trial(config: dict[str, Any]) -> None:
    """One Tune trial: the job's Config with this trial's sampled values, trained as the job trains.

    config = {"job", "base": asdict(job Config), "trial_storage", <searched field>: value, ...}.
    One worker: this trial process is the worker; the job's loop runs right here with Tune as its
    session (each epoch's report and checkpoint go to Tune). More: `driver.fit` runs a TorchTrainer
    named after the trial id (a restored trial resumes its own Train checkpoints) whose
    TuneReportCallback forwards each epoch's report to Tune.
    """
    import ray.tune
    import torch
    from ray.tune.integration.ray_train import TuneReportCallback

    job = importlib.import_module(f"jobs.{config['job']}")
    searched = {k: config[k] for k in JOBS[config["job"]]}
    cfg = job.Config(**{**config["base"], **searched, "storage_path": config["trial_storage"],
                        "name": ray.tune.get_context().get_trial_id()})
    if cfg.num_workers == 1:
        device = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
        loop.train(cfg, job, ray.tune, rank=0, world=1, device=device)
    else:
        driver.fit(job, cfg, callbacks=[TuneReportCallback()])


def decode_cpus(base) -> float:
    """CPUs a trial's stream-mode decode tasks hold (0 in resident mode)."""
    return base.decode_cpus if getattr(base, "data_mode", "resident") == "stream" else 0.0


def trial_resources(base, driver_cpus: float) -> dict[str, float]:
    """What Tune reserves for one trial's process. One worker: the trial process is the worker.
    More: the trial function only drives a TorchTrainer, whose workers Ray Train places on top.
    Stream mode's decode tasks run outside the trial's placement group (jobs.stream schedules them
    explicitly), on CPUs that `build_tuner` leaves free when it sizes the concurrency."""
    if base.num_workers == 1:
        return {"CPU": base.cpus_per_worker, "GPU": 1 if base.use_gpu else 0}
    if driver_cpus == 0:  # Tune refuses an empty reservation: hold a little (logical) memory instead
        return {"CPU": 0, "memory": 64 * 1024**2}
    return {"CPU": driver_cpus, "GPU": 0}


def fit_workers_to_cluster(base, driver_cpus: float, have: dict[str, float], explicit: bool) -> str | None:
    """Laptop defaults: when the user did not choose the workers (no --num-workers, flag or config
    file) and one trial of the default `base.num_workers` workers + its driver does not fit the
    cluster (`have`: ray.cluster_resources()), run each trial as one worker (the trial process
    itself, no driver to reserve). Sets base.num_workers; returns the line to print, or None when
    nothing changed. An explicit --num-workers keeps its meaning (a trial that does not fit fails
    with trial_concurrency's one-line error)."""
    if explicit or base.num_workers == 1:
        return None
    need_cpu = base.num_workers * base.cpus_per_worker + driver_cpus
    need_gpu = base.num_workers if base.use_gpu else 0
    cpu, gpu = have.get("CPU", 0), have.get("GPU", 0)
    if cpu >= need_cpu and gpu >= need_gpu:
        return None
    workers = base.num_workers
    base.num_workers = 1
    return (f"trials: {workers} workers x {base.cpus_per_worker} CPU + {driver_cpus:g} for the trial driver need "
            f"{need_cpu:g} CPUs{f' and {need_gpu} GPUs' if need_gpu else ''} but the Ray cluster has {cpu:g}"
            f"{f' and {gpu:g} GPUs' if need_gpu else ''}: running each trial as 1 worker (the trial process); "
            f"set --num-workers to choose")


def num_workers_given(job_args) -> bool:
    """Whether the user chose the workers: --num-workers, or a --config file that sets num_workers."""
    if getattr(job_args, "num_workers", None) is not None:
        return True
    if getattr(job_args, "config", None):
        with open(job_args.config) as fh:  # load_config has read and checked it already
            loaded = json.load(fh)
        loaded = loaded["config"] if isinstance(loaded.get("config"), dict) else loaded
        return "num_workers" in loaded
    return False


# ----------------------------------------------------------------------------- command line

def sweep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tune.lr", description=__doc__, add_help=False, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-h", "--help", action="store_true", help="this help, then the job's flags")
    p.add_argument("--job", choices=sorted(JOBS), default="augment", help="the training job to sweep (default augment)")
    p.add_argument("--num-samples", type=int, default=8, help="trials to sample (with --lr-grid: repeats of the grid) (default 8)")
    p.add_argument("--lr-range", type=float, nargs=2, metavar=("MIN", "MAX"),
                   help="log-uniform learning-rate range (default augment: a decade either side of the job's "
                        "lr, so 1e-4 1e-2 for the reference recipe and 0.075 7.5 for --recipe fast at batch 512; "
                        "finetune 1e-5 1e-1)")
    p.add_argument("--lr-grid", help="comma-separated learning rates to try exactly (grid search) instead of sampling")
    p.add_argument("--head-mult-range", type=float, nargs=2, metavar=("MIN", "MAX"),
                   help="finetune: log-uniform range of the head's lr multiplier (default 1 100)")
    p.add_argument("--wd-range", type=float, nargs=2, metavar=("MIN", "MAX"),
                   help="finetune: log-uniform weight-decay range (default 1e-5 1e-2)")
    p.add_argument("--scheduler", choices=["asha", "none"], default="asha",
                   help="asha: stop weak trials early on test accuracy; none: run every trial to the end (default asha)")
    p.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs every trial runs before it can be stopped (default 1)")
    p.add_argument("--reduction-factor", type=float, default=3, help="ASHA: keep the top 1/factor at each rung (default 3)")
    p.add_argument("--driver-cpus", type=float, default=1.0,
                   help="CPUs reserved for each multi-worker trial's driver on top of its workers; it mostly waits, "
                        "so 0 lets a small cluster give every CPU to workers (default 1)")
    p.add_argument("--max-concurrent", type=int, help="at most this many trials at once (default: as many as the cluster fits)")
    p.add_argument("--storage-path", default="results", help="where sweeps live: local directory or s3://bucket/prefix (default results)")
    p.add_argument("--name", help="sweep name; the sweep directory is <storage-path>/<name> (default lr-<job>-<data>)")
    p.add_argument("--trial-storage", help="where trials' Train runs (checkpoints, model/) go; on a multi-node cluster a "
                                           "path every node shares (default <storage-path>/<name>/trials; required with s3://)")
    p.add_argument("--max-failures", type=int, default=1,
                   help="restarts of a failed trial from its latest checkpoint before it counts as errored (default 1)")
    p.add_argument("--resume", action="store_true", help="finish the interrupted sweep <storage-path>/<name> (job flags are ignored)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
    return p


def parse_args(argv=None) -> tuple[argparse.Namespace, Any, Any]:
    """(sweep args, job module, the job's base Config from the remaining flags)."""
    args, rest = sweep_parser().parse_known_args(argv)
    job = importlib.import_module(f"jobs.{args.job}")
    if args.help:
        sweep_parser().print_help()
        print(f"\njob flags (python -m jobs.{args.job}), applied to every trial:")
        job.parse_args(["--help"])
    job_args = job.parse_args(rest)  # an unknown flag: argparse's one-line error, exit 2
    base = load_config(job.Config, job_args, job_args.config)
    args.workers_given = num_workers_given(job_args)
    return args, job, base


def search_space(args, job_name: str, base) -> dict[str, Any]:
    """Log-uniform ranges (or an exact lr grid) for the job's searched fields; an lr range left to
    the job (JOBS) is a decade either side of `base.lr`, the lr its recipe chose."""
    from ray import tune

    ranges = dict(JOBS[job_name])
    if ranges["lr"] is None:
        ranges["lr"] = (base.lr / 10, base.lr * 10)
        if args.lr_range is None and not args.lr_grid:
            print(f"lr range: {base.lr / 10:g} to {base.lr * 10:g}, a decade either side of the job's lr {base.lr:g} "
                  f"(--lr-range MIN MAX to choose)", flush=True)
    for field, flag in (("lr", "lr_range"), ("head_lr_mult", "head_mult_range"), ("weight_decay", "wd_range")):
        value = getattr(args, flag)
        if value is None:
            continue
        if field not in ranges:
            raise UserError(f"--{flag.replace('_', '-')} applies to the finetune job only")
        lo, hi = value
        if not 0 < lo < hi:
            raise UserError(f"--{flag.replace('_', '-')} needs 0 < MIN < MAX, got {lo:g} {hi:g}")
        ranges[field] = (lo, hi)
    space = {k: tune.loguniform(lo, hi) for k, (lo, hi) in ranges.items()}
    if args.lr_grid:
        try:
            grid = [float(v) for v in args.lr_grid.split(",")]
        except ValueError:
            raise UserError(f"--lr-grid must be comma-separated numbers, got {args.lr_grid!r}") from None
        if any(v <= 0 for v in grid):
            raise UserError("--lr-grid values must be positive")
        space["lr"] = tune.grid_search(grid)
    return space


def build_tuner(args, base, path: str, restore: bool, space: dict[str, Any] | None):
    """A new Tuner over the job (or the restored one: its space and settings come from the sweep)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    per_trial_cpu = (base.num_workers * base.cpus_per_worker + (args.driver_cpus if base.num_workers > 1 else 0)
                     + decode_cpus(base))
    per_trial_gpu = base.num_workers if base.use_gpu else 0
    trainable = tune.with_resources(train_trial, trial_resources(base, args.driver_cpus))
    if restore:
        # a trial that errored resumes from its own Train checkpoints (its run is named after its id)
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    concurrency = trial_concurrency(per_trial_cpu, per_trial_gpu, args.max_concurrent)
    driver = f" + {args.driver_cpus:g} CPU for the trial driver" if base.num_workers > 1 else ""
    print(f"trials: {base.num_workers} worker(s) x {base.cpus_per_worker} CPU{' + 1 GPU' if base.use_gpu else ''}"
          f"{driver} each; up to {concurrency} at once", flush=True)
    if getattr(base, "optimizer", None) == "muon":  # the fast recipe's choice in fp32 on a CPU
        print(f"note: --optimizer muon: the searched lr is that of the SGD part (BatchNorm shifts, head); the "
              f"convolution filters keep --muon-lr {base.muon_lr:g} (pass --optimizer sgd to search one lr for all)",
              flush=True)
    scheduler = FIFOScheduler()
    if args.scheduler == "asha":
        # time is the epoch the loop reports (not Tune's iteration count, which restarts when a trial resumes)
        scheduler = ASHAScheduler(time_attr="epoch", max_t=base.epochs, grace_period=min(args.grace_period, base.epochs),
                                  reduction_factor=args.reduction_factor)
    trial_storage = args.trial_storage or str(Path(path) / "trials")
    param_space = {"job": args.job, "base": dataclasses.asdict(base), "trial_storage": trial_storage,
                   **space}
    return tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, num_samples=args.num_samples, scheduler=scheduler,
                                    max_concurrent_trials=concurrency),
        run_config=tune.RunConfig(name=args.name, storage_path=tune_storage(args.storage_path),
                                  failure_config=tune.FailureConfig(max_failures=args.max_failures),
                                  # one-worker trials checkpoint through Tune: weights + optimizer, every epoch
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2)),
    )


def prepare_base(base, job) -> Any:
    """Absolute local paths (trials run in their own directories); validated on the driver."""
    for field in ("data", "weights"):  # dataset / weights given as paths (not names like cifar10, imagenet)
        value = getattr(base, field, None)
        if isinstance(value, str) and os.path.exists(value):
            setattr(base, field, absolute_if_local(value))
    base.data_root = absolute_if_local(base.data_root)
    job.validate(base)
    return base


# ----------------------------------------------------------------------------- results

def trial_rows(results, searched: list[str]) -> list[dict[str, Any]]:
    """One row per trial, best first: searched values, epochs run, final and best test accuracy."""
    rows = []
    for r in results:
        config = r.config or {}
        epochs = config.get("base", {}).get("epochs")
        history = r.metrics_dataframe
        done_epochs = int(history["epoch"].max()) if history is not None and "epoch" in history else 0
        # Tune marks a trial "done" when it returned or the scheduler stopped it; not when interrupted
        if r.error:
            status = "error"
        elif epochs and done_epochs >= epochs:
            status = "completed"  # all epochs reported (a restored trial's last result may lack "done")
        elif not (r.metrics or {}).get("done"):
            status = "unfinished"
        else:
            status = "early-stopped"
        row = {"trial_id": (r.metrics or {}).get("trial_id") or Path(r.path).name,
               **{k: config.get(k) for k in searched},
               "epochs": done_epochs, "status": status,
               METRIC: float(history[METRIC].iloc[-1]) if done_epochs else None,
               f"best_{METRIC}": float(history[METRIC].max()) if done_epochs else None,
               "train_loss": float(history["train_loss"].iloc[-1]) if done_epochs else None}
        rows.append(row)
    rows.sort(key=lambda row: (row[METRIC] is None, -(row[METRIC] or 0), -row["epochs"]))
    return rows


def best_json(row: dict[str, Any], config: dict[str, Any], searched: list[str], sweep: str) -> dict[str, Any]:
    """The winner as a job config (`--config best.json`): the sweep's base config + the winning
    values, under its own run name in the job's storage path."""
    job_config = {**config["base"], **{k: row[k] for k in searched}, "name": f"{sweep}-best"}
    return {"config": job_config, METRIC: row[METRIC], "epochs": row["epochs"], "trial_id": row["trial_id"]}


def plot_lr(rows: list[dict[str, Any]], path: Path, best_id: str | None) -> None:
    """Final test accuracy against learning rate (log x); early-stopped trials as crosses."""
    with figure(path) as ax:
        for status, marker, label in (("completed", "o", "ran to the end"), ("early-stopped", "x", "stopped early (ASHA)")):
            pts = [(r["lr"], r[METRIC]) for r in rows if r["status"] == status and r[METRIC] is not None]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, s=40, label=label)
        best = [r for r in rows if r["trial_id"] == best_id]
        if best:
            ax.scatter([best[0]["lr"]], [best[0][METRIC]], marker="*", s=200, facecolors="none", edgecolors="red",
                       label="best")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("test accuracy (last epoch run)")


def summarize(results, args, out: OutputDir) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Print the table; write results.csv, best.json and lr.png. Returns (best.json's content, rows)."""
    configs = [r.config for r in results if r.config]
    if not configs:
        raise UserError("the sweep has no trials")
    searched = list(JOBS[configs[0]["job"]])
    rows = trial_rows(results, searched)
    columns = ["trial_id", *searched, "epochs", "status", METRIC, f"best_{METRIC}", "train_loss"]
    print(format_table(rows, columns), flush=True)
    write_csv(rows, out / "results.csv")
    finished = [r for r in rows if r["status"] in ("completed", "early-stopped") and r[METRIC] is not None]
    best = None
    if finished:
        best = best_json(finished[0], configs[0], searched, args.name)
        winner = next(r for r in results if r.config and (r.metrics or {}).get("trial_id") == best["trial_id"])
        # one-worker trials checkpoint into Tune's trial directory; multi-worker ones into their Train run
        best["checkpoint"] = winner.checkpoint.path if winner.checkpoint else (winner.metrics or {}).get("checkpoint_path")
        (out / "best.json").write_text(json.dumps(best, indent=2) + "\n")
    plot_lr(rows, out / "lr.png", best["trial_id"] if best else None)
    return best, rows


def main(argv=None) -> int:
    args, job, base = parse_args(argv)
    if args.driver_cpus < 0:
        raise UserError("--driver-cpus must not be negative")
    args.name = args.name or f"lr-{args.job}-{base.data.rstrip('/').split('/')[-1].split(':')[0].removesuffix('.zip')}"
    if args.num_samples < 1:
        raise UserError("--num-samples must be at least 1")
    path = sweep_path(args.storage_path, args.name)
    restore = check_restore(path, args.resume)
    out = OutputDir(path)
    if restore:  # the sweep's own job and base config, whatever flags came with --resume
        saved = json.loads(read_sweep_file(path, "sweep.json"))
        args.job, job = saved["job"], importlib.import_module(f"jobs.{saved['job']}")
        base = job.Config(**saved["base"])
        args.driver_cpus = saved["sweep"].get("driver_cpus", 1.0)
    else:
        if is_uri(args.storage_path) and base.num_workers > 1 and not args.trial_storage:
            raise UserError("multi-worker trials with an s3:// --storage-path need --trial-storage (a path every node shares)")
        space = search_space(args, args.job, base)
        base = prepare_base(base, job)
    init_ray(args.address)
    if not restore and driver.resource_wait_s() <= 0:  # an autoscaling cluster may still grow: leave it be
        import ray

        resized = fit_workers_to_cluster(base, args.driver_cpus, ray.cluster_resources(), args.workers_given)
        if resized:
            print(resized, flush=True)
    tuner = build_tuner(args, base, path, restore, None if restore else space)
    if not restore:
        sweep = {k: v for k, v in vars(args).items() if k not in ("help", "workers_given")}
        print("sweep:", sweep, flush=True)
        print("base config:", dataclasses.asdict(base), flush=True)
        (out / "sweep.json").write_text(json.dumps({"job": args.job, "base": dataclasses.asdict(base), "sweep": sweep},
                                                   indent=2) + "\n")
        out.publish()
    results = tuner.fit()
    best, rows = summarize(results, args, out)
    where = out.publish()
    # counted from the rows: after Ctrl-C, Tune's in-memory statuses read "terminated" for cut trials
    unfinished = sum(r["status"] in ("error", "unfinished") for r in rows) + (len(results) - len(rows))
    if unfinished:
        print(f"{unfinished} trial(s) did not finish (errors or an interruption); finish them with: "
              f"python -m tune.lr --storage-path {args.storage_path} --name {args.name} --resume", flush=True)
        return 1
    if best is None:
        raise UserError(f"no trial reported a result; see {path}")
    values = ", ".join(f"{k}={best['config'][k]:.3g}" for k in JOBS[args.job])
    print(f"best: {values}  test acc {best[METRIC]:.3f}; "
          f"{where}/ has results.csv, best.json, lr.png.  Retrain it: python -m jobs.{args.job} --config {where}/best.json")
    return 0


if __name__ == "__main__":
    run_cli(main)
