"""Pieces of the fast CIFAR-10 recipe (`python -m jobs.augment --recipe fast`), after airbench.

Pure functions and one small class; `jobs.augment.build_setup` hands them to the loop (`jobs.loop`):
the schedule (`warmup_decay`), Nesterov SGD with a faster lr for the BatchNorm shifts
(`sgd_param_groups`), lookahead weight averaging (`Lookahead`) and test-time augmentation (`TTA`:
flips, flips + 1-pixel translations). The network and its whitening initialisation live in
`jobs.models`, the training flips and translations in `jobs.transforms`.
"""
from __future__ import annotations

import torch
from torch import nn

from jobs.transforms import memory_format_of


def warmup_decay(progress: float, warmup: float = 0.23, start: float = 0.2, end: float = 0.07) -> float:
    """lr multiplier at `progress` in [0, 1] of the run: linear start -> 1 over the first `warmup`
    fraction, then linear 1 -> end. A function of progress, so it spans whatever number of steps
    the loop plans (epochs, or what fits in a time budget: `jobs.budget`)."""
    if progress < warmup:
        return start + (1 - start) * progress / warmup
    frac = min((progress - warmup) / max(1 - warmup, 1e-8), 1.0)
    return 1 + (end - 1) * frac


def sgd_param_groups(model: nn.Module, lr: float, weight_decay: float, bn_lr_scale: float) -> list[dict]:
    """Two groups: BatchNorm parameters at lr * bn_lr_scale, everything else at lr.

    The BN group's weight decay is divided by the same factor, so that the decoupled decay per
    step (lr * weight_decay) is equal in both groups. Frozen parameters are left out.
    """
    bn = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
          for p in m.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    norm = [p for p in trainable if id(p) in bn]
    other = [p for p in trainable if id(p) not in bn]
    groups = [{"params": other, "lr": lr, "weight_decay": weight_decay}]
    if norm:
        groups.append({"params": norm, "lr": lr * bn_lr_scale, "weight_decay": weight_decay / bn_lr_scale})
    return groups


class Lookahead:
    """Lookahead weight averaging (airbench's variant): slow weights that trail the trained ones.

    Every `every` steps: slow <- slow + (1 - decay) * (fast - slow), then fast <- slow, with
    decay = base ** every * progress ** 3, so the averaging starts off (decay 0) and is strongest
    at the end of the run. `finish` copies the slow weights into the model for evaluation.
    Covers every float tensor of the state dict (BN running statistics included). Under DDP all
    ranks hold the same weights, so all ranks compute the same slow weights: no communication.
    """

    def __init__(self, every: int = 5, base: float = 0.95):
        self.every, self.base = every, base
        self.slow: dict[str, torch.Tensor] | None = None  # taken from the model at the first update

    def _slow_weights(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.slow is None:  # lazily, on the model's device: the loop moves the model after setup
            self.slow = {k: v.detach().clone() for k, v in state.items() if v.is_floating_point()}
        elif any(self.slow[k].device != state[k].device for k in self.slow):  # loaded from a checkpoint
            self.slow = {k: v.to(state[k].device) for k, v in self.slow.items()}
        return self.slow

    @torch.no_grad()
    def update(self, model: nn.Module, step: int, progress: float) -> None:
        """Call after optimizer step `step` (0-based) at `progress` in (0, 1] of the run."""
        if (step + 1) % self.every:
            return
        decay = self.base ** self.every * min(progress, 1.0) ** 3
        state = model.state_dict()
        for k, slow in self._slow_weights(state).items():
            slow.lerp_(state[k], 1 - decay)
            state[k].copy_(slow)

    @torch.no_grad()
    def finish(self, model: nn.Module) -> None:
        """Load the slow weights into the model (before the final evaluation)."""
        state = model.state_dict()
        for k, slow in self._slow_weights(state).items():
            state[k].copy_(slow)

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        return self.slow

    def load_state_dict(self, state: dict[str, torch.Tensor] | None) -> None:
        self.slow = dict(state) if state is not None else None


def flip_tta(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Test-time augmentation: the mean of the logits of x and of its mirror image.
    x: (B, C, H, W) -> (B, num_classes)."""
    return 0.5 * (model(x) + model(x.flip(-1)))


def flip_translate_tta(model: nn.Module, x: torch.Tensor, shift: int = 1) -> torch.Tensor:
    """Heavier test-time augmentation: half `flip_tta(x)`, half the mean of `flip_tta` on x moved
    `shift` pixels up-left and down-right (edges filled by reflection): 6 forwards per image.
    x: (B, C, H, W) -> (B, num_classes)."""
    H, W = x.shape[-2:]
    padded = torch.nn.functional.pad(x, (shift,) * 4, mode="reflect")
    moved = [padded[..., :H, :W], padded[..., 2 * shift:, 2 * shift:]]
    layout = memory_format_of(x)
    return 0.5 * flip_tta(model, x) + 0.25 * sum(flip_tta(model, m.contiguous(memory_format=layout)) for m in moved)


TTA = {"none": lambda model, x: model(x), "flip": flip_tta, "flip-translate": flip_translate_tta}
"""Test-time augmentations by name (`--tta`): model, x (B, C, H, W) -> logits (B, num_classes)."""
