"""The in-memory form every dataset is loaded into: one uint8 tensor plus labels."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ImageSet:
    """Images as one uint8 tensor ``[N, C, H, W]`` and integer labels ``[N]`` (-1 = unlabeled).

    A streamed image folder (``dataset.storage=stream``) holds ``stream.ImageFiles`` instead of the tensor:
    the same ``shape``/``dtype``/``len``; a subset stays undecoded, ``images[i:j].to(device)`` decodes.
    """

    images: torch.Tensor  # or stream.ImageFiles
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 [N,C,H,W], got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be [N]={self.images.shape[0]}, got {tuple(self.labels.shape)}")
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str) -> ImageSet:
        return ImageSet(self.images.to(device), self.labels.to(device))

    def subset(self, index: torch.Tensor) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index])


@dataclass
class DatasetSplits:
    """What a dataset gives the runner.

    ``pretrain`` feeds self-supervised training (labels unused; for STL-10 it is unlabeled+train),
    ``train``/``test`` feed the probes. ``mean``/``std`` are per-channel, in [0, 1] units.
    """

    name: str
    pretrain: ImageSet
    train: ImageSet
    test: ImageSet
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str] = field(default_factory=list)

    @property
    def channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.train.images.shape[-1]
