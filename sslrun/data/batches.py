"""Shuffled batches of uint8 images with their dataset indices: from an in-memory tensor (``TensorBatches``)
or decoded from files (``stream.StreamBatches``), with one interface and one order; ``make_batches`` picks."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sslrun.data.image_set import ImageSet

if TYPE_CHECKING:
    from sslrun.data.stream import StreamBatches


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffle of one epoch, a pure function of (seed, epoch): every rank draws the same one without
    communicating, and a run resumed mid-epoch redraws it exactly (as DistributedSampler does)."""
    mixed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(mixed))


def rank_batches(perm: torch.Tensor, batch_size: int, rank: int, world_size: int,
                 start: int = 0) -> Iterator[torch.Tensor]:
    """Rank ``rank``'s share of each global batch of ``perm``, from batch ``start`` on: rows
    ``[rank*b, (rank+1)*b)`` of global batch i, ``b = batch_size // world_size``; the last partial batch is
    dropped. The ranks' shares are disjoint and together are the batch one process would draw."""
    local = batch_size // world_size
    for i in range(start, len(perm) // batch_size):
        lo = i * batch_size + rank * local
        yield perm[lo:lo + local]


def fits_on(device: torch.device, tensor: torch.Tensor, fraction: float = 0.5) -> bool:
    """Whether ``tensor`` takes less than ``fraction`` of ``device``'s free memory (always, off CUDA)."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return tensor.numel() * tensor.element_size() < fraction * free


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
        for idx in rank_batches(perm, self.batch_size, self.rank, self.world_size, start):
            batch = self.images[idx]
            if not on_device:
                pin = self.device.type == "cuda"
                batch = (batch.pin_memory() if pin else batch).to(self.device, non_blocking=pin)
                idx = idx.to(self.device)
            yield batch, idx


def make_batches(split: ImageSet, dataset_cfg: Mapping[str, Any], batch_size: int, device: torch.device,
                 seed: int, rank: int = 0, world_size: int = 1) -> TensorBatches | StreamBatches:
    """The batches of ``split`` for training: ``StreamBatches`` when the split is streamed from files
    (``dataset.storage=stream``: its images are ``ImageFiles``), with ``dataset.num_workers`` decoding
    processes, ``dataset.prefetch`` batches ahead each, and JPEGs decoded on the device when
    ``dataset.device_decode`` (nvjpeg on CUDA); otherwise ``TensorBatches``, with the tensor moved
    to ``device`` first when it takes under half the free GPU memory (a batch is then one gather).

    Returns an object with ``__len__`` (steps per epoch) and ``epoch(epoch, start=0)``, see ``TensorBatches``.
    """
    from sslrun.data.stream import ImageFiles, StreamBatches  # stream.py imports this module

    if isinstance(split.images, ImageFiles):
        return StreamBatches(split.images, batch_size, device, seed, rank, world_size,
                             num_workers=dataset_cfg["num_workers"], prefetch=dataset_cfg["prefetch"],
                             device_decode=dataset_cfg["device_decode"])
    images = split.images.to(device) if fits_on(device, split.images) else split.images
    return TensorBatches(images, batch_size, device, seed, rank, world_size)
