"""SimSiam's collapse signal (Chen & He, 2021, Fig. 2 middle)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def collapse_std(z: torch.Tensor) -> torch.Tensor:
    """Per-channel std over the batch of l2-normalised outputs, averaged over channels.

    It is 0 for a collapsed (constant) output and about 1/sqrt(d) for outputs spread over the unit sphere.
    """
    return F.normalize(z.float(), dim=1).std(dim=0).mean()
