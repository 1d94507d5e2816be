"""sRGB <-> CIE L*a*b* (D65), batched in torch: CMC's views are the L and ab channels of an image.

Neither torchvision nor any dependency of the project converts to Lab (kornia and scikit-image do, but would be new
dependencies for two short formulas). The constants are scikit-image's (``skimage.color.rgb2lab``): the sRGB transfer
curve (IEC 61966-2-1), the linear-sRGB -> XYZ matrix of ITU-R BT.709 primaries, and the D65 2-degree white point;
the reference values in the tests (pure red -> L 53.24, a 80.09, b 67.20, ...) are the tabulated ones.
"""

from __future__ import annotations

import torch

_RGB_TO_XYZ = torch.tensor([[0.412453, 0.357580, 0.180423],
                            [0.212671, 0.715160, 0.072169],
                            [0.019334, 0.119193, 0.950227]])
_WHITE_D65 = torch.tensor([0.95047, 1.0, 1.08883])
_DELTA = 6 / 29  # the CIE f(t) switches from the cube root to a line below t = delta^3


def _per_pixel(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``matrix`` [3, 3] applied to the channel vector of every pixel of ``x`` [N, 3, H, W]."""
    return torch.einsum("ij,njhw->nihw", matrix.to(x), x)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """CIE L*a*b* of sRGB images.

    Args:
        rgb: sRGB values in [0, 1].

    Returns:
        L* in [0, 100], a* and b* in about [-86, 98] and [-108, 94] (their ranges over the sRGB gamut).

    Shape:
        rgb: [N, 3, H, W]; output: [N, 3, H, W] with channels (L*, a*, b*).
    """
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = _per_pixel(_RGB_TO_XYZ, linear) / _WHITE_D65.to(rgb).view(1, 3, 1, 1)
    f = torch.where(xyz > _DELTA**3, xyz.clamp_min(_DELTA**3) ** (1 / 3), xyz / (3 * _DELTA**2) + 4 / 29)
    fx, fy, fz = f.unbind(1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`rgb_to_lab`: sRGB in [0, 1] (unclipped) of L*a*b* images [N, 3, H, W]."""
    L, a, b = lab.unbind(1)
    fy = (L + 16) / 116
    f = torch.stack([fy + a / 500, fy, fy - b / 200], dim=1)
    xyz = torch.where(f > _DELTA, f**3, 3 * _DELTA**2 * (f - 4 / 29)) * _WHITE_D65.to(lab).view(1, 3, 1, 1)
    linear = _per_pixel(torch.linalg.inv(_RGB_TO_XYZ.double()).to(lab), xyz)
    return torch.where(linear > 0.0031308, 1.055 * linear.clamp_min(0.0031308) ** (1 / 2.4) - 0.055, 12.92 * linear)
