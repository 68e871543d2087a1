"""Pieces of the fast CIFAR-10 recipe (`python -m jobs.augment --recipe fast`), after airbench.

Pure functions and one small class; `jobs.augment.build_setup` hands them to the loop (`jobs.loop`):
the schedule (`warmup_decay`), Nesterov SGD with a faster lr for the BatchNorm shifts
(`sgd_param_groups`), Muon for the convolution filters (`Muon`, `orthogonalize`), lookahead weight averaging (`Lookahead`) and test-time augmentation (`TTA`:
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


def orthogonalize(g: torch.Tensor, steps: int = 3, eps: float = 1e-7) -> torch.Tensor:
    """An approximate "U Vᵀ" of the (m, n) matrix g = U S Vᵀ: a few Newton-Schulz steps of the odd
    quintic x -> a x + b x³ + c x⁵ (Muon's coefficients: a steep slope at 0 rather than exact
    convergence) on g / ||g||. With 3 steps, singular values above ~1/40 of ||g|| (Frobenius) end
    within ~0.7-1.2; smaller ones grow ~40x, towards 1. Matrix products only (no SVD): cheap for
    the small filters here, and the same on every DDP rank."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / (g.norm() + eps)  # all singular values <= 1
    wide = x.size(0) <= x.size(1)
    x = x if wide else x.T  # iterate on the (small, small) Gram side
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.T


class Muon(torch.optim.Optimizer):
    """Nesterov-momentum SGD in which groups marked `muon=True` (convolution filters followed by a
    BatchNorm) take Muon steps: the momentum-smoothed gradient of each filter bank, as an
    (out, in * kh * kw) matrix, is orthogonalised (`orthogonalize`) before it is applied, so every
    direction of the bank moves at the same rate. A BatchNorm after the filter makes the loss blind
    to the filters' scale, so instead of weight decay each bank is kept at norm sqrt(out) (each
    filter at unit norm on average) and a step of `lr` turns it by a fixed angle. Other groups are
    plain SGD (`weight_decay` added to the gradient, as torch.optim.SGD does).

    One optimizer for both kinds, so the loop's schedule, checkpoints and DDP handling stay as for
    SGD: under DDP every rank sees the same averaged gradient and makes the same step.
    """

    def __init__(self, groups: list[dict], lr: float, momentum: float, muon_momentum: float = 0.6):
        super().__init__(groups, dict(lr=lr, momentum=momentum, weight_decay=0.0, muon=False))
        for group in self.param_groups:
            if group["muon"]:
                group.setdefault("muon_momentum", muon_momentum)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            momentum = group["muon_momentum"] if group["muon"] else group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad if not group["weight_decay"] else p.grad.add(p, alpha=group["weight_decay"])
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(momentum).add_(g)
                g = g.add(buf, alpha=momentum)  # Nesterov
                if group["muon"]:
                    p.mul_(p.size(0) ** 0.5 / p.norm().clamp(min=1e-12))
                    g = orthogonalize(g.reshape(len(g), -1)).view_as(p)
                p.add_(g, alpha=-group["lr"])


def muon_param_groups(model: nn.Module, lr: float, muon_lr: float, weight_decay: float,
                      bn_lr_scale: float) -> list[dict]:
    """`sgd_param_groups` for everything but the trainable convolution filters, which get their own
    group at `muon_lr` with `muon=True` and no weight decay (`Muon` keeps their norm). A whitening
    layer (`model.whiten`, trainable with --no-whiten) stays on SGD: no BatchNorm follows it, so its
    scale matters."""
    whiten = getattr(model, "whiten", None)
    filters = [m.weight for m in model.modules()
               if isinstance(m, nn.Conv2d) and m is not whiten and m.weight.requires_grad]
    ids = {id(p) for p in filters}
    groups = [dict(g, params=[p for p in g["params"] if id(p) not in ids])
              for g in sgd_param_groups(model, lr, weight_decay, bn_lr_scale)]
    return [g for g in groups if g["params"]] + [{"params": filters, "lr": muon_lr, "weight_decay": 0.0, "muon": True}]


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
