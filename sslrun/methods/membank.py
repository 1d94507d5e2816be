"""A memory bank: one l2-normalised feature per pretraining image (InstDisc's non-parametric classifier)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MemoryBank(nn.Module):
    """``num_samples`` x ``dim`` unit vectors, initialised at random directions; a buffer, so it is saved
    in checkpoints and moves with the method. Entries are only written by :meth:`update`, never by autograd."""

    def __init__(self, num_samples: int, dim: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.register_buffer("data", F.normalize(torch.randn(num_samples, dim, generator=generator), dim=1))

    def __len__(self) -> int:
        return self.data.shape[0]

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        """The (detached) entries at ``index``."""
        return self.data[index]

    @torch.no_grad()
    def update(self, index: torch.Tensor, feats: torch.Tensor, momentum: float) -> None:
        """bank[i] <- normalise(m * bank[i] + (1 - m) * f_i) for each i in ``index``."""
        mixed = momentum * self.data[index] + (1 - momentum) * feats.detach().to(self.data.dtype)
        self.data[index] = F.normalize(mixed, dim=1)
