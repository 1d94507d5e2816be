"""A FIFO queue of feature vectors: MoCo's negatives, SwAV's and PCL's memory of past batches."""

from __future__ import annotations

import torch
from torch import nn


class FeatureQueue(nn.Module):
    """``size`` x ``dim`` ring buffer; ``push`` overwrites the oldest rows. Saved in checkpoints.

    ``filled`` counts valid rows so a queue can be used before it has wrapped around once.
    """

    def __init__(self, size: int, dim: int, init: str = "zeros") -> None:
        super().__init__()
        data = torch.randn(size, dim) if init == "randn" else torch.zeros(size, dim)
        self.register_buffer("data", nn.functional.normalize(data, dim=1) if init == "randn" else data)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.tensor(size if init == "randn" else 0, dtype=torch.long))

    @torch.no_grad()
    def push(self, x: torch.Tensor) -> None:
        size, n = self.data.shape[0], x.shape[0]
        rows = (self.ptr + torch.arange(n, device=x.device)) % size
        self.data[rows] = x.detach().to(self.data.dtype)
        self.ptr.copy_((self.ptr + n) % size)
        self.filled.copy_(torch.clamp(self.filled + n, max=size))

    def get(self) -> torch.Tensor:
        """The valid rows (all of them once the queue has wrapped)."""
        return self.data if int(self.filled) == self.data.shape[0] else self.data[: int(self.filled)]
