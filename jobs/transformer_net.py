"""Johnson et al. (2016) feed-forward style network ("TransformerNet") and its servable artifact.

One trained network = one style: an image in [0, 1] goes in, the stylized image comes out in
one forward pass. Layout (as pytorch/examples fast_neural_style, Johnson's supplementary):

    conv 9x9/1 (32) -> conv 3x3/2 (64) -> conv 3x3/2 (128)      reflection padding, InstanceNorm, ReLU
    5 x residual block (128)                                    conv-IN-ReLU-conv-IN + skip
    upsample + conv 3x3 (64) -> upsample + conv 3x3 (32)        nearest upsampling, not transposed convs
    conv 9x9/1 (3)                                              no norm, no activation

Any H, W >= MIN_SIDE works: each upsampling goes back to the exact size of the matching encoder
map, so an odd input (e.g. 333 x 501) comes out at its own size, not rounded to a multiple of 4.
The artifact is `<dir>/weights.pt` + `<dir>/style_model.json` (+ `style.jpg`, a thumbnail).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from jobs import fastconv
from jobs.precision import autocast_dtype

MIN_SIDE = 5  # the 9x9 reflection pad needs > 4 pixels, the quarter-size maps >= 2
WEIGHTS = "weights.pt"
MANIFEST = "style_model.json"
STYLE_THUMBNAIL = "style.jpg"
ARCH = "transformer_net"


class ConvLayer(nn.Module):
    """Reflection padding then a convolution: no zero border for the style losses to paint."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1):
        super().__init__()
        self.pad = nn.ReflectionPad2d(kernel // 2)
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, c_in, H, W) -> (B, c_out, ceil(H / stride), ceil(W / stride))."""
        return self.conv(self.pad(x))


class ResidualBlock(nn.Module):
    """x + IN(conv(ReLU(IN(conv(x))))) at 128 channels (Johnson's residual block, no ReLU after the sum)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1, self.in1 = ConvLayer(channels, channels, 3), nn.InstanceNorm2d(channels, affine=True)
        self.conv2, self.in2 = ConvLayer(channels, channels, 3), nn.InstanceNorm2d(channels, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.in2(self.conv2(F.relu(self.in1(self.conv1(x)), True)))


class UpsampleConv(nn.Module):
    """Nearest upsampling to a given size, then a 3x3 conv (avoids the checkerboard of transposed convs)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = ConvLayer(c_in, c_out, 3)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, c_in, h, w) -> (B, c_out, *size)."""
        if tuple(size) == (2 * x.shape[-2], 2 * x.shape[-1]) and fastconv.runs(self.conv.conv, x):
            return fastconv.upsample2_conv3x3(x, self.conv.conv)  # the same map, without the 4x larger input
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class TransformerNet(nn.Module):
    """Image (B, 3, H, W) in [0, 1] -> stylized image (B, 3, H, W), unbounded (clamp to show it)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.in1 = ConvLayer(3, 32, 9), nn.InstanceNorm2d(32, affine=True)
        self.conv2, self.in2 = ConvLayer(32, 64, 3, stride=2), nn.InstanceNorm2d(64, affine=True)
        self.conv3, self.in3 = ConvLayer(64, 128, 3, stride=2), nn.InstanceNorm2d(128, affine=True)
        self.res = nn.Sequential(*[ResidualBlock(128) for _ in range(5)])
        self.up1, self.in4 = UpsampleConv(128, 64), nn.InstanceNorm2d(64, affine=True)
        self.up2, self.in5 = UpsampleConv(64, 32), nn.InstanceNorm2d(32, affine=True)
        self.conv_out = ConvLayer(32, 3, 9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if min(h, w) < MIN_SIDE:
            raise ValueError(f"image of {h}x{w} pixels is too small: both sides must be >= {MIN_SIDE}")
        y1 = F.relu(self.in1(self.conv1(x)), True)    # (B, 32, H, W)
        y2 = F.relu(self.in2(self.conv2(y1)), True)   # (B, 64, ceil(H/2), ceil(W/2))
        y3 = F.relu(self.in3(self.conv3(y2)), True)   # (B, 128, ceil(H/4), ceil(W/4))
        y = self.res(y3)
        y = F.relu(self.in4(self.up1(y, y2.shape[-2:])), True)  # back to (B, 64, ceil(H/2), ceil(W/2))
        y = F.relu(self.in5(self.up2(y, (h, w))), True)         # (B, 32, H, W)
        return self.conv_out(y)                           # (B, 3, H, W)


# ----------------------------------------------------------------------------- inference


@torch.inference_mode()
def stylize_image(model: TransformerNet, img, device: torch.device | str = "cpu",
                  precision: str = "fp32") -> "Image.Image":
    """PIL RGB image -> stylized PIL RGB image of the same size: ToTensor, one forward (under autocast
    where `precision` resolves to a lower dtype: jobs.precision, workload "stylize"), clamp to [0, 1]."""
    import torchvision.transforms.functional as TF

    device = torch.device(device)
    dtype = autocast_dtype(precision, device, "stylize")
    x = TF.to_tensor(img).unsqueeze(0).to(device)  # (1, 3, H, W) in [0, 1]
    if next(model.parameters()).device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        y = model(x)[0].float().clamp_(0, 1).cpu()
    return TF.to_pil_image(y)


# ----------------------------------------------------------------------------- the artifact


class StyleModelError(ValueError):
    """A directory that is not a loadable style model (missing files, bad manifest, mismatched weights)."""


def save_style_model(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], name: str,
                     info: dict[str, Any] | None = None, style_image=None) -> Path:
    """Write weights, a style thumbnail (PIL image, optional) and the manifest (last, atomically) into `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, path / WEIGHTS)
    if style_image is not None:
        thumb = style_image.convert("RGB").copy()
        thumb.thumbnail((256, 256))
        thumb.save(path / STYLE_THUMBNAIL, quality=90)
    manifest = {"arch": ARCH, "name": name, **(info or {}), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = path / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    os.replace(tmp, path / MANIFEST)
    return path


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a style model directory, or StyleModelError."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise StyleModelError(f"{path} is not a style model ({MANIFEST}: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("arch") != ARCH:
        raise StyleModelError(f"{path}: {MANIFEST} does not describe a {ARCH}")
    return manifest


def load_style_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[TransformerNet, dict]:
    """(model in eval mode on `device`, manifest); weights load with weights_only=True. On a CPU its
    convolutions run NNPACK's Winograd/FFT kernels for fp32 work (`jobs.fastconv`)."""
    manifest = read_manifest(path)
    model = TransformerNet()
    try:
        model.load_state_dict(torch.load(Path(path) / WEIGHTS, map_location="cpu", weights_only=True))
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise StyleModelError(f"{path}: cannot load weights: {str(e).splitlines()[0]}") from None
    if torch.device(device).type == "cpu":
        fastconv.winograd_convs(model)
    return model.to(device).eval(), manifest


def list_style_models(registry: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The registry directory's styles: {name: manifest} for every `<registry>/<name>/` holding a style model."""
    registry = Path(registry)
    out: dict[str, dict[str, Any]] = {}
    if not registry.is_dir():
        return out
    for d in sorted(registry.iterdir()):
        if d.is_dir() and (d / MANIFEST).is_file():
            try:
                out[d.name] = read_manifest(d)
            except StyleModelError:
                continue  # a half-written or foreign directory is not a style
    return out


def valid_style_name(name: str) -> bool:
    """Names are directory names in the registry: letters, digits, '-', '_', '.', not starting with '.'."""
    return bool(name) and len(name) <= 64 and not name.startswith(".") and all(
        c.isalnum() or c in "-_." for c in name)
