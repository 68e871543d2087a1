"""The driver side of a training run: check storage and cluster, run the job on Ray Train, write outputs.

    summary, run_dir = run_job("jobs.augment", cfg, address)   # what a job's CLI calls

`fit` is the core: it runs `jobs.loop.train_worker` on `cfg.num_workers` Ray Train workers (DDP),
restarts them from the latest checkpoint after a failure, and returns `result.json`'s content.
Runs live in `<storage_path>/<name>/`; re-running the same name resumes it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable

import torch

from jobs import outputs
from jobs.cli import UserError
from jobs.loop import CHECKPOINT_FILE, train_worker
from jobs.paths import absolute_paths, is_uri, storage_dir


def run_job(job: str | ModuleType, cfg, address: str | None = None) -> tuple[dict[str, Any], Path | str]:
    """A job CLI's flow after its config is validated: storage check, the config printed, Ray started
    (embedded, or the cluster at `address`), then `fit`. Returns (summary, run directory)."""
    from jobs.cli import init_ray

    check_storage(cfg)
    print("config:", dataclasses.asdict(cfg), flush=True)
    summary = finished_run(cfg)  # a re-run of a finished run needs no Ray
    if summary is None:
        init_ray(address)
        summary = fit(job, cfg)
    return summary, run_dir(cfg)


def run_from_cli(job: str, argv: list[str] | None = None):
    """A job entrypoint's whole driver flow: its flags (and `--config FILE`) -> its validated Config
    (`job.validate`: what the field declarations cannot check) -> `run_job`. Returns (cfg, summary, run dir)."""
    import importlib

    from jobs.config import load_config

    module = importlib.import_module(job)
    args = module.parse_args(argv)
    cfg = load_config(module.Config, args, args.config)
    module.validate(cfg)
    summary, out = run_job(job, cfg, args.address)
    return cfg, summary, out


def fit(job: str | ModuleType, cfg, max_failures: int = 3, callbacks: Iterable[Any] = ()) -> dict[str, Any]:
    """Run job module `job` with config `cfg` on Ray Train; write and return `result.json`'s content.

    Re-running with the same storage_path and name resumes from the latest checkpoint; a run that
    finished with the same config returns at once (`finished_run`). `callbacks` go to Ray Train's
    RunConfig (a Tune sweep passes `TuneReportCallback()` so that every epoch's report reaches its
    scheduler)."""
    out = check_storage(cfg)
    callbacks = list(callbacks)
    done = None if callbacks else finished_run(cfg)  # a sweep's trials report every epoch to Tune: always run
    if done is not None:
        return done
    import ray.train
    from ray.train.torch import TorchTrainer

    check_resources(cfg.num_workers, cfg.cpus_per_worker, cfg.use_gpu)
    if hasattr(cfg, "data_mode"):
        from jobs.stream import check_decode_cpus

        check_decode_cpus(cfg)
    cfg = worker_config(cfg, out)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"job": job if isinstance(job, str) else job.__name__, "config": dataclasses.asdict(cfg)},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker={"CPU": cfg.cpus_per_worker},
                                               # PACK fills a node before the next; SPREAD one worker per node
                                               placement_strategy=getattr(cfg, "placement_strategy", "PACK")),
        run_config=ray.train.RunConfig(
            # a URI goes to Ray Train as is: every worker writes its checkpoints there directly
            name=cfg.name, storage_path=cfg.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint: {result.error}")
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    history = state["history"]
    summary = {**history[-1], "epochs": len(history), "config": dataclasses.asdict(cfg), "history": history,
               "plan": state.get("plan"), "checkpoint": result.checkpoint.path, "meta": state["meta"]}
    outputs.write_outputs(out, summary, state)
    return summary


def worker_config(cfg, out: Path | str):
    """The config the workers get (and result.json records): absolute paths, since the workers do not
    run in this directory (previews go into the run dir)."""
    return absolute_paths(cfg if is_uri(out) else dataclasses.replace(cfg, storage_path=str(out.parent)))


def finished_run(cfg) -> dict[str, Any] | None:
    """result.json's content when the run `<storage_path>/<name>` already finished with exactly this
    config and its checkpoint is still the run's newest; its outputs are written again from that
    checkpoint, as `fit` would, without starting Ray Train (which would restore the checkpoint, find
    nothing left to train and return it). None otherwise: a changed setting goes through Ray Train,
    which resumes from the newest checkpoint (more epochs train on). Local storage only."""
    out = run_dir(cfg)
    if is_uri(out):
        return None
    try:
        summary = json.loads((out / "result.json").read_text())
        checkpoint = Path(summary["checkpoint"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    wanted = json.loads(json.dumps(dataclasses.asdict(worker_config(cfg, out)), default=str))
    newest = max((p for p in out.glob("checkpoint_*") if p.is_dir()), default=None)
    if summary.get("config") != wanted or newest is None or checkpoint.resolve() != newest.resolve():
        return None
    try:
        state = torch.load(checkpoint / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError):
        return None
    if json.loads(json.dumps(state["history"], default=str)) != summary["history"]:
        return None
    print(f"{cfg.name}: finished earlier with this config ({out / 'result.json'}, {checkpoint.name}): "
          "not training again (change a setting, e.g. --epochs, to continue, or --name to start anew)", flush=True)
    outputs.write_outputs(out, summary, state)
    return summary


def run_dir(cfg) -> Path | str:
    """<storage_path>/<name>: an absolute local Path, or a URI string when storage_path is a URI."""
    return storage_dir(cfg.storage_path, cfg.name)


def check_storage(cfg) -> Path | str:
    """Create the run directory or fail with one line (unwritable storage path, unknown URI scheme,
    missing cloud credentials)."""
    path = run_dir(cfg)
    probe = f".write-test-{os.getpid()}"
    if is_uri(path):
        import pyarrow
        import pyarrow.fs

        try:
            fs, fs_path = pyarrow.fs.FileSystem.from_uri(path)
            fs.create_dir(fs_path, recursive=True)
            with fs.open_output_stream(f"{fs_path}/{probe}") as f:
                f.write(b"ok")
            fs.delete_file(f"{fs_path}/{probe}")
        except (OSError, ValueError, pyarrow.ArrowException) as e:
            raise UserError(f"storage path {cfg.storage_path} is not writable: {str(e).splitlines()[0]}") from None
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / probe).write_text("ok")
        (path / probe).unlink()
    except OSError as e:
        raise UserError(f"storage path {cfg.storage_path} is not writable: {e.strerror or e}") from None
    return path


def resource_wait_s() -> float:
    """How long to wait for an autoscaling cluster to grow: env RAYCV_RESOURCE_WAIT_S (cluster.yaml
    sets it on the head, so jobs inherit it), else 0."""
    return float(os.environ.get("RAYCV_RESOURCE_WAIT_S", "0") or 0)


def request_and_wait(bundles: list[dict[str, float]], wait_s: float | None = None) -> None:
    """On an autoscaling cluster, make room for `bundles` (e.g. one {"CPU": 1, "GPU": 1} per worker).

    When the cluster's total resources do not cover the bundles' sum and wait_s > 0 (default:
    `resource_wait_s()`), ask the autoscaler for them (`request_resources`: it launches nodes now,
    before any placement group exists) and poll until they are there or wait_s has passed.
    Otherwise a no-op: the caller's own check then fails with its message.
    """
    import ray

    wait_s = resource_wait_s() if wait_s is None else wait_s
    need: dict[str, float] = {}
    for bundle in bundles:
        for key, value in bundle.items():
            need[key] = need.get(key, 0) + value

    def missing() -> dict[str, float]:
        have = ray.cluster_resources()
        return {k: v for k, v in need.items() if have.get(k, 0) < v}

    if wait_s <= 0 or not missing():
        return
    from ray.autoscaler.sdk import request_resources

    print(f"waiting up to {wait_s:g} s for the cluster to grow to {need} (short of {sorted(missing())})", flush=True)
    request_resources(bundles=[{k: v for k, v in b.items() if v} for b in bundles])
    deadline = time.monotonic() + wait_s
    try:
        while missing() and time.monotonic() < deadline:
            time.sleep(2)
    finally:
        request_resources(bundles=[])  # placement groups hold the nodes from here on


def check_resources(num_workers: int, cpus_per_worker: int, use_gpu: bool, wait_s: float | None = None) -> None:
    """Fail now, not after an endless wait, when the cluster cannot place the workers (after
    waiting for an autoscaling cluster to add nodes, see `request_and_wait`)."""
    import ray

    if num_workers < 1:
        raise UserError("--num-workers must be at least 1")
    wait_s = resource_wait_s() if wait_s is None else wait_s
    request_and_wait([{"CPU": cpus_per_worker, "GPU": 1 if use_gpu else 0}] * num_workers, wait_s)
    have = ray.cluster_resources()
    need_cpu = num_workers * cpus_per_worker
    waited = f"after waiting {wait_s:g} s: " if wait_s > 0 else ""
    if have.get("CPU", 0) < need_cpu:
        raise UserError(f"{waited}{num_workers} workers x {cpus_per_worker} CPU need {need_cpu} CPUs but the Ray cluster "
                        f"has {have.get('CPU', 0):g}; lower --num-workers or add nodes")
    if use_gpu and have.get("GPU", 0) < num_workers:
        raise UserError(f"{waited}{num_workers} GPU workers need {num_workers} GPUs but the Ray cluster has "
                        f"{have.get('GPU', 0):g}; lower --num-workers or drop --use-gpu")

