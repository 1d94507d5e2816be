"""Shifted test sets: ImageNet-C's Gaussian noise, Gaussian blur and contrast corruptions at severities 1-5, in torch.

Parameters from ImageNet-C (Hendrycks & Dietterich, ICLR 2019; ``imagenet_c/corruptions.py`` of
github.com/hendrycks/robustness), on pixels in [0, 1]:
  gaussian_noise  x + N(0, c^2), c = 0.08, 0.12, 0.18, 0.26, 0.38
  gaussian_blur   a Gaussian of std c px, c = 1, 2, 3, 4, 6 at 224 px, scaled here by image_size / 224 (a blur is a
                  length: 0.14-0.86 px at 32 px; CIFAR-10-C's own choice, 0.4-1.0, is stronger)
  contrast        (x - m) c + m with m each channel's mean, c = 0.4, 0.3, 0.2, 0.1, 0.05
each clipped to [0, 1] and stored as uint8, like the test split they come from.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import SslrunError

NOISE_STD = (0.08, 0.12, 0.18, 0.26, 0.38)
BLUR_SIGMA_224 = (1.0, 2.0, 3.0, 4.0, 6.0)
CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)
CORRUPTIONS = ("gaussian_noise", "gaussian_blur", "contrast")


def gaussian_noise(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """``x`` [N, C, H, W] in [0, 1] plus Gaussian noise of ImageNet-C's std for ``severity``."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (x + NOISE_STD[severity - 1] * noise).clamp(0, 1)


def gaussian_blur(x: torch.Tensor, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` blurred by a separable Gaussian of ImageNet-C's std scaled to the image side (edges replicated, as
    skimage's ``mode='nearest'``; the kernel reaches 4 std, skimage's ``truncate``)."""
    sigma = BLUR_SIGMA_224[severity - 1] * x.shape[-1] / 224
    radius = max(1, math.ceil(4 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    out = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return out.clamp(0, 1)


def contrast(x: torch.Tensor, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` pulled towards each image's per-channel mean by ImageNet-C's factor."""
    m = x.mean((2, 3), keepdim=True)
    return ((x - m) * CONTRAST[severity - 1] + m).clamp(0, 1)


FUNCTIONS = {"gaussian_noise": gaussian_noise, "gaussian_blur": gaussian_blur, "contrast": contrast}


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """A corrupted copy of uint8 ``images`` [N, C, H, W] (uint8 out). ``seed`` fixes the noise.

    Raises:
        SslrunError: for an unknown corruption name or a severity outside 1-5.
    """
    if name not in FUNCTIONS:
        raise SslrunError(f"eval.tta.corruptions has {name!r}, which is not a corruption here; use any of: "
                          f"{', '.join(CORRUPTIONS)}.")
    if severity not in range(1, 6):
        raise SslrunError(f"eval.tta.severities has {severity}; ImageNet-C's severities are 1 to 5.")
    g = torch.Generator(device=images.device).manual_seed(seed)
    x = images.float() / 255
    return FUNCTIONS[name](x, severity, g).mul(255).round().to(torch.uint8)
