"""The training engine: one loop for every job, run by Ray Train's TorchTrainer (DDP).

A job module (e.g. `jobs.augment`) provides a config dataclass `Config` and
`build_setup(cfg, device, rank, world) -> TrainSetup`; this module owns the rest: the epoch loop,
metrics reduced across ranks, checkpoints every epoch, resume, and the outputs of a run
(`result.json`, `curves.png`) under `<storage_path>/<name>/`.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import itertools
import json
import math
import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from jobs.cli import UserError

CHECKPOINT_FILE = "checkpoint.pt"
# Ray placement-group strategies for the workers (ScalingConfig.placement_strategy)
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class TrainSetup:
    """Everything the loop needs from a job, built on the worker.

    train_batches(epoch) yields this rank's shard for that epoch (reshuffled per epoch), as raw
    (images, labels) on the device; `prepare(images, train, generator)` turns raw images into the
    model's float input (decode/normalise, plus augmentation when train=True). `test_batches()`
    yields this rank's shard of the test set. `num_train` counts the examples of one epoch over
    all ranks. `meta` is stored in every checkpoint (class names, preprocessing preset, ...).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    train_batches: Callable[[int], Batches]
    test_batches: Callable[[], Batches]
    prepare: Callable[[torch.Tensor, bool, torch.Generator], torch.Tensor]
    num_train: int
    steps_per_epoch: int
    loss_fn: nn.Module = field(default_factory=nn.CrossEntropyLoss)
    lr_at: Callable[[int], float] | None = None  # step -> lr multiplier, applied to every group's base lr
    # progress in [0, 1] over the planned steps -> lr multiplier; planned steps = epochs x steps_per_epoch,
    # or what fits in cfg.time_budget. Use it (not lr_at) for a schedule that must span a time budget.
    schedule: Callable[[float], float] | None = None
    # (model, prepared images) -> logits at evaluation, e.g. flip test-time augmentation; None: model(x)
    predict: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    # weight averaging (e.g. `Lookahead`): .update(model, step, progress) after every optimizer step,
    # .finish(model) before the final evaluation, .state_dict()/.load_state_dict() in checkpoints
    averager: Any = None
    meta: dict[str, Any] = field(default_factory=dict)
    # a job that is not classification: (model, x, labels) -> (mean loss, {name: SUM over the batch's examples});
    # the loop then reports train_/test_<name> (per-example means) instead of accuracy. None: loss_fn(model(x), labels)
    step_loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]] | None = None
    metric_names: tuple[str, ...] = ()  # the names step_loss returns: reduced on every rank, even one without batches
    # on rank 0 after each epoch's evaluation: (unwrapped model, epoch index), e.g. to write a preview sheet
    after_epoch: Callable[[nn.Module, int], None] | None = None


# ----------------------------------------------------------------------------- the loop

def train_one_epoch(model, optimizer, loss_fn, batches: Batches, prepare, generator, device,
                    step0: int = 0, lr_at=None, scaler=None, amp_dtype=None, log=None,
                    stop=None, after_step=None, step_loss=None) -> dict[str, float]:
    """One pass over this rank's shard. Returns sums (loss, correct, count; step_loss's metrics) for
    cross-rank reduction.

    lr_at(step) scales every group's base lr; stop(step) -> True ends the pass before that step
    (a planned step count or a spent time budget; it must answer the same on every rank);
    after_step(step) runs after each optimizer step (weight averaging); step_loss replaces
    loss_fn(model(x), labels) for a job that is not classification (see TrainSetup.step_loss).
    """
    model.train()
    base_lrs = [g.setdefault("initial_lr", g["lr"]) for g in optimizer.param_groups]
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    sums: dict[str, torch.Tensor] = {}
    count, step = 0, step0
    for i, (images, labels) in enumerate(batches):
        if stop is not None and stop(step):
            break
        if lr_at is not None:
            for g, lr in zip(optimizer.param_groups, base_lrs):
                g["lr"] = lr * lr_at(step)
        x = prepare(images, True, generator)
        with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
            if step_loss is None:
                logits = model(x)
                loss = loss_fn(logits, labels)
            else:
                loss, batch_sums = step_loss(model, x, labels)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if after_step is not None:
            after_step(step)
        # accumulate on the device: no host sync per step
        loss_sum += loss.detach().float() * labels.numel()
        if step_loss is None:
            correct += (logits.argmax(1) == labels).sum()
        else:
            _add_sums(sums, batch_sums)
        count += labels.numel()
        step += 1
        if log is not None:
            log(i + 1, loss_sum, count)
    return {"loss_sum": loss_sum, "correct": correct, "count": count, "steps": step - step0, **sums}


@torch.no_grad()
def evaluate(model, loss_fn, batches: Batches, prepare, device, amp_dtype=None, predict=None,
             step_loss=None) -> dict[str, Any]:
    """Loss and accuracy (or step_loss's metric) sums over this rank's test shard (the unwrapped
    model: no DDP collectives). predict(model, x) -> logits replaces model(x) (test-time augmentation)."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for images, labels in batches:
        x = prepare(images, False, None)
        if step_loss is not None:
            with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
                loss, batch_sums = step_loss(model, x, labels)
            loss_sum += loss.float() * labels.numel()
            _add_sums(sums, batch_sums)
            count += labels.numel()
            continue
        with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
            logits = predict(model, x) if predict is not None else model(x)
        loss_sum += loss_fn(logits.float(), labels) * labels.numel()
        correct += (logits.argmax(1) == labels).sum()
        count += labels.numel()
    return {"loss_sum": loss_sum, "correct": correct, "count": count, **sums}


def _add_sums(sums: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> None:
    """sums[k] += batch[k] (detached, fp32), on the device: no host sync per step."""
    for k, v in batch.items():
        v = v.detach().float()
        sums[k] = sums[k] + v if k in sums else v


def epoch_means(split: str, sums: dict[str, float] | None, classification: bool,
                metric_names: tuple[str, ...] = ()) -> dict[str, float | None]:
    """Reduced sums -> per-example means: {split_loss, split_acc} or {split_loss, split_<metric>...}.
    sums None (a split not evaluated this epoch): the same keys, valued None."""
    if sums is None:
        names = ("acc",) if classification else metric_names
        return {f"{split}_loss": None, **{f"{split}_{k}": None for k in names}}
    n = max(sums["count"], 1)
    out = {f"{split}_loss": sums["loss_sum"] / n}
    if classification:
        out[f"{split}_acc"] = sums["correct"] / n
    else:
        out.update({f"{split}_{k}": v / n for k, v in sums.items() if k not in ("loss_sum", "correct", "count", "steps")})
    return out


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision`: "auto" is fp16 (with loss scaling) on CUDA and fp32
    on CPU; "bf16" is bfloat16 autocast on any device (no loss scaling needed); "fp32" is none."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def all_reduce_sums(values: dict[str, Any], device) -> dict[str, float]:
    """Sum each value over all ranks (a no-op without a process group). Returns Python floats."""
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


# ----------------------------------------------------------------------------- on each Ray Train worker

def train_worker(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Ray Train's per-worker function. payload = {"job": module name, "config": asdict(cfg)}.

    Runs `cfg.epochs` epochs, or, when the config has a `time_budget` (seconds), as many steps as
    fit in that much training time: see `StepPlan`.
    With payload["session"] == "tune" it is instead a plain single-process Ray Tune trainable
    (a one-worker sweep trial): checkpoints and per-epoch reports go to Tune, not Ray Train.
    """
    import ray.train
    import ray.train.torch

    job = importlib.import_module(payload["job"])
    cfg = job.Config(**payload["config"])
    if payload.get("session") == "tune":
        import ray.tune

        session, rank, world = ray.tune, 0, 1
        device = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
    else:
        ctx = ray.train.get_context()
        session, rank, world = ray.train, ctx.get_world_rank(), ctx.get_world_size()
        device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, cfg.cpus_per_worker))
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts them)

    setup = job.build_setup(cfg, device, rank, world)
    on_gpu = device.type == "cuda"
    model = setup.model.to(device, memory_format=torch.channels_last if on_gpu else torch.preserve_format)
    amp_dtype = autocast_dtype(getattr(cfg, "precision", "auto"), device)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    budget = getattr(cfg, "time_budget", None) or None

    history: list[dict[str, Any]] = []
    start_epoch, plan = 0, None
    ckpt = session.get_checkpoint()
    if ckpt is not None:  # resume after a worker failure or a re-run of the same --name
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / CHECKPOINT_FILE, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        setup.optimizer.load_state_dict(state["optimizer"])
        if setup.averager is not None and state.get("averager") is not None:
            setup.averager.load_state_dict(state["averager"])
        start_epoch, history = state["epoch"] + 1, list(state["history"])
        # a budgeted run keeps its plan (schedule length, training time spent) across restarts
        plan = state.get("plan") if budget else None
        if rank == 0:
            print(f"{cfg.name}: resuming from the checkpoint after epoch {start_epoch}", flush=True)
    ddp_model = ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model

    if plan is None:
        plan = {"total_steps": max(cfg.epochs, 1) * setup.steps_per_epoch, "fixed": not budget,
                "train_time_s": history[-1].get("train_time_s", 0.0) if history else 0.0}
    steps = StepPlan(budget, plan, device)
    lr_at = (lambda step: setup.schedule(step / steps.total)) if setup.schedule is not None else setup.lr_at

    def after_step(step):
        steps.observe(step)
        if setup.averager is not None:
            setup.averager.update(model, step, (step + 1) / steps.total)
        if steps.planned_now and rank == 0:
            print(f"{cfg.name}: {steps.step_time * 1e3:.0f} ms per step -> {steps.total} steps "
                  f"({steps.total / setup.steps_per_epoch:.2f} epochs) in the {budget:g} s budget", flush=True)

    eval_every = getattr(cfg, "eval_every", 1)  # 0: evaluate after the last epoch only
    fail_epoch = _injected_failure(cfg.name)
    for epoch in itertools.count(start_epoch):
        epochs = math.ceil(steps.total / setup.steps_per_epoch)  # known once the budget's plan is fixed
        if epoch >= epochs or plan.get("done"):
            break
        g = torch.Generator(device=device).manual_seed(cfg.seed * 7919 + epoch * 104729 + rank)
        step0 = epoch * setup.steps_per_epoch
        t0 = time.perf_counter()
        log = _progress_logger(epoch, epochs, setup.steps_per_epoch, world, t0) if rank == 0 else None
        if fail_epoch == epoch and rank == world - 1:
            log = _fail_after_first_batch(log)
        steps.start_clock()
        train = train_one_epoch(ddp_model, setup.optimizer, setup.loss_fn, setup.train_batches(epoch), setup.prepare,
                                g, device, step0, lr_at, scaler, amp_dtype, log, stop=steps.done, after_step=after_step,
                                step_loss=setup.step_loss)
        steps.stop_clock()
        train_time = time.perf_counter() - t0
        epochs = math.ceil(steps.total / setup.steps_per_epoch)
        last = epoch == epochs - 1 or steps.expired
        if last and setup.averager is not None:
            setup.averager.finish(model)
        steps_done = step0 + train.pop("steps")
        zeros = dict.fromkeys(setup.metric_names, 0.0)  # every rank must reduce the same keys
        train = all_reduce_sums({**zeros, **train}, device)
        classification = setup.step_loss is None
        test = None  # not evaluated this epoch
        if last or (eval_every and (epoch + 1) % eval_every == 0):
            test = all_reduce_sums({**zeros, **evaluate(model, setup.loss_fn, setup.test_batches(), setup.prepare,
                                                        device, amp_dtype, setup.predict, setup.step_loss)}, device)
        metrics = {
            "epoch": epoch + 1,
            **epoch_means("train", train, classification),
            **epoch_means("test", test, classification, setup.metric_names),
            "examples_per_sec": train["count"] / train_time,
            "epoch_time_s": time.perf_counter() - t0,
            "lr": setup.optimizer.param_groups[0]["lr"],
            "steps": steps_done,
            "train_time_s": steps.elapsed,
        }
        history.append(metrics)
        plan = {**steps.state(), "done": last}
        if rank == 0:
            tested = "  ".join(f"{k.replace('_', ' ')} {v:.4g}" for k, v in metrics.items()
                               if k.startswith(("train_", "test_")) and k != "train_time_s" and v is not None)
            print(f"epoch {epoch + 1}/{epochs}  {tested}  {metrics['examples_per_sec']:.1f} examples/s  "
                  f"({steps.elapsed:.0f} s of training)", flush=True)
        if rank == 0 and setup.after_epoch is not None:
            setup.after_epoch(model, epoch)
        _report(session, metrics, model, setup, cfg, epoch, history, rank, plan)
        if last:
            break
    return history


class StepPlan:
    """How many steps a run takes, the training time spent, and a stop decision all ranks share.

    Without a time budget: epochs x steps per epoch. With one, the run's first `calibration`
    steps are timed (the mean of steps 3..n; the first ones pay one-off set-up), the slowest
    rank's time wins (all-reduce MAX), and the total is fixed to the steps that fit in what is
    left of the budget, so that a schedule of progress = step / total spans the budget; until
    then the provisional total (epochs x steps per epoch) drives the schedule. Only training
    steps count (not evaluation or checkpoints). As a safety net, about once a second the ranks
    all-reduce their elapsed time and stop together once it passes the budget: a rank that
    stopped alone would leave the others waiting in DDP forever.
    """

    def __init__(self, budget: float | None, plan: dict[str, Any], device, calibration: int = 7):
        self.budget, self.device, self.calibration = budget, device, calibration
        self.total, self.fixed = int(plan["total_steps"]), bool(plan.get("fixed", budget is None))
        self.elapsed = float(plan.get("train_time_s", 0.0))
        self.step_time = float(plan.get("step_time_s", 0.0))
        self.check_every = max(1, round(1.0 / self.step_time)) if self.step_time else 1
        self.expired = self.planned_now = False
        self._stamps: list[float] = []
        self._t0 = 0.0

    def start_clock(self) -> None:
        self._t0 = time.perf_counter()

    def stop_clock(self) -> None:
        """End of an epoch's training: every rank takes the slowest rank's time, the one that
        decides the deadline, so the run's reported training time is the same on all ranks."""
        self.elapsed = self._max_over_ranks(self.elapsed + time.perf_counter() - self._t0)

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # host time must include the queued GPU work
        return self.elapsed + time.perf_counter() - self._t0

    def _max_over_ranks(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def observe(self, step: int) -> None:
        """After optimizer step `step`: time the calibration steps, then fix the total."""
        self.planned_now = False
        if self.fixed:
            return
        self._stamps.append(self._now())
        if len(self._stamps) < self.calibration:
            return
        self.step_time = self._max_over_ranks((self._stamps[-1] - self._stamps[1]) / (len(self._stamps) - 2))
        left = self.budget - self._max_over_ranks(self._stamps[-1])
        # 1% margin for epoch boundaries and noise; the deadline check stops a run that falls behind
        self.total = step + 1 + max(0, int(left * 0.99 / self.step_time))
        self.check_every = max(1, round(1.0 / self.step_time))
        self.fixed = self.planned_now = True

    def done(self, step: int) -> bool:
        """Before step `step`: stop here? The same answer on every rank."""
        if step >= self.total:
            return True
        if self.budget is None or step % self.check_every:
            return False
        self.expired = self._max_over_ranks(self._now()) >= self.budget
        return self.expired

    def state(self) -> dict[str, Any]:
        """Stored in checkpoints: a resumed run keeps the schedule's length and the time spent."""
        return {"total_steps": self.total, "fixed": self.fixed, "train_time_s": self.elapsed,
                "step_time_s": self.step_time, "expired": self.expired}


def _report(session, metrics, model, setup, cfg, epoch, history, rank, plan) -> None:
    """Every rank reports (a barrier); rank 0 attaches the checkpoint: weights, optimizer, epoch, config,
    the step plan and the averager's state. `session` is `ray.train` (or `ray.tune` in a sweep trial)."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            averager = setup.averager.state_dict() if setup.averager is not None else None
            torch.save({"model": model.state_dict(), "optimizer": setup.optimizer.state_dict(), "epoch": epoch,
                        "config": dataclasses.asdict(cfg), "history": history, "meta": setup.meta,
                        "plan": plan, "averager": averager},
                       Path(tmp) / CHECKPOINT_FILE)
            checkpoint = session.Checkpoint.from_directory(tmp)
        session.report(metrics, checkpoint=checkpoint)


def _progress_logger(epoch, epochs, steps, world, t0):
    """Print a progress line about every 10% of an epoch when an epoch has many steps."""
    every = max(1, steps // 10)
    if steps < 20:
        return None

    def log(i, loss_sum, count):
        if i % every == 0 and i < steps:
            rate = count * world / (time.perf_counter() - t0)
            print(f"  epoch {epoch + 1}/{epochs} [{i}/{steps}] loss {float(loss_sum) / count:.3f}  {rate:.0f} examples/s", flush=True)

    return log


def _injected_failure(name: str) -> int | None:
    """Fault injection for tests: RAYCV_FAIL_ONCE="<run name>:<epoch>:<marker file>" kills the last
    rank once, after its first batch of that epoch (the marker file records that it happened).
    The run name may be a glob (`*_00001`: a sweep's second trial, whatever the sweep's id)."""
    spec = os.environ.get("RAYCV_FAIL_ONCE", "")
    parts = spec.split(":", 2)
    if len(parts) == 3 and fnmatch.fnmatchcase(name, parts[0]) and not os.path.exists(parts[2]):
        return int(parts[1])
    return None


def _fail_after_first_batch(log):
    marker = os.environ["RAYCV_FAIL_ONCE"].split(":", 2)[2]

    def die(i, loss_sum, count):
        Path(marker).touch()
        print("injected failure: this worker exits now", flush=True)
        os._exit(1)

    return die


# ----------------------------------------------------------------------------- on the driver

def is_uri(path: str) -> bool:
    """Remote storage (s3://bucket/dir, gs://..., file:///abs/dir) as opposed to a local path."""
    return "://" in str(path)


def run_dir(cfg) -> Path | str:
    """<storage_path>/<name>: a local Path, or a URI string when storage_path is a URI."""
    if is_uri(cfg.storage_path):
        return f"{cfg.storage_path.rstrip('/')}/{cfg.name}"
    return Path(cfg.storage_path).expanduser().resolve() / cfg.name


def check_storage(cfg) -> Path | str:
    """Create the run directory or fail with one line (unwritable storage path, unknown URI scheme,
    missing cloud credentials)."""
    path = run_dir(cfg)
    if is_uri(path):
        import pyarrow
        import pyarrow.fs

        try:
            fs, fs_path = pyarrow.fs.FileSystem.from_uri(path)
            fs.create_dir(fs_path, recursive=True)
            with fs.open_output_stream(f"{fs_path}/.write-test-{os.getpid()}") as f:
                f.write(b"ok")
            fs.delete_file(f"{fs_path}/.write-test-{os.getpid()}")
        except (OSError, ValueError, pyarrow.ArrowException) as e:
            raise UserError(f"storage path {cfg.storage_path} is not writable: {str(e).splitlines()[0]}") from None
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"storage path {cfg.storage_path} is not writable: {e.strerror or e}") from None
    return path


def request_and_wait(bundles: list[dict[str, float]], wait_s: float | None = None) -> None:
    """On an autoscaling cluster, make room for `bundles` (e.g. one {"CPU": 1, "GPU": 1} per worker).

    When the cluster's total resources do not cover the bundles' sum and wait_s > 0 (default: env
    RAYCV_RESOURCE_WAIT_S, else 0; cluster.yaml sets it on the head, so jobs inherit it), ask the
    autoscaler for them (`request_resources`: it launches nodes now, before any placement group
    exists) and poll until they are there or wait_s has passed. Otherwise a no-op: the caller's
    own check then fails with its message.
    """
    import ray

    if wait_s is None:
        wait_s = float(os.environ.get("RAYCV_RESOURCE_WAIT_S", "0") or 0)
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
    if wait_s is None:
        wait_s = float(os.environ.get("RAYCV_RESOURCE_WAIT_S", "0") or 0)
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


# config fields that may name local files or directories (datasets, data roots, weights, images)
PATH_FIELDS = ("data", "data_root", "weights", "style", "content")


def absolute_paths(cfg):
    """Relative local paths in `cfg` made absolute against the driver's working directory.

    Ray Train workers do not run in the driver's directory, so `--data ./set.zip` must reach
    them as an absolute path (on a multi-node cluster it must also exist on every node: shared
    storage). Names that are not existing paths ("cifar10", "imagenet", ...) and URIs are kept.
    """
    changes = {}
    for name in PATH_FIELDS:
        value = getattr(cfg, name, None)
        if not isinstance(value, str) or not value or is_uri(value) or os.path.isabs(value):
            continue
        if name == "data_root" or os.path.exists(value):
            changes[name] = os.path.abspath(os.path.expanduser(value))
    return dataclasses.replace(cfg, **changes) if changes else cfg


def run_job_cli(job: str, config_cls, args, validate) -> tuple[dict[str, Any], Any]:
    """A job entrypoint's driver flow: config from --config and flags, validation, storage check,
    the config printed, Ray started (embedded or --address), then `fit`. Returns (summary, run dir)."""
    from jobs.cli import config_from_args, init_ray

    try:
        cfg = config_from_args(config_cls, args, args.config)
    except TypeError as e:
        raise UserError(f"bad config: {e}") from None
    validate(cfg)
    check_storage(cfg)
    print("config:", dataclasses.asdict(cfg), flush=True)
    init_ray(args.address)
    return fit(job, cfg), run_dir(cfg)


def fit(job: str, cfg, max_failures: int = 3, callbacks: Iterable[Any] = ()) -> dict[str, Any]:
    """Run job module `job` with config `cfg` on Ray Train; write and return `result.json`'s content.

    Re-running with the same storage_path and name resumes from the latest checkpoint.
    `callbacks` go to Ray Train's RunConfig (a Tune sweep passes `TuneReportCallback()` so that
    every epoch's report reaches its scheduler).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    out = check_storage(cfg)
    check_resources(cfg.num_workers, cfg.cpus_per_worker, cfg.use_gpu)
    cfg = absolute_paths(cfg)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"job": job, "config": dataclasses.asdict(cfg)},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker={"CPU": cfg.cpus_per_worker},
                                               # PACK fills a node before the next; SPREAD one worker per node
                                               placement_strategy=getattr(cfg, "placement_strategy", "PACK")),
        run_config=ray.train.RunConfig(
            # a URI goes to Ray Train as is: every worker writes its checkpoints there directly
            name=cfg.name, storage_path=cfg.storage_path if is_uri(out) else str(out.parent),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint: {result.error}")
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    history = state["history"]
    summary = {**history[-1], "epochs": len(history), "config": dataclasses.asdict(cfg), "history": history,
               "plan": state.get("plan"), "checkpoint": result.checkpoint.path, "meta": state["meta"]}
    if is_uri(out):  # written locally, then uploaded next to the checkpoints
        import pyarrow.fs

        with tempfile.TemporaryDirectory() as staging:
            write_run_outputs(Path(staging), summary, state)
            pyarrow.fs.copy_files(staging, out)
    else:
        write_run_outputs(out, summary, state)
    return summary


def write_run_outputs(out: Path, summary: dict[str, Any], state: dict[str, Any]) -> None:
    """result.json, curves.png and, for classification jobs, the servable artifact in <run>/model/."""
    write_outputs(out, summary)
    meta = state["meta"]
    if "arch" in meta and "preset" in meta:
        from jobs.artifact import save_artifact
        from jobs.presets import Preset

        metrics = {k: v for k, v in summary["history"][-1].items() if isinstance(v, (int, float))}
        save_artifact(out / "model", state["model"], meta["arch"], meta["classes"], Preset.from_dict(meta["preset"]), metrics)


def write_outputs(out: Path, summary: dict[str, Any]) -> None:
    """result.json (final metrics, config, per-epoch history) and curves.png."""
    (out / "result.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    plot_curves(summary["history"], out / "curves.png")


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Train loss and train/test accuracy per epoch, as the reference plots them (train/test loss without accuracy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    if "train_acc" in history[0]:
        ax.plot(epochs, [h["train_acc"] for h in history], "--", label="train acc")
        tested = [h for h in history if h.get("test_acc") is not None]  # --eval-every may skip epochs
        ax.plot([h["epoch"] for h in tested], [h["test_acc"] for h in tested], "-.", marker=".", label="test acc")
    else:
        tested = [h for h in history if h.get("test_loss") is not None]
        ax.plot([h["epoch"] for h in tested], [h["test_loss"] for h in tested], "-.", marker=".", label="test loss")
    ax.set_xlabel("epoch")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
