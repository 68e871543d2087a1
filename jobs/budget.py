"""How many steps a run takes: epochs x steps per epoch, or what fits in a time budget (`--time-budget`).

The plan lives in every checkpoint, so a resumed run keeps its schedule's length, its progress and
the training time it has already spent.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from jobs.config import option


@dataclass
class BudgetOptions:
    """The time-budget field of every training job (augment, finetune, fast_style)."""

    time_budget: float | None = option(None, "train for this many seconds instead of --epochs: the schedule is "
                                       "planned to fit (training steps only: evaluation, checkpoints and a streamed "
                                       "pass's wait for its first batch are extra)", above=0, default_text="none")


class StepPlan:
    """How many steps a run takes, the training time spent, and a stop decision all ranks share.

    Without a time budget: epochs x steps per epoch. With one, the run's first `calibration`
    steps are timed (the mean of steps 3..n; the first ones pay one-off set-up), the slowest
    rank's time wins (all-reduce MAX), and the total is set to the steps that fit in what is
    left of the budget; until then the provisional total (epochs x steps per epoch) drives the
    schedule. Only training steps count (not evaluation or checkpoints).

    Re-planning: the step time is not trusted once. At every sync point (each epoch's end, and
    the deadline check about once a second) the ranks all-reduce MAX their elapsed time, a
    time-weighted moving average of the step time (time constant `tau`: 5% of the budget) takes
    in the steps since the last sync point, and the total becomes the steps done + the steps that
    fit in the time left at that rate. A slow start or a noisy neighbour that goes away gives the
    run more steps; one that arrives takes steps away, so the run neither ends early nor overruns.
    Every rank sees the same steps and the same (reduced) times, so every rank plans the same total.
    As a safety net the same check stops all ranks together once the elapsed time passes the
    budget: a rank that stopped alone would leave the others waiting in DDP forever.

    The schedule's progress stays continuous and monotone when the total changes: `progress(step)`
    is not step / total but a piecewise-linear map anchored at the last re-plan (anchor_step,
    anchor_progress): the progress still to go, 1 - anchor_progress, is spread over the steps now
    planned after the anchor. A longer total slows the schedule down from here on and a shorter
    one speeds it up; progress never jumps, and never goes backwards. (Without re-plans the anchor
    stays at (0, 0) and progress is step / total, as before.)

    `announce` (a run name, on rank 0 only) prints the plan once it is set, and each epoch-end
    re-plan that changes it. `clock` (seconds; default time.perf_counter) lets tests fake time.
    """

    def __init__(self, budget: float | None, plan: dict[str, Any], device, steps_per_epoch: int,
                 announce: str | None = None, calibration: int = 7,
                 clock: Callable[[], float] = time.perf_counter):
        self.budget, self.device, self.calibration, self.clock = budget, device, calibration, clock
        self.steps_per_epoch, self.announce = steps_per_epoch, announce
        self.total, self.fixed = int(plan["total_steps"]), bool(plan.get("fixed", budget is None))
        self.finished = bool(plan.get("done", False))  # a budgeted run that already ended
        self.elapsed = float(plan.get("train_time_s", 0.0))
        self.step_time = float(plan.get("step_time_s", 0.0))
        # older checkpoints have no anchor: (0, 0) is progress = step / total, what they ran on
        self.anchor_step = int(plan.get("anchor_step", 0))
        self.anchor_progress = float(plan.get("anchor_progress", 0.0))
        self.replans = int(plan.get("replans", 0))
        self.tau = max(0.05 * budget, 1e-9) if budget else 0.0
        self.check_every = max(1, round(1.0 / self.step_time)) if self.step_time else 1
        self.expired = False
        self.step = 0  # optimizer steps done (set by observe)
        self._stamps: list[float] = []
        self._sync: tuple[int, float] | None = None  # (steps done, reduced elapsed) at the last sync point
        self._t0, self._cut = 0.0, False

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
        """Epochs the run takes (with a budget: as planned now; re-plans may change it)."""
        return math.ceil(self.total / self.steps_per_epoch)

    def progress(self, step: int) -> float:
        """The schedule's progress in [0, 1] at step `step` (see the class docstring)."""
        left = self.total - self.anchor_step
        if left <= 0:
            return 1.0
        return min(1.0, self.anchor_progress + (1.0 - self.anchor_progress) * (step - self.anchor_step) / left)

    def start_clock(self) -> None:
        self._t0, self._cut = self.clock(), False

    def stop_clock(self) -> None:
        """End of an epoch's training: every rank takes the slowest rank's time, the one that
        decides the deadline, so the run's reported training time is the same on all ranks. A
        budgeted epoch that ran to its end (not cut by the plan or the deadline) re-plans the total."""
        self.elapsed = self._max_over_ranks(self.elapsed + self.clock() - self._t0)
        if self.budget and self.fixed and not self._cut and 0 < self.step < self.total:
            before = self.total
            self._replan(self.step, self.elapsed)
            if self.announce and self.total != before:
                print(f"{self.announce}: re-planned at step {self.step}: {self.step_time * 1e3:.0f} ms per step -> "
                      f"{self.total} steps ({self.total / self.steps_per_epoch:.2f} epochs), "
                      f"{self.budget - self.elapsed:.0f} s of the budget left", flush=True)

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # host time must include the queued GPU work
        return self.elapsed + self.clock() - self._t0

    def _max_over_ranks(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def _set_total(self, step: int, total: int) -> None:
        """Change the total at `step` (steps done), re-anchoring progress there so it stays continuous."""
        if total == self.total:
            return
        self.anchor_progress, self.anchor_step = self.progress(step), step
        self.total = total
        self.replans += 1

    def _replan(self, step: int, now: float) -> None:
        """At a sync point (`step` steps done, `now` the reduced elapsed time, the same on every rank):
        fold the steps since the last sync point into the step time, then plan what fits in the rest."""
        if self._sync is not None:
            steps, dt = step - self._sync[0], now - self._sync[1]
            if steps > 0 and dt > 0:
                alpha = 1.0 - math.exp(-dt / self.tau)
                self.step_time += alpha * (dt / steps - self.step_time)
        self._sync = (step, now)
        if self.step_time <= 0:
            return
        self.check_every = max(1, round(1.0 / self.step_time))
        # aim at the budget itself (0.5% margin): the deadline check stops a run that falls behind
        self._set_total(step, step + max(0, int((self.budget - now) * 0.995 / self.step_time)))

    def observe(self, step: int) -> None:
        """After optimizer step `step`: time the calibration steps, then set the total."""
        self.step = step + 1
        if self.fixed:
            return
        self._stamps.append(self._now())
        if len(self._stamps) < self.calibration:
            return
        self.step_time = self._max_over_ranks((self._stamps[-1] - self._stamps[1]) / (len(self._stamps) - 2))
        now = self._max_over_ranks(self._stamps[-1])
        self.fixed = True
        self._replan(step + 1, now)
        if self.announce:
            print(f"{self.announce}: {self.step_time * 1e3:.0f} ms per step -> {self.total} steps "
                  f"({self.total / self.steps_per_epoch:.2f} epochs) in the {self.budget:g} s budget; "
                  f"re-planned as the run goes", flush=True)

    def done(self, step: int) -> bool:
        """Before step `step`: stop here? The same answer on every rank. About once a second a
        budgeted run syncs its time: past the budget it stops; otherwise it re-plans the total."""
        self._cut = self._done(step)
        return self._cut

    def _done(self, step: int) -> bool:
        if step >= self.total:
            return True
        if self.budget is None or step % self.check_every:
            return False
        now = self._max_over_ranks(self._now())
        self.expired = now >= self.budget
        if not self.expired and self.fixed:
            self._replan(step, now)
            return step >= self.total
        return self.expired

    def state(self, done: bool = False) -> dict[str, Any]:
        """Stored in checkpoints: a resumed run keeps the schedule's length, its progress and the time spent."""
        return {"total_steps": self.total, "fixed": self.fixed, "train_time_s": self.elapsed,
                "step_time_s": self.step_time, "expired": self.expired, "done": done,
                "anchor_step": self.anchor_step, "anchor_progress": self.anchor_progress, "replans": self.replans}
