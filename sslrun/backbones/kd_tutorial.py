"""The two networks of the PyTorch knowledge-distillation tutorial (CIFAR-10), as sslrun backbones: the conv trunks
with their flattened output as features. With ``method=supervised method.hidden_dim=512|256 method.dropout=0.1``
the whole network is the tutorial's ``DeepNN`` (1,186,986 parameters) or ``LightNN`` (267,738).

Both expose ``feature_map(x)`` (the last conv map, [B, map_channels, 8, 8] at 32 px) and ``from_feature_map``, which the
distillation hint loss (FitNets) reads; ``forward(x) == from_feature_map(feature_map(x))``.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True)]


class _Trunk(nn.Module):
    first_layer = "features.0"
    last_layer = "features"

    def __init__(self, layers: list[nn.Module], channels: int, image_size: int) -> None:
        super().__init__()
        self.features = nn.Sequential(*layers)
        self.feat_dim = channels * (image_size // 4) ** 2
        self.map_channels = channels  # of feature_map(x)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    @staticmethod
    def from_feature_map(fm: torch.Tensor) -> torch.Tensor:
        return torch.flatten(fm, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_feature_map(self.feature_map(x))


class DeepNN(_Trunk):
    """The tutorial's teacher trunk: conv3x3 128, 64, pool, 64, 32, pool (ReLU after each conv, padding 1):
    [B, in_channels, S, S] -> [B, 32 (S/4)^2] (2048 at S = 32)."""

    def __init__(self, in_channels: int, image_size: int) -> None:
        super().__init__([*_conv(in_channels, 128), *_conv(128, 64), nn.MaxPool2d(2, 2),
                          *_conv(64, 64), *_conv(64, 32), nn.MaxPool2d(2, 2)], 32, image_size)


class LightNN(_Trunk):
    """The tutorial's student trunk: conv3x3 16, pool, 16, pool: [B, in_channels, S, S] -> [B, 16 (S/4)^2]
    (1024 at S = 32)."""

    def __init__(self, in_channels: int, image_size: int) -> None:
        super().__init__([*_conv(in_channels, 16), nn.MaxPool2d(2, 2), *_conv(16, 16), nn.MaxPool2d(2, 2)],
                         16, image_size)
