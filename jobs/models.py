"""Models by name: the CIFAR ResNet-18 of the reference and torchvision's ImageNet ResNet-18."""
from __future__ import annotations

import torch
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


MODELS = {"cifar_resnet18": cifar_resnet18, "resnet18": imagenet_resnet18}


def build_model(arch: str, num_classes: int) -> nn.Module:
    """Instantiate architecture `arch` (a key of MODELS) with a `num_classes`-way head."""
    if arch not in MODELS:
        raise ValueError(f"unknown model {arch!r}; choose from {', '.join(MODELS)}")
    return MODELS[arch](num_classes)
