"""Batches of uint8 images drawn from an in-memory tensor, with their dataset indices."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffle of one epoch, a pure function of (seed, epoch): every rank draws the same one without
    communicating, and a run resumed mid-epoch redraws it exactly (as DistributedSampler does)."""
    mixed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(mixed))


class TensorBatches:
    """Shuffled batches (last partial batch dropped) from ``images`` [N,C,H,W] uint8.

    ``batch_size`` is the global batch (what papers quote); with ``world_size`` processes, rank ``r``
    takes rows ``[r*b, (r+1)*b)`` of each global batch, ``b = batch_size // world_size``, so the ranks
    see disjoint slices of one permutation and together the batch one process would see.

    When ``images`` already sit on ``device`` a batch is one gather; otherwise it is gathered on the
    host (from pinned memory on CUDA) and copied asynchronously.
    """

    def __init__(self, images: torch.Tensor, batch_size: int, device: torch.device, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        if batch_size % world_size:
            raise ValueError(f"global batch {batch_size} does not split over {world_size} processes")
        self.images, self.batch_size, self.device, self.seed = images, batch_size, device, seed
        self.rank, self.world_size = rank, world_size
        self.local_batch = batch_size // world_size

    def __len__(self) -> int:
        return self.images.shape[0] // self.batch_size

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's batches of ``epoch``, from batch ``start`` on (a resume mid-epoch skips the rest)."""
        perm = epoch_permutation(self.images.shape[0], self.seed, epoch)
        on_device = self.images.device == self.device
        if on_device:
            perm = perm.to(self.device)
        for i in range(start, len(self)):
            lo = i * self.batch_size + self.rank * self.local_batch
            idx = perm[lo:lo + self.local_batch]
            batch = self.images[idx]
            if not on_device:
                pin = self.device.type == "cuda"
                batch = (batch.pin_memory() if pin else batch).to(self.device, non_blocking=pin)
                idx = idx.to(self.device)
            yield batch, idx
