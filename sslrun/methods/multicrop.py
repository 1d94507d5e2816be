"""Multi-crop (Caron et al., 2020): two large crops and any number of small ones through one backbone."""

from __future__ import annotations

import torch
from torch import nn

# The engine's views come large crops first; SwAV assigns codes and DINO's teacher looks at the first two.
NUM_LARGE_CROPS = 2


def encode_by_resolution(backbone: nn.Module, views: list[torch.Tensor]) -> torch.Tensor:
    """Backbone features of all views, concatenated in view order ([V*B, feat_dim]).

    As in the official SwAV and DINO code (``MultiCropWrapper``): each run of consecutive views of one
    size is a single backbone call on their concatenated batch, so 2 large + 6 small crops cost two calls.
    """
    feats, start = [], 0
    for end in range(1, len(views) + 1):
        if end == len(views) or views[end].shape[-2:] != views[start].shape[-2:]:
            feats.append(backbone(torch.cat(views[start:end])))
            start = end
    return torch.cat(feats)

