"""Extract frozen backbone features of un-augmented images, once per evaluation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..data.augment import normalize
from ..data.stream import ImageFiles, batches_of


@torch.no_grad()
def extract_features(backbone: nn.Module, images: torch.Tensor | ImageFiles, mean: Sequence[float],
                     std: Sequence[float], device: torch.device, batch_size: int = 512,
                     autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Backbone features (float32, on ``device``) of uint8 ``images`` [N,C,H,W], in eval mode, in order.

    ``images`` may be a streamed split's ``ImageFiles`` (or a slice of it, one rank's shard): each batch is
    then decoded while the previous one runs through the backbone, and only one batch is held at a time.
    """
    was_training = backbone.training
    backbone.eval()
    out = []
    for batch in batches_of(images, batch_size):
        x = normalize(batch.to(device, non_blocking=True), mean, std)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            out.append(backbone(x).float())
    backbone.train(was_training)
    return torch.cat(out)
