"""A small CNN for 28-px grayscale images: fast enough to pretrain on two CPU cores."""

from __future__ import annotations

import torch
from torch import nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Three conv layers (the last two after a 2x2 max-pool) and a fully-connected layer.

    The last feature map is average-pooled to ``pool_size`` x ``pool_size`` rather than to one value per
    channel: where on the image a part sits (a collar, a sleeve) is much of what tells classes apart.
    """

    first_layer = "conv1"
    last_layer = "fc"

    def __init__(self, in_channels: int = 1, width: int = 32, feat_dim: int = 256, pool_size: int = 3) -> None:
        super().__init__()
        self.conv1 = _block(in_channels, width)
        self.conv2 = nn.Sequential(nn.MaxPool2d(2), _block(width, 2 * width))
        self.conv3 = nn.Sequential(nn.MaxPool2d(2), _block(2 * width, 4 * width))
        self.pool = nn.AdaptiveAvgPool2d(pool_size)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(4 * width * pool_size**2, feat_dim), nn.BatchNorm1d(feat_dim),
                                nn.ReLU(inplace=True))
        self.feat_dim = feat_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.conv3(self.conv2(self.conv1(x)))))
