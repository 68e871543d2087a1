"""Models by name: the CIFAR ResNet-18 of the reference, torchvision's ImageNet ResNet-18, and the
small fast CIFAR network of the time-to-accuracy recipe (`fast_cifar_net`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def xavier_init_(model: nn.Module) -> nn.Module:
    """Xavier-uniform weights for every conv and linear layer (the reference's init), zero biases."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def cifar_resnet18(num_classes: int = 10) -> nn.Module:
    """ResNet-18 for 32x32 inputs: 3x3 stride-1 stem and no max-pool, so the last stage sees 4x4.

    Built from torchvision's ResNet so its parameter names match `resnet18` (fine-tuning can move
    weights between the two except the stem). (B, 3, 32, 32) -> (B, num_classes).
    """
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return xavier_init_(model)


def imagenet_resnet18(num_classes: int = 1000) -> nn.Module:
    """torchvision's ResNet-18 (7x7 stride-2 stem + max-pool) for 224x224 inputs, Xavier init."""
    import torchvision

    return xavier_init_(torchvision.models.resnet18(weights=None, num_classes=num_classes))


class ConvBlock(nn.Module):
    """conv3x3 -> max-pool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU: (B, c_in, H, W) -> (B, c_out, H/2, W/2).

    Pooling right after the first conv makes the BN, GELU and second conv run at a quarter of the
    pixels. BN scales are frozen at 1 (only the shifts learn), which leaves the scale to the convs.
    """

    def __init__(self, c_in: int, c_out: int, bn_momentum: float = 0.4):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(c_out, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(c_out, momentum=bn_momentum)
        for conv in (self.conv1, self.conv2):  # identity on the first c_in channels: a deep net starts shallow
            nn.init.dirac_(conv.weight[:min(conv.in_channels, conv.out_channels)])
        for norm in (self.norm1, self.norm2):
            norm.weight.requires_grad_(False)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(F.max_pool2d(self.conv1(x), 2)))
        return self.act(self.norm2(self.conv2(x)))


class FastCifarNet(nn.Module):
    """A small VGG-like net that trains to high CIFAR-10 accuracy in few epochs (after airbench).

    whiten (2x2 conv, 3 -> 24 channels, no padding) -> GELU -> 3 ConvBlocks (each halves H, W)
    -> global max-pool -> linear (no bias) scaled by `scale`. (B, 3, 32, 32) -> (B, num_classes).
    `whiten` is meant to be initialised from data with `init_whitening_` and then frozen
    (its bias may train for a few epochs).
    """

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (64, 256, 256),
                 scale: float = 1 / 9, whiten_kernel: int = 2):
        super().__init__()
        self.whiten = nn.Conv2d(3, 2 * 3 * whiten_kernel ** 2, whiten_kernel, bias=True)
        self.blocks = nn.Sequential(ConvBlock(self.whiten.out_channels, widths[0]),
                                    ConvBlock(widths[0], widths[1]), ConvBlock(widths[1], widths[2]))
        self.head = nn.Linear(widths[2], num_classes, bias=False)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.gelu(self.whiten(x)))  # (B, w3, 3, 3) for 32x32 inputs
        x = torch.amax(x, dim=(2, 3))  # (B, w3)
        return self.head(x) * self.scale


@torch.no_grad()
def init_whitening_(conv: nn.Conv2d, images: torch.Tensor, eps: float = 5e-4) -> nn.Conv2d:
    """Set `conv` (out = 2 * c*k*k channels, k x k kernel) to whiten the k x k patches of `images`.

    With Σ = E[p pᵀ] the (d, d) second moment of the flattened patches p (d = c*k*k) and
    Σ = V diag(λ) Vᵀ, the filters are the rows of diag(λ + eps)^-1/2 Vᵀ and their negatives
    (the GELU that follows then keeps both signs), so conv(x) has (near) identity covariance in
    its first d channels. images: (N, c, H, W) float, already normalised as the model's input.
    """
    c, k = conv.in_channels, conv.kernel_size[0]
    d = c * k * k
    if conv.out_channels != 2 * d:
        raise ValueError(f"a whitening conv needs {2 * d} output channels, has {conv.out_channels}")
    patches = images.float().unfold(2, k, 1).unfold(3, k, 1)  # (N, c, H', W', k, k)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, d)  # (N*H'*W', d), in the (c, k, k) weight order
    cov = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # ascending
    filters = (eigenvectors.T / torch.sqrt(eigenvalues.clamp(min=0) + eps)[:, None]).flip(0)  # (d, d), largest first
    conv.weight.copy_(torch.cat([filters, -filters]).view(2 * d, c, k, k).to(conv.weight))
    if conv.bias is not None:
        conv.bias.zero_()
    return conv


def fast_cifar_net(num_classes: int = 10) -> nn.Module:
    """The fast recipe's network at airbench93's widths (64, 128, 128); about 0.6 M parameters.

    Chosen for small compute budgets (a CPU run sees only a few epochs: BENCHMARKS.md), where more
    epochs of a narrower net beat fewer of a wider one."""
    return FastCifarNet(num_classes, widths=(64, 128, 128))


def fast_cifar_net_wide(num_classes: int = 10) -> nn.Module:
    """airbench94's widths (64, 256, 256); about 2 M parameters: for GPUs and longer budgets."""
    return FastCifarNet(num_classes, widths=(64, 256, 256))


def fast_cifar_net_small(num_classes: int = 10) -> nn.Module:
    """Half of fast_cifar_net's widths (32, 64, 64); about 0.15 M parameters and ~3x its training
    throughput on a CPU: for CPUs where the budget buys fast_cifar_net only one or two epochs."""
    return FastCifarNet(num_classes, widths=(32, 64, 64))


MODELS = {"cifar_resnet18": cifar_resnet18, "resnet18": imagenet_resnet18,
          "fast_cifar_net": fast_cifar_net, "fast_cifar_net_wide": fast_cifar_net_wide,
          "fast_cifar_net_small": fast_cifar_net_small}
HEADS = {"cifar_resnet18": "fc", "resnet18": "fc", "fast_cifar_net": "head", "fast_cifar_net_wide": "head",
         "fast_cifar_net_small": "head"}
"""Each architecture's classifier layer (the attribute fine-tuning replaces)."""


def build_model(arch: str, num_classes: int) -> nn.Module:
    """Instantiate architecture `arch` (a key of MODELS) with a `num_classes`-way head."""
    if arch not in MODELS:
        raise ValueError(f"unknown model {arch!r}; choose from {', '.join(MODELS)}")
    return MODELS[arch](num_classes)
