"""torchvision ResNets with an optional CIFAR stem, returning pooled features."""

from __future__ import annotations

import torch
import torchvision
from torch import nn


class ResNet(nn.Module):
    """A torchvision ResNet without its classifier.

    The CIFAR stem (3x3 stride-1 conv1, no max-pool) keeps 32-px inputs from being shrunk to 8x8 before
    the first block; ``cifar_stem: auto`` picks it for images up to 64 px.
    """

    first_layer = "net.conv1"
    last_layer = "net.layer4"

    def __init__(self, arch: str = "resnet18", in_channels: int = 3, image_size: int = 32,
                 cifar_stem: bool | str = "auto", zero_init_residual: bool = True) -> None:
        super().__init__()
        if not hasattr(torchvision.models, arch):
            raise ValueError(f"unknown torchvision architecture {arch!r}")
        net = getattr(torchvision.models, arch)(weights=None, zero_init_residual=zero_init_residual)
        small = image_size <= 64 if cifar_stem == "auto" else bool(cifar_stem)
        if small:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        elif in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.feat_dim: int = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
