"""VGG-19 `features`, the perceptual network of every style loss: weights, and the feature extractor.

Used by per-image style transfer (`jobs.style`), feed-forward style training (`jobs.fast_style`)
and the style Serve pool. "imagenet" weights come through torchvision's weights enum and the torch
hub cache, so a pre-seeded `$TORCH_HOME/hub/checkpoints/vgg19-dcbb9e9d.pth` works offline.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import torch
import torchvision
from torch import nn

from jobs.cli import UserError

VGG19_NUM_LAYERS = 37  # len(torchvision.models.vgg19().features)


def check_layers(layers: Sequence[int], what: str = "feature") -> None:
    """Refuse layer indices outside VGG-19 `features` (0..36) or an empty list."""
    if not layers:
        raise UserError(f"{what} layers must not be empty")
    bad = [i for i in layers if not 0 <= i < VGG19_NUM_LAYERS]
    if bad:
        raise UserError(f"unknown {what} layer index {bad[0]}: VGG-19 features has layers 0..{VGG19_NUM_LAYERS - 1}")


RANDOM_WEIGHTS_WARNING = ("WARNING: --weights random: VGG-19 has RANDOM weights, so its losses measure no real "
                          "style: the result is NOT a real style transfer. Use it only for tests and offline demos.")


def load_vgg(weights: str = "imagenet", seed: int = 0) -> nn.Sequential:
    """VGG-19 `features` (37 layers) with weights from "imagenet", "random" or a state-dict path.

    "imagenet" goes through torchvision's `VGG19_Weights` and the torch hub cache, so a
    pre-seeded `$TORCH_HOME/hub/checkpoints/vgg19-dcbb9e9d.pth` works offline. Only the
    `features.*` entries are used (the 500 MB classifier is never built). A path may hold
    a full VGG-19 state dict or a `features` one (keys `N.weight`). "random" uses
    torchvision's VGG initialisation under `seed`, for tests and offline demos only.
    """
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["E"], batch_norm=False)
    if weights == "random":
        g = torch.Generator().manual_seed(seed)
        for m in features.modules():
            if isinstance(m, nn.Conv2d):  # as torchvision.models.VGG.__init__
                fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
                with torch.no_grad():
                    m.weight.normal_(0.0, math.sqrt(2.0 / fan_out), generator=g)
                    m.bias.zero_()
        return features
    if weights == "imagenet":
        w = torchvision.models.VGG19_Weights.IMAGENET1K_V1
        try:
            state = w.get_state_dict(progress=False, check_hash=True)
        except Exception as e:  # URLError, HTTPError, hash mismatch: all mean "not available"
            cache = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(w.url))
            raise UserError(
                f"cannot get ImageNet VGG-19 weights ({type(e).__name__}); put {os.path.basename(w.url)} "
                f"at {cache}, or pass --weights PATH (or random for an offline demo)") from None
    else:
        if not os.path.isfile(weights):
            raise UserError(f"weights must be imagenet, random or a state-dict file; {weights!r} is none of these")
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"cannot load weights {weights}: {type(e).__name__}") from None
    if not isinstance(state, dict):
        raise UserError(f"weights {weights} do not hold a state dict")
    if any(k.startswith("features.") for k in state):
        state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    try:
        features.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"weights {weights} do not fit VGG-19 features: {str(e).splitlines()[0]}") from None
    return features


class VGGFeatures(nn.Module):
    """Frozen VGG-19 `features` truncated after `last_layer`; returns the maps a run asks for.

    `forward(x, layers)` runs layers 0..max(layers). torchvision's ReLUs are in-place, so a
    conv map captured at i < max(layers) is turned into its ReLU by layer i+1 (relu1_1,
    relu2_1, ... as in Gatys et al.), while the map at max(layers) stays pre-ReLU. The
    reference code (a per-layer loop over the same modules) behaves the same. Hence every
    call of one run passes the SAME layer set (content + style), for targets too.
    """

    def __init__(self, features: nn.Sequential, last_layer: int):
        super().__init__()
        check_layers([last_layer])
        self.layers = nn.Sequential(*list(features)[: last_layer + 1])
        self.requires_grad_(False)  # the image is the only parameter: no weight gradients
        self.eval()

    def forward(self, x: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """x (B, 3, H, W) -> {i: feature map (B, C_i, H_i, W_i)} for each i in `layers`."""
        wanted, last = set(layers), max(layers)
        if last >= len(self.layers):
            raise UserError(f"layer {last} is past this extractor's last layer {len(self.layers) - 1}")
        out = {}
        for i, layer in enumerate(self.layers[: last + 1]):
            x = layer(x)
            if i in wanted:
                out[i] = x
        return out
