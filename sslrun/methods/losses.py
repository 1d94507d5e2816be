"""Losses shared by several methods, as plain functions testable on tiny tensors."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F

from .. import dist

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
    """SimCLR's normalised-temperature cross entropy over 2N views (Chen et al., 2020, eq. 1), averaged over them.

    Each view's positive is the other view of the same image; its negatives are the other 2N-2 views, and
    the rows of ``negatives`` [K, d] (l2-normalised; SimCLR v2's memory of past batches) when given. Under
    ``torch.distributed`` the N images are the global batch: each process scores its own 2n views against
    the views of every process, gathered with their gradient (``sslrun.dist.gather_with_grad``), so the mean
    of the processes' losses, and with DDP the gradients, are those of one process holding the whole batch.

    Args:
        z1, z2: [n, d] embeddings of this process's two views (any scale: normalised here).
        temperature: tau, the softmax temperature.
        negatives: [K, d] extra l2-normalised negatives shared by every view, or None.
    """
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # [2n, d]: this process's views
    n, world = z1.shape[0], dist.world_size()
    # [2N, d]: all first views in rank order, then all second views, as one process would hold them.
    keys = dist.gather_with_grad(z).view(world, 2, n, -1).transpose(0, 1).reshape(2 * n * world, -1)
    logits = z @ keys.T / temperature
    rows = torch.arange(n, device=z.device) + dist.rank() * n  # this process's images in the global batch
    own = torch.cat([rows, rows + n * world])
    logits = logits.masked_fill(own[:, None] == torch.arange(keys.shape[0], device=z.device), float("-inf"))
    if negatives is not None:
        logits = torch.cat([logits, z @ negatives.T / temperature], dim=1)
    targets = torch.cat([rows + n * world, rows])  # the other view of the same image
    return F.cross_entropy(logits, targets)


@in_fp32
def negative_cosine(p: torch.Tensor, z: torch.Tensor, stop_gradient: bool = True) -> torch.Tensor:
    """SimSiam's D(p, z) = -cos(p, stopgrad(z)), averaged over the batch."""
    if stop_gradient:
        z = z.detach()
    return -F.cosine_similarity(p, z, dim=-1).mean()
