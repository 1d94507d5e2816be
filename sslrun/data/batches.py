"""Batches of uint8 images drawn from an in-memory tensor, with their dataset indices."""

from __future__ import annotations

from collections.abc import Iterator

import torch


class TensorBatches:
    """Shuffled batches (last partial batch dropped) from ``images`` [N,C,H,W] uint8.

    When ``images`` already sit on ``device`` a batch is one gather; otherwise it is gathered on the
    host from pinned memory and copied asynchronously.
    """

    def __init__(self, images: torch.Tensor, batch_size: int, device: torch.device, generator: torch.Generator) -> None:
        self.images = images
        self.batch_size = batch_size
        self.device = device
        self.generator = generator  # a CPU generator: the permutation is drawn on the host

    def __len__(self) -> int:
        return self.images.shape[0] // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        perm = torch.randperm(self.images.shape[0], generator=self.generator)
        on_device = self.images.device == self.device
        if on_device:
            perm = perm.to(self.device)
        for i in range(len(self)):
            idx = perm[i * self.batch_size:(i + 1) * self.batch_size]
            batch = self.images[idx]
            if not on_device:
                pin = self.device.type == "cuda"
                batch = (batch.pin_memory() if pin else batch).to(self.device, non_blocking=pin)
                idx = idx.to(self.device)
            yield batch, idx
