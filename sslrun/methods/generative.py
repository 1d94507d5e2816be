"""Pieces the generative baselines (``ae``, ``vae``, ``gan``) share: pixels in [-1, 1], a DCGAN-style
decoder/generator, and the samples they keep for their figures.

The views a method sees are normalised with the dataset's mean and std; generative models work on pixels in
[-1, 1] (the tutorials' ``(x/255 - 0.5)/0.5``) so that a Tanh output can reach every value.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SslrunError
from .base import FitInfo


class PixelRange(nn.Module):
    """Converts normalised views to pixels in [-1, 1] and back to [0, 1] for display."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(1, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.ones(1, 1, 1, 1), persistent=False)

    def fit(self, info: FitInfo) -> None:
        if info.mean is None or info.std is None:
            raise SslrunError("A generative method needs the views' mean and std in FitInfo; the engine passes them.")
        self.mean = torch.tensor(info.mean, device=self.mean.device).view(1, -1, 1, 1)
        self.std = torch.tensor(info.std, device=self.std.device).view(1, -1, 1, 1)

    def to_signed(self, view: torch.Tensor) -> torch.Tensor:
        """Normalised view [B,C,H,W] -> pixels in [-1, 1]."""
        return (view.float() * self.std + self.mean) * 2 - 1

    def to_normalised(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] -> normalised like the views (what a backbone, and so the probes, sees)."""
        return ((x + 1) / 2 - self.mean) / self.std

    @staticmethod
    def to_unit(x: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] -> [0, 1] (clamped), for figures."""
        return ((x.detach().float() + 1) / 2).clamp(0, 1)


def decoder(in_dim: int, channels: int, image_size: int, width: int) -> nn.Sequential:
    """A DCGAN generator (Radford et al. 2016): Linear to a ``4*width`` x s x s map (s = image_size/4), then two
    stride-2 transposed convs (4x4) with BN and ReLU, and Tanh: [B, in_dim] -> [B, channels, image_size, image_size]
    in [-1, 1]. The autoencoders' decoder and the GAN's generator."""
    if image_size % 4:
        raise SslrunError(f"The generative baselines' decoder upsamples by 4 and needs an image size divisible by 4; "
                          f"got dataset.image_size={image_size}. Use 28, 32, 64 or 96.")
    s = image_size // 4
    return nn.Sequential(
        nn.Linear(in_dim, 4 * width * s * s, bias=False), nn.BatchNorm1d(4 * width * s * s), nn.ReLU(inplace=True),
        nn.Unflatten(1, (4 * width, s, s)),
        nn.ConvTranspose2d(4 * width, 2 * width, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
        nn.ConvTranspose2d(2 * width, channels, 4, 2, 1), nn.Tanh())


class ShownBatch(nn.Module):
    """The first images of the latest batch (pixels in [-1, 1]), kept for the reconstruction figure."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count
        self.register_buffer("images", torch.empty(0), persistent=False)

    def keep(self, x: torch.Tensor) -> None:
        self.images = x[:self.count].detach().clone()  # a copy: a slice would keep the whole batch alive


@torch.no_grad()
def in_eval_mode(module: nn.Module, fn, *args):
    """``fn(*args)`` with ``module`` in eval mode (BN running statistics), its mode restored after."""
    was = module.training
    module.eval()
    try:
        return fn(*args)
    finally:
        module.train(was)
