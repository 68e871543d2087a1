"""Preprocessing presets shared by training and serving, so the two cannot drift apart.

A preset is stored (as a dict) in every checkpoint and servable artifact; the Serve classifier
rebuilds it with `Preset.from_dict` and applies `eval_transform` to each request's image.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from jobs.images import IMAGENET_MEAN, IMAGENET_STD


def scaled_resize(crop: int, ratio: float) -> int:
    """The resize size for `crop` at about `ratio` (256/224 in the reference), rounded so that
    resize - crop is a multiple of 4: then centre-cropping a cached resize x resize square (see
    `eval_batch`) lands on exactly the pixels of one CenterCrop, whose offset torchvision rounds
    half to even. 224 -> 256 as the reference; 32 -> 36; 64 -> 72."""
    return crop + 4 * round(crop * (ratio - 1) / 4)


@dataclass(frozen=True)
class Preset:
    """Eval: Resize(shorter side -> resize) + CenterCrop(crop) + ToTensor [+ Normalize(mean, std)].

    Train (batched on the device, `train_batch`): RandomResizedCrop(crop) + RandomHorizontalFlip +
    ToTensor [+ Normalize]. mean/std None means no normalisation (the CIFAR recipe feeds [0, 1] pixels).
    """

    resize: int
    crop: int
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    @classmethod
    def imagenet(cls, crop: int = 224, resize: int | None = None) -> "Preset":
        """The reference fine-tuning preset: 256 -> 224 with ImageNet statistics (scaled for other crops)."""
        return cls(resize or scaled_resize(crop, 256 / 224), crop, IMAGENET_MEAN, IMAGENET_STD)

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

    # batched, on-device equivalents for training: the decode cache holds images already resized
    # so that both sides are `resize` (Resize + CenterCrop(resize)); these do the rest per batch.

    def eval_batch(self, x: torch.Tensor) -> torch.Tensor:
        """The tail of eval_transform for a cached batch: CenterCrop(crop) + ToDtype + Normalize.

        x: (B, 3, resize, resize) uint8 -> (B, 3, crop, crop) float. When resize - crop is a
        multiple of 4 (every preset built by `imagenet`/`plain`) centre-cropping the cached square
        gives exactly eval_transform's pixels, so training's test accuracy is measured on what the
        server will see; otherwise an offset may differ by one pixel.
        """
        from torchvision.transforms.v2 import functional as TF

        return self.normalize(TF.center_crop(x, [self.crop]).float().div_(255))

    def train_batch(self, x: torch.Tensor, g: torch.Generator, scale: tuple[float, float] = (0.08, 1.0),
                    ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
        """The reference's training transform, batched on the device: RandomResizedCrop(crop, scale, ratio)
        + horizontal flip + ToDtype + Normalize, one random draw per image from generator `g`.

        x: (B, 3, H, W) uint8 -> (B, 3, crop, crop) float. Defaults are torchvision's.
        """
        from jobs.transforms import horizontal_flip, random_resized_crop, random_resized_crop_uint8

        if x.device.type == "cpu" and x.dtype == torch.uint8:  # per-image uint8 resizes: far cheaper on a CPU
            x = random_resized_crop_uint8(x, g, (self.crop, self.crop), scale, ratio, flip_p=0.5).float()
            mean, std = (self.mean, self.std) if self.mean is not None else ((0.0,) * 3, (1.0,) * 3)
            # ToDtype + Normalize in place: (x / 255 - mean) / std = (x - 255 mean) * (1 / (255 std))
            return x.sub_(torch.tensor(mean).view(1, 3, 1, 1) * 255).mul_(1 / (torch.tensor(std).view(1, 3, 1, 1) * 255))
        x = random_resized_crop(x.float().div_(255), g, (self.crop, self.crop), scale, ratio)
        return self.normalize(horizontal_flip(x, g))
