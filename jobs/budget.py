"""How many steps a run takes: epochs x steps per epoch, or what fits in a time budget (`--time-budget`).

The plan lives in every checkpoint, so a resumed run keeps its schedule's length and the training
time it has already spent.
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.distributed as dist


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

    `announce` (a run name, on rank 0 only) prints the plan once it is fixed.
    """

    def __init__(self, budget: float | None, plan: dict[str, Any], device, steps_per_epoch: int,
                 announce: str | None = None, calibration: int = 7):
        self.budget, self.device, self.calibration = budget, device, calibration
        self.steps_per_epoch, self.announce = steps_per_epoch, announce
        self.total, self.fixed = int(plan["total_steps"]), bool(plan.get("fixed", budget is None))
        self.finished = bool(plan.get("done", False))  # a budgeted run that already ended
        self.elapsed = float(plan.get("train_time_s", 0.0))
        self.step_time = float(plan.get("step_time_s", 0.0))
        self.check_every = max(1, round(1.0 / self.step_time)) if self.step_time else 1
        self.expired = False
        self._stamps: list[float] = []
        self._t0 = 0.0

    @classmethod
    def start(cls, budget: float | None, saved: dict[str, Any] | None, epochs: int, steps_per_epoch: int,
              history: list[dict[str, Any]], device, announce: str | None = None) -> "StepPlan":
        """A budgeted run resumes its saved plan; any other run plans epochs x steps_per_epoch (so a
        re-run with more --epochs trains on), counting on from the training time in `history`."""
        if not budget or saved is None:
            saved = {"total_steps": max(epochs, 1) * steps_per_epoch, "fixed": not budget,
                     "train_time_s": history[-1].get("train_time_s", 0.0) if history else 0.0}
        return cls(budget or None, saved, device, steps_per_epoch, announce)

    @property
    def epochs(self) -> int:
        """Epochs the run takes (known for sure once a budget's plan is fixed)."""
        return math.ceil(self.total / self.steps_per_epoch)

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
        self.fixed = True
        if self.announce:
            print(f"{self.announce}: {self.step_time * 1e3:.0f} ms per step -> {self.total} steps "
                  f"({self.total / self.steps_per_epoch:.2f} epochs) in the {self.budget:g} s budget", flush=True)

    def done(self, step: int) -> bool:
        """Before step `step`: stop here? The same answer on every rank."""
        if step >= self.total:
            return True
        if self.budget is None or step % self.check_every:
            return False
        self.expired = self._max_over_ranks(self._now()) >= self.budget
        return self.expired

    def state(self, done: bool = False) -> dict[str, Any]:
        """Stored in checkpoints: a resumed run keeps the schedule's length and the time spent."""
        return {"total_steps": self.total, "fixed": self.fixed, "train_time_s": self.elapsed,
                "step_time_s": self.step_time, "expired": self.expired, "done": done}
