"""Batched image augmentations on tensors, run on the training device (what `jobs.augment`, the
CIFAR-style training job, and the presets' `train_batch` apply to each batch).

Every function takes a float batch `x` of shape (B, C, H, W) with values in [0, 1] and a
`torch.Generator` on the same device, draws one random decision per sample, and returns a new
batch. Same generator state -> same output, so runs are reproducible under a seed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from jobs.cli import UserError

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    """(n,) samples from U(lo, hi) on the generator's device."""
    return torch.rand(n, generator=g, device=g.device) * (hi - lo) + lo


def _per_sample(mask: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, 1, 1, 1)


def horizontal_flip(x: torch.Tensor, g: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each image left-right with probability p. x: (B, C, H, W)."""
    flip = torch.rand(x.shape[0], generator=g, device=g.device) < p
    return torch.where(_per_sample(flip), x.flip(-1), x)


def vertical_flip(x: torch.Tensor, g: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each image top-bottom with probability p. x: (B, C, H, W)."""
    flip = torch.rand(x.shape[0], generator=g, device=g.device) < p
    return torch.where(_per_sample(flip), x.flip(-2), x)


def random_resized_crop_uint8(x: torch.Tensor, g: torch.Generator, size: tuple[int, int],
                              scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                              flip_p: float = 0.0) -> torch.Tensor:
    """`random_resized_crop`'s CPU form: integer boxes (as torchvision's), each resized on its own
    in uint8 with antialiasing (torch's vectorised uint8 path, channels_last), several times cheaper
    on a CPU than one float `grid_sample` over the batch; with flip_p > 0 each result is mirrored
    left-right with that probability (drawn after the boxes, as `horizontal_flip` would draw it). A
    box that does not fit is clamped to the image. x: (B, C, H, W) uint8 -> (B, C, *size) uint8."""
    B, C, H, W = x.shape
    area = _uniform(B, *scale, g) * H * W
    aspect = torch.exp(_uniform(B, math.log(ratio[0]), math.log(ratio[1]), g))
    w = torch.sqrt(area * aspect).round().clamp(1, W).long()
    h = torch.sqrt(area / aspect).round().clamp(1, H).long()
    x0 = (_uniform(B, 0, 1, g) * (W - w + 1)).long().clamp(max=W - 1)
    y0 = (_uniform(B, 0, 1, g) * (H - h + 1)).long().clamp(max=H - 1)
    flips = (torch.rand(B, generator=g, device=g.device) < flip_p).tolist() if flip_p else [False] * B
    out = torch.empty(B, C, *size, dtype=torch.uint8)
    for i, (top, left, bh, bw) in enumerate(zip(y0.tolist(), x0.tolist(), h.tolist(), w.tolist())):
        box = x[i:i + 1, :, top:top + bh, left:left + bw].contiguous(memory_format=torch.channels_last)
        r = F.interpolate(box, size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        out[i] = r.flip(-1) if flips[i] else r
    return out


def random_resized_crop(x: torch.Tensor, g: torch.Generator, size: tuple[int, int] | None = None,
                        scale: tuple[float, float] = (0.1, 1.0), ratio: tuple[float, float] = (0.5, 2.0),
                        flip_p: float = 0.0) -> torch.Tensor:
    """Crop a random box per image and resize it to `size` (default: the input size), bilinear.

    Box area ~ U(scale) * H * W and aspect w/h ~ logU(ratio), as torchvision's RandomResizedCrop;
    a box that does not fit is clamped to the image (torchvision retries 10 times, then falls back
    to a centre crop: clamping is the batched equivalent). All crops are one `grid_sample` call.
    With flip_p > 0 each crop is also mirrored left-right with that probability, for free: the
    sampling grid runs right to left (a negative x scale), no extra pass over the pixels.
    x: (B, C, H, W) -> (B, C, *size).
    """
    B, _, H, W = x.shape
    out_h, out_w = size or (H, W)
    area = _uniform(B, *scale, g)
    log_r = _uniform(B, math.log(ratio[0]), math.log(ratio[1]), g)
    aspect = torch.exp(log_r)
    # box size as a fraction of the image side: w*h = area*W*H, w/h = aspect (in pixels)
    bw = torch.sqrt(area * aspect * H / W).clamp(max=1.0)
    bh = torch.sqrt(area / aspect * W / H).clamp(max=1.0)
    # centre in normalised coordinates [-1, 1], keeping the box inside the image
    cx = (_uniform(B, 0, 1, g) * 2 - 1) * (1 - bw)
    cy = (_uniform(B, 0, 1, g) * 2 - 1) * (1 - bh)
    theta = torch.zeros(B, 2, 3, device=x.device, dtype=x.dtype)
    if flip_p:
        bw = torch.where(torch.rand(B, generator=g, device=g.device) < flip_p, -bw, bw)
    theta[:, 0, 0], theta[:, 0, 2] = bw, cx
    theta[:, 1, 1], theta[:, 1, 2] = bh, cy
    grid = F.affine_grid(theta, [B, x.shape[1], out_h, out_w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor laid out so, else contiguous: what a derived batch should keep."""
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        else torch.contiguous_format


def resize_square(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """Resize a float batch to size x size (bilinear, antialiased when shrinking), keeping its memory
    format; None or its own size returns x. x: (B, C, H, W) -> (B, C, size, size)."""
    if size is None or tuple(x.shape[-2:]) == (size, size):
        return x
    out = F.interpolate(x, size=(size, size), mode="bilinear", antialias=size < min(x.shape[-2:]), align_corners=False)
    return out.contiguous(memory_format=memory_format_of(x))


def random_translate(x: torch.Tensor, g: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Shift each image by (dy, dx) ~ U{-pad..pad}^2 pixels, filling the border by reflection.

    The batched form of RandomCrop(H, padding=pad, padding_mode="reflect"): pad once, then gather
    each image's window with one advanced-indexing call. x: (B, C, H, W) -> (B, C, H, W).
    """
    B, _, H, W = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")  # (B, C, H+2p, W+2p)
    shift = torch.randint(0, 2 * pad + 1, (2, B), generator=g, device=g.device).to(x.device)
    rows = (shift[0, :, None] + torch.arange(H, device=x.device))[:, :, None]  # (B, H, 1)
    cols = (shift[1, :, None] + torch.arange(W, device=x.device))[:, None, :]  # (B, 1, W)
    batch = torch.arange(B, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows, cols]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2)  # (B, C, H, W) view, laid out channels_last


def flip_bits(n: int, seed: int = 0) -> torch.Tensor:
    """(n,) bool: a fixed random bit per example of a dataset of n, for `alternating_flip`."""
    return torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed + 17)).bool()


def alternating_flip(x: torch.Tensor, bits: torch.Tensor, epoch: int) -> torch.Tensor:
    """Mirror example i left-right iff bits[i] XOR (epoch is odd).

    Each image is seen flipped and unflipped in alternate epochs instead of at random, which
    spreads the two views evenly over a short run (airbench). `bits` are the batch's entries of
    `flip_bits` (fixed per dataset index), so every rank and every epoch agree on them.
    x: (B, C, H, W) of any dtype, bits: (B,) bool.
    """
    flip = bits.to(x.device) ^ bool(epoch % 2)
    return torch.where(_per_sample(flip), x.flip(-1), x)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, (B, 3, H, W) -> (B, 1, H, W)."""
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by `shift` (B,) turns: RGB -> HSV, h += shift mod 1, HSV -> RGB."""
    r, gch, b = x[:, 0], x[:, 1], x[:, 2]
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, ((gch - b) / safe) % 6,
        torch.where(maxc == gch, (b - r) / safe + 2, (r - gch) / safe + 4)) / 6
    h = torch.where(delta > 0, h, torch.zeros_like(h))
    h = (h + shift.view(-1, 1, 1)) % 1.0
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    v = maxc
    # standard HSV -> RGB by the k-formula: f(n) = v - v*s*max(0, min(k, 4-k, 1)), k = (n + 6h) mod 6
    out = []
    for n in (5, 3, 1):
        k = (n + h * 6) % 6
        out.append(v - v * s * torch.clamp(torch.minimum(k, 4 - k), 0, 1))
    return torch.stack(out, dim=1)


def color_jitter(x: torch.Tensor, g: torch.Generator, brightness: float = 0.5, contrast: float = 0.5,
                 saturation: float = 0.5, hue: float = 0.5) -> torch.Tensor:
    """Per-image random brightness, contrast, saturation and hue, in that fixed order.

    Factors are drawn as torchvision's ColorJitter draws them: brightness, contrast, saturation
    ~ U(max(0, 1-v), 1+v), hue shift ~ U(-hue, hue) turns (hue <= 0.5). Output stays in [0, 1].
    x: (B, 3, H, W).
    """
    B = x.shape[0]
    if brightness:
        x = (x * _per_sample(_uniform(B, max(0, 1 - brightness), 1 + brightness, g))).clamp(0, 1)
    if contrast:
        c = _per_sample(_uniform(B, max(0, 1 - contrast), 1 + contrast, g))
        mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
        x = (c * x + (1 - c) * mean).clamp(0, 1)
    if saturation:
        s = _per_sample(_uniform(B, max(0, 1 - saturation), 1 + saturation, g))
        x = (s * x + (1 - s) * _grayscale(x)).clamp(0, 1)
    if hue:
        if not 0 <= hue <= 0.5:
            raise ValueError("hue must be in [0, 0.5]")
        x = _shift_hue(x, _uniform(B, -hue, hue, g)).clamp(0, 1)
    return x


@dataclass
class AugmentSpec:
    """Parameters of the named augmentations; defaults are the reference demo's."""

    flip_p: float = 0.5
    crop_scale: tuple[float, float] = (0.1, 1.0)
    crop_ratio: tuple[float, float] = (0.5, 2.0)
    crop_size: tuple[int, int] | None = None  # None: keep the input size (training); demo uses 200x200
    jitter: tuple[float, float, float, float] = (0.5, 0.5, 0.5, 0.5)  # brightness, contrast, saturation, hue
    translate_pad: int = 2


AUGMENTATIONS: dict[str, Callable[[AugmentSpec], Augment]] = {
    "flip": lambda s: lambda x, g: horizontal_flip(x, g, s.flip_p),
    "vflip": lambda s: lambda x, g: vertical_flip(x, g, s.flip_p),
    "crop": lambda s: lambda x, g: random_resized_crop(x, g, s.crop_size, s.crop_scale, s.crop_ratio),
    "translate": lambda s: lambda x, g: random_translate(x, g, s.translate_pad),
    "color": lambda s: lambda x, g: color_jitter(x, g, *s.jitter),
}


# augmentations that need each example's dataset index and the epoch: the data iterator applies
# them (`alternating_flip`), `compose` skips them
INDEXED_AUGMENTATIONS = ("altflip",)


def parse_aug_names(text: str) -> list[str]:
    """'flip,color,crop' -> ['flip', 'color', 'crop']; 'none' -> []. Unknown names are a UserError."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["none"]:
        return []
    known = [*AUGMENTATIONS, *INDEXED_AUGMENTATIONS]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise UserError(f"unknown augmentation {', '.join(unknown) or repr(text)}; choose from none, {', '.join(known)} (comma-separated)")
    return names


def compose(names: Sequence[str], spec: AugmentSpec | None = None) -> Augment:
    """One function applying the named augmentations in order (identity for an empty list).

    Names in INDEXED_AUGMENTATIONS are skipped: the data iterator applies them.
    A horizontal flip next to a crop is folded into the crop's sampling grid (one pass instead of
    two); the result has the same distribution, since flips commute with the other augmentations
    (crop boxes are placed symmetrically, colour jitter acts per pixel).
    """
    spec = spec or AugmentSpec()
    names = [n for n in names if n not in INDEXED_AUGMENTATIONS]
    if "crop" in names and "flip" in names:
        names.remove("flip")
        fns = [(lambda x, g: random_resized_crop(x, g, spec.crop_size, spec.crop_scale, spec.crop_ratio, spec.flip_p))
               if n == "crop" else AUGMENTATIONS[n](spec) for n in names]
    else:
        fns = [AUGMENTATIONS[n](spec) for n in names]

    def apply(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        for fn in fns:
            x = fn(x, g)
        return x

    return apply
