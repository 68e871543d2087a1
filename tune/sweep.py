"""What the sweeps share: trial concurrency from the cluster's resources, the sweep directory
(local or s3://), restore checks, CSV tables and the Pareto front."""
from __future__ import annotations

import csv
import math
import tempfile
from pathlib import Path
from typing import Any, Sequence

from jobs.cli import UserError
from jobs.paths import absolute, is_uri, storage_dir


def sweep_path(storage_path: str, name: str) -> str:
    """Where Tune keeps the sweep: `<storage_path>/<name>` (absolute for local paths)."""
    return str(storage_dir(storage_path, name))


def tune_storage(storage_path: str) -> str:
    """Tune wants an absolute local path or a URI."""
    return absolute(storage_path)


def trial_concurrency(cpus_per_trial: float, gpus_per_trial: float, limit: int | None = None) -> int:
    """How many trials fit at once on the cluster as it is now: min over CPU and GPU of
    floor(available / per trial), capped by `limit`. Fails with one line when not even one fits."""
    import ray

    from jobs.driver import request_and_wait

    # an autoscaling cluster may have no GPU node up yet: ask for room for the trials that should run
    # at once (a bundle per GPU, so that each fits a node) and wait (RAYCV_RESOURCE_WAIT_S; else a no-op)
    per_gpu = [{"CPU": cpus_per_trial / gpus_per_trial, "GPU": 1}] * math.ceil(gpus_per_trial) if gpus_per_trial else []
    request_and_wait((per_gpu or [{"CPU": cpus_per_trial}]) * (limit or 1))
    have = ray.cluster_resources()
    cpu, gpu = have.get("CPU", 0), have.get("GPU", 0)
    if cpu < cpus_per_trial or gpu < gpus_per_trial:
        raise UserError(f"one trial needs {cpus_per_trial:g} CPUs (its workers + its driver) and "
                        f"{gpus_per_trial:g} GPUs but the Ray cluster has {cpu:g} CPUs and {gpu:g} GPUs; "
                        f"lower --num-workers/--cpus-per-worker or add nodes")
    fits = math.floor(cpu / cpus_per_trial)
    if gpus_per_trial:
        fits = min(fits, math.floor(gpu / gpus_per_trial))
    return max(1, min(fits, limit)) if limit else fits


def check_restore(path: str, resume: bool) -> bool:
    """True when `path` holds a sweep to restore. --resume without one, or an existing sweep
    without --resume, is a user error (never silently mix two sweeps under one name)."""
    from ray.tune import Tuner

    exists = Tuner.can_restore(path)
    if resume and not exists:
        raise UserError(f"no sweep to resume at {path}")
    if exists and not resume:
        raise UserError(f"a sweep already exists at {path}: pass --resume to finish it, or choose another --name")
    return exists


class OutputDir:
    """A local directory for the sweep's own files (results.csv, best.json, plots); for a URI
    storage path a temporary one, uploaded to the sweep directory by `publish()`."""

    def __init__(self, path: str):
        self.target = path
        self.local = Path(tempfile.mkdtemp(prefix="sweep-")) if is_uri(path) else Path(path)
        self.local.mkdir(parents=True, exist_ok=True)

    def __truediv__(self, name: str) -> Path:
        return self.local / name

    def publish(self) -> str:
        """Upload the files written so far (URI storage); returns where they are."""
        if not is_uri(self.target):
            return self.target
        import pyarrow.fs

        fs, root = pyarrow.fs.FileSystem.from_uri(self.target)
        for f in self.local.rglob("*"):
            if f.is_file():
                pyarrow.fs.copy_files(str(f), f"{root}/{f.relative_to(self.local).as_posix()}", destination_filesystem=fs)
        return self.target


def read_sweep_file(path: str, name: str) -> str:
    """Text of `<sweep dir>/<name>`, local or URI."""
    try:
        if not is_uri(path):
            return (Path(path) / name).read_text()
        import pyarrow.fs

        fs, root = pyarrow.fs.FileSystem.from_uri(path)
        with fs.open_input_stream(f"{root}/{name}") as f:
            return f.read().decode()
    except (OSError, FileNotFoundError) as e:
        raise UserError(f"cannot read {name} of the sweep at {path}: {e}") from None


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)


def format_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain fixed-width text table (floats with 4 significant digits)."""
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def pareto_front(points: Sequence[Sequence[float]]) -> list[bool]:
    """Mask of the non-dominated points when every coordinate is minimised.

    Point p dominates q when p <= q in every coordinate and p < q in at least one; O(n^2 d),
    fine for the tens of trials a sweep runs.
    """
    def dominates(p, q):
        return all(a <= b for a, b in zip(p, q)) and any(a < b for a, b in zip(p, q))

    return [not any(dominates(q, p) for q in points if q is not p) for p in points]
