"""The training loop of every job, on each Ray Train worker (or inside a one-worker Tune trial).

A job module (`jobs.augment`, `jobs.finetune`, `jobs.fast_style`) provides `Config` and
`build_setup(cfg, device, rank, world) -> TrainSetup`; `train` runs it: epochs (or what fits in a
time budget, `jobs.budget`), sums reduced over ranks, a checkpoint every epoch, resume. It reports
to a `session` it is given, `ray.train` or `ray.tune` (both have get_checkpoint, report and
Checkpoint), so it does not know which of the two runs it.
"""
from __future__ import annotations

import dataclasses
import importlib
import itertools
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import torch
import torch.distributed as dist
from torch import nn

from jobs import fastconv, precision
from jobs.airbench import TTA, Lookahead
from jobs.budget import StepPlan
from jobs.transforms import resize_square

CHECKPOINT_FILE = "checkpoint.pt"
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


class Task(Protocol):
    """What a job trains for: the loss of a batch, in training and at evaluation, and its metrics."""

    metrics: tuple[str, ...]  # the names of the sums loss/evaluate return, reported as train_/test_<name> means

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(mean loss, {metric: SUM over the batch's examples}) for prepared inputs x and labels y."""

    def evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, final: bool = False,
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """As `loss`, for the test set (no grad; e.g. with test-time augmentation). `final`: the run's
        last evaluation, the one its result reports (a task may spend more on it)."""

    def after_epoch(self, model: nn.Module, epoch: int) -> None:
        """On rank 0 after each epoch's evaluation, with the unwrapped model: a per-epoch by-product."""


class Classification:
    """The default task: cross-entropy (with label smoothing) on the model's logits, reported as
    loss and accuracy. tta="flip" evaluates the mean logits of each image and its mirror image,
    "flip-translate" adds those of the image moved one pixel both ways (`jobs.airbench.TTA`);
    `final_tta` (default: `tta`) is the one of the run's last evaluation, whose accuracy is reported."""

    metrics = ("acc",)  # reported as train_acc / test_acc

    def __init__(self, label_smoothing: float = 0.0, tta: str = "none", final_tta: str | None = None):
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.tta, self.final_tta = TTA[tta], TTA[final_tta or tta]

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x (B, C, H, W), labels y (B,) -> (mean loss, {"acc": correct predictions, a SUM over the batch})."""
        logits = model(x)  # (B, classes)
        return self.criterion(logits, y), {"acc": (logits.argmax(1) == y).sum()}

    def evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, final: bool = False,
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """As `loss`, with the test-time augmentation (the final one for the last evaluation)."""
        logits = (self.final_tta if final else self.tta)(model, x)
        return self.criterion(logits.float(), y), {"acc": (logits.argmax(1) == y).sum()}

    def after_epoch(self, model: nn.Module, epoch: int) -> None:
        """Nothing to write per epoch (fast_style's task writes a preview sheet here)."""


def constant(progress: float) -> float:
    """The default lr schedule: the base lr throughout."""
    return 1.0


@dataclass
class TrainSetup:
    """What a job builds on each worker for the loop.

    `train_batches(epoch)` yields this rank's shard of the training set for that epoch (reshuffled
    per epoch) and `test_batches()` its shard of the test set, as raw (images, labels) on the device;
    `prepare(images, train, generator)` turns raw images into the model's input (augmented when
    train=True). `task` says what is learnt (`Task`; default `Classification()`). `schedule` maps
    progress in [0, 1] over the planned steps to the lr multiplier of every parameter group;
    `averager` (`Lookahead`) averages weights after every step. `meta` goes into every checkpoint.
    `stats()` (optional) returns counts since its last call, the same keys on every rank.
    `train_size(progress)` (optional) is the side length the prepared training batch is resized to
    (progressive resizing: low resolution early); None keeps it as prepared.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    train_batches: Callable[[int], Batches]
    test_batches: Callable[[], Batches]
    steps_per_epoch: int
    prepare: Callable[[torch.Tensor, bool, torch.Generator | None], torch.Tensor]
    task: Task = field(default_factory=Classification)
    schedule: Callable[[float], float] = constant
    averager: Lookahead | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    stats: Callable[[], dict[str, float]] | None = None  # per-epoch counts from the data (bad files), summed over ranks
    close: Callable[[], None] | None = None  # at the end of the run: release the data (stream mode's passes started ahead)
    train_size: Callable[[float], int | None] | None = None  # progressive resizing: training side length at progress p


class Amp:
    """Mixed precision on one device: autocast in `dtype` (None: plain fp32), loss scaling for fp16."""

    def __init__(self, dtype: torch.dtype | None, device: torch.device):
        self.dtype, self.device, self.name = dtype, device, precision.dtype_name(dtype)
        self.scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else nullcontext()

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Backward and optimizer step (through the loss scaler in fp16)."""
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()


# ----------------------------------------------------------------------------- the loop

def train_worker(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Ray Train's per-worker function. payload = {"job": module name, "config": asdict(cfg)}."""
    import ray.train
    import ray.train.torch

    job = importlib.import_module(payload["job"])
    ctx = ray.train.get_context()
    return train(job.Config(**payload["config"]), job, ray.train, ctx.get_world_rank(), ctx.get_world_size(),
                 ray.train.torch.get_device())


def train(cfg, job, session, rank: int, world: int, device: torch.device) -> list[dict[str, Any]]:
    """Train `job` (a module with `build_setup`) with `cfg` as rank `rank` of `world`: `cfg.epochs`
    epochs, or what fits in `cfg.time_budget` seconds. Every epoch's metrics and checkpoint go to
    `session`; a checkpoint found there is resumed. Returns the per-epoch history."""
    torch.set_num_threads(max(1, cfg.cpus_per_worker))
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts them)
    setup = job.build_setup(cfg, device, rank, world)
    model = setup.model.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.preserve_format)
    amp = Amp(precision.autocast_dtype(getattr(cfg, "precision", "auto"), device), device)  # resolved here, on the worker
    compile_mode = getattr(cfg, "compile", "none")
    precision.compile_model(model, compile_mode)  # in place, before DDP wraps it
    # what was chosen, where it runs: into every checkpoint's meta (so result.json's "meta") and printed
    cpu = precision.cpu_features()
    # "winograd" where build_setup converted layers and nothing compiles them (fastconv.runs)
    convolutions = fastconv.describe(model, device, amp.dtype) if compile_mode == "none" else "default"
    setup.meta.update({"cpu": cpu, "precision": amp.name, "compile": compile_mode, "convolutions": convolutions,
                       "device": str(device)})
    if rank == 0:
        print(f"{cfg.name}: {precision.describe_cpu(cpu)}; precision {amp.name} "
              f"(--precision {getattr(cfg, 'precision', 'auto')} on {device}); compile {compile_mode}; "
              f"convolutions {convolutions}", flush=True)
    history, saved_plan = restore(session, setup, device)
    if history and rank == 0:
        print(f"{cfg.name}: resuming from the checkpoint after epoch {len(history)}", flush=True)
    steps = StepPlan.start(getattr(cfg, "time_budget", None), saved_plan, cfg.epochs, setup.steps_per_epoch,
                           history, device, announce=cfg.name if rank == 0 else None)
    if world > 1:
        import ray.train.torch

        model = ray.train.torch.prepare_model(model, move_to_device=False)  # DDP
    eval_every = getattr(cfg, "eval_every", 1)  # 0: evaluate after the last epoch only

    for epoch in itertools.count(len(history)):
        if steps.finished or epoch >= steps.epochs:
            break
        t0 = time.perf_counter()
        g = torch.Generator(device=device).manual_seed(cfg.seed * 7919 + epoch * 104729 + rank)
        log = progress_logger(epoch, steps.epochs, setup.steps_per_epoch, world) if rank == 0 else None
        train_sums, steps_run = train_one_epoch(model, setup, epoch, steps, amp, g, log)
        train_time = time.perf_counter() - t0
        train_sums = all_reduce_sums(train_sums, device)
        last = epoch == steps.epochs - 1 or steps.expired
        if last and setup.averager is not None:
            setup.averager.finish(setup.model)  # the averaged weights are evaluated and saved
        test_sums = None  # not evaluated this epoch
        if last or (eval_every and (epoch + 1) % eval_every == 0):
            broadcast_buffers(setup.model)  # every rank evaluates the model rank 0 saves
            test_sums = all_reduce_sums(evaluate(setup, amp, final=last), device)
        metrics = {"epoch": epoch + 1, **epoch_means("train", train_sums, setup.task.metrics),
                   **epoch_means("test", test_sums, setup.task.metrics),
                   "examples_per_sec": train_sums["count"] / train_time, "epoch_time_s": time.perf_counter() - t0,
                   "lr": setup.optimizer.param_groups[0]["lr"], "steps": epoch * setup.steps_per_epoch + steps_run,
                   "train_time_s": steps.elapsed, "precision": amp.name,
                   "train_examples": train_sums["count"], "test_examples": test_sums["count"] if test_sums else None,
                   "worker_peak_rss_mb": peak_rss_mb(device),
                   **(all_reduce_sums(setup.stats(), device) if setup.stats else {})}
        history.append(metrics)
        if rank == 0:
            print_epoch(metrics, steps)
            setup.task.after_epoch(setup.model, epoch)
        report(session, rank, cfg, setup, history, steps.state(done=last))
        if last:
            break
    if setup.close is not None:
        setup.close()  # an error instead ends the worker, and its threads with it
    return history


def train_one_epoch(model: nn.Module, setup: TrainSetup, epoch: int, steps: StepPlan, amp: Amp,
                    generator: torch.Generator, log: Callable[[int, dict], None] | None = None,
                    ) -> tuple[dict[str, Any], int]:
    """One pass over this rank's shard of epoch `epoch`, ending early where `steps` says (a planned step
    count, a spent time budget: the same answer on every rank). `model` is the DDP-wrapped one.
    Returns ({"loss", task metrics: this rank's sums, "count"}, steps run)."""
    model.train()
    optimizer, task = setup.optimizer, setup.task
    base_lrs = [g.setdefault("initial_lr", g["lr"]) for g in optimizer.param_groups]
    sums, step = dict.fromkeys(("loss", *task.metrics, "count"), 0), epoch * setup.steps_per_epoch
    steps.start_clock()
    for i, (images, labels) in enumerate(setup.train_batches(epoch)):
        if i == 0:
            steps.start_clock()  # from the first batch: a streamed pass's start-up is not training time
        if steps.done(step):
            break
        for group, lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = lr * setup.schedule(steps.progress(step))
        x = setup.prepare(images, True, generator)
        if setup.train_size is not None:
            x = resize_square(x, setup.train_size(steps.progress(step)))
        with amp.autocast():
            loss, batch = task.loss(model, x, labels)
        amp.step(loss, optimizer)
        steps.observe(step)
        if setup.averager is not None:
            setup.averager.update(setup.model, step, steps.progress(step + 1))
        add_sums(sums, {"loss": loss.detach().float() * len(labels), **batch, "count": len(labels)})
        step += 1
        if log is not None:
            log(i + 1, sums)
    steps.stop_clock()
    return sums, step - epoch * setup.steps_per_epoch


@torch.no_grad()
def evaluate(setup: TrainSetup, amp: Amp, final: bool = False) -> dict[str, Any]:
    """Sums of the task's evaluation ("loss", metrics, "count") over this rank's test shard, with the
    unwrapped model (no DDP collectives). `final`: the run's last evaluation (`Task.evaluate`)."""
    setup.model.eval()
    sums = dict.fromkeys(("loss", *setup.task.metrics, "count"), 0)
    for images, labels in setup.test_batches():
        x = setup.prepare(images, False, None)
        with amp.autocast():
            loss, batch = setup.task.evaluate(setup.model, x, labels, final)
        add_sums(sums, {"loss": loss.float() * len(labels), **batch, "count": len(labels)})
    return sums


# ----------------------------------------------------------------------------- metrics across ranks

def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) to every rank (a no-op without a process group).

    DDP copies rank 0's buffers to the others at the start of each forward, and then each rank's
    forward updates its own from its own batch: after the last step the ranks' statistics differ.
    Each rank evaluates its share of the test set, and rank 0's model is the one checkpointed and
    served, so without this the reported test accuracy was partly another model's (seen as a test
    run's served accuracy 0.957 against a reported 0.870)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)


def add_sums(sums: dict[str, Any], batch: dict[str, Any]) -> None:
    """sums[k] += batch[k]: tensors detached, in fp32, on the device (no host sync per step)."""
    for k, v in batch.items():
        sums[k] = sums[k] + (v.detach().float() if isinstance(v, torch.Tensor) else v)


def all_reduce_sums(values: dict[str, Any], device) -> dict[str, float]:
    """Sum each value over all ranks (a no-op without a process group). Returns Python floats."""
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def peak_rss_mb(device) -> float:
    """The largest peak resident memory of any rank's process so far, in MB (Linux: ru_maxrss is KB)."""
    import resource

    t = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def epoch_means(split: str, sums: dict[str, float] | None, metrics: tuple[str, ...]) -> dict[str, float | None]:
    """Sums reduced over ranks -> per-example means {split_loss, split_<metric>...}; sums None (a split
    not evaluated this epoch): the same keys, valued None."""
    names = ("loss", *metrics)
    if sums is None:
        return {f"{split}_{k}": None for k in names}
    return {f"{split}_{k}": sums[k] / max(sums["count"], 1) for k in names}


# ----------------------------------------------------------------------------- checkpoints and reports

def restore(session, setup: TrainSetup, device) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Load the session's latest checkpoint (after a worker failure, or a re-run of the same name)
    into the model, optimizer and averager. Returns (history so far, the saved step plan)."""
    ckpt = session.get_checkpoint()
    if ckpt is None:
        return [], None
    with ckpt.as_directory() as d:
        state = torch.load(Path(d) / CHECKPOINT_FILE, map_location=device, weights_only=True)
    setup.model.load_state_dict(state["model"])
    setup.optimizer.load_state_dict(state["optimizer"])
    if setup.averager is not None and state.get("averager") is not None:
        setup.averager.load_state_dict(state["averager"])
    return list(state["history"]), state.get("plan")


def report(session, rank: int, cfg, setup: TrainSetup, history: list[dict[str, Any]], plan: dict[str, Any]) -> None:
    """Every rank reports the epoch's metrics (a barrier); rank 0 attaches the checkpoint: weights,
    optimizer, config, history, meta, the step plan and the averager's state."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            torch.save({"model": setup.model.state_dict(), "optimizer": setup.optimizer.state_dict(),
                        "epoch": len(history) - 1, "config": dataclasses.asdict(cfg), "history": history,
                        "meta": setup.meta, "plan": plan,
                        "averager": setup.averager.state_dict() if setup.averager is not None else None},
                       Path(tmp) / CHECKPOINT_FILE)
            checkpoint = session.Checkpoint.from_directory(tmp)
        session.report(history[-1], checkpoint=checkpoint)


def print_epoch(metrics: dict[str, Any], steps: StepPlan) -> None:
    """One line per epoch: the epoch's means, throughput and the training time so far."""
    means = "  ".join(f"{k.replace('_', ' ')} {v:.4g}" for k, v in metrics.items()
                      if k.startswith(("train_", "test_")) and k != "train_time_s" and v is not None)
    print(f"epoch {metrics['epoch']}/{steps.epochs}  {means}  {metrics['examples_per_sec']:.1f} examples/s  "
          f"({steps.elapsed:.0f} s of training)", flush=True)


def progress_logger(epoch: int, epochs: int, steps: int, world: int) -> Callable[[int, dict], None] | None:
    """Print a progress line about every 10% of an epoch when an epoch has many steps."""
    every, t0 = max(1, steps // 10), time.perf_counter()
    if steps < 20:
        return None

    def log(i: int, sums: dict[str, Any]) -> None:
        if i % every == 0 and i < steps:
            rate = sums["count"] * world / (time.perf_counter() - t0)
            print(f"  epoch {epoch + 1}/{epochs} [{i}/{steps}] loss {float(sums['loss']) / sums['count']:.3f}  "
                  f"{rate:.0f} examples/s", flush=True)

    return log
