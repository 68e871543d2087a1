"""Preprocessing presets shared by training and serving, so the two cannot drift apart.

A preset is stored (as a dict) in every checkpoint and servable artifact; the Serve classifier
rebuilds it with `Preset.from_dict` and applies `eval_transform` to each request's image.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preset:
    """Eval: Resize(shorter side -> resize) + CenterCrop(crop) + ToTensor [+ Normalize(mean, std)].

    Train: RandomResizedCrop(crop) + RandomHorizontalFlip + ToTensor [+ Normalize].
    mean/std None means no normalisation (the CIFAR recipe feeds [0, 1] pixels).
    """

    resize: int
    crop: int
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    @classmethod
    def imagenet(cls, crop: int = 224, resize: int | None = None) -> "Preset":
        """The reference fine-tuning preset: 256 -> 224 with ImageNet statistics (scaled for other crops)."""
        return cls(resize or round(crop * 256 / 224), crop, IMAGENET_MEAN, IMAGENET_STD)

    @classmethod
    def plain(cls, size: int) -> "Preset":
        """Small images fed as [0, 1] pixels at their own size (CIFAR: ToTensor only)."""
        return cls(size, size, None, None)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preset":
        return cls(int(d["resize"]), int(d["crop"]),
                   tuple(d["mean"]) if d.get("mean") else None, tuple(d["std"]) if d.get("std") else None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(..., 3, H, W) in [0, 1] -> normalised with this preset's statistics (identity if none)."""
        if self.mean is None:
            return x
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(3, 1, 1)
        return (x - mean) / std

    def eval_transform(self):
        """PIL image -> (3, crop, crop) float tensor, the test-time transform."""
        from torchvision.transforms import v2

        steps = [v2.ToImage(), v2.Resize(self.resize, antialias=True), v2.CenterCrop(self.crop),
                 v2.ToDtype(torch.float32, scale=True)]
        if self.mean is not None:
            steps.append(v2.Normalize(self.mean, self.std))
        return v2.Compose(steps)

    def train_transform(self):
        """PIL image -> (3, crop, crop) float tensor with the reference's random crop and flip."""
        from torchvision.transforms import v2

        steps = [v2.ToImage(), v2.RandomResizedCrop(self.crop, antialias=True), v2.RandomHorizontalFlip(),
                 v2.ToDtype(torch.float32, scale=True)]
        if self.mean is not None:
            steps.append(v2.Normalize(self.mean, self.std))
        return v2.Compose(steps)
