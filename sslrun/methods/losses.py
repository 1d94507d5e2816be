"""Losses shared by several methods, as plain functions testable on tiny tensors."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F

LossFn = TypeVar("LossFn", bound=Callable[..., torch.Tensor])


def in_fp32(loss_fn: LossFn) -> LossFn:
    """Run a loss (or a scoring step, as a method) in float32 even under bf16 autocast, with its floating
    tensor arguments cast up.

    bf16 keeps 8 mantissa bits: a cosine similarity carries ~0.4% rounding, which a temperature of 0.1
    magnifies tenfold in the logits. The loss is a few small matmuls, so fp32 costs nothing measurable.
    """

    @functools.wraps(loss_fn)
    def wrapper(*args: object, **kwargs: object) -> torch.Tensor:
        device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        args = tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
        with torch.autocast(device, enabled=False):
            return loss_fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@in_fp32
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float,
            negatives: torch.Tensor | None = None) -> torch.Tensor:
    """SimCLR's normalised-temperature cross entropy over 2N views (Chen et al., 2020, eq. 1).

    Each view's positive is the other view of the same image; its negatives are the other 2N-2 views, and
    the rows of ``negatives`` [K, d] (l2-normalised; SimCLR v2's memory of past batches) when given.
    """
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))  # a view is never its own negative
    if negatives is not None:
        logits = torch.cat([logits, z @ negatives.T / temperature], dim=1)
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, targets)


@in_fp32
def negative_cosine(p: torch.Tensor, z: torch.Tensor, stop_gradient: bool = True) -> torch.Tensor:
    """SimSiam's D(p, z) = -cos(p, stopgrad(z)), averaged over the batch."""
    if stop_gradient:
        z = z.detach()
    return -F.cosine_similarity(p, z, dim=-1).mean()
