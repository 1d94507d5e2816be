"""SimCLR (Chen et al., 2020): a projector and NT-Xent between two views of each image."""

from __future__ import annotations

import torch
from torch import nn

from .base import Method
from .heads import mlp
from .losses import nt_xent


class SimCLR(Method):
    """SimCLR: NT-Xent between the projections of two views of each image, the other images as negatives.

    Source: Chen et al., ICML 2020, eq. (1); under ``torch.distributed`` the negatives come from the global
    batch (see :func:`~sslrun.methods.losses.nt_xent`).
    """

    min_batch_reason = "each view's negatives are the other images of the batch: at batch 1 the loss is exactly 0"

    def __init__(self, backbone: nn.Module, temperature: float = 0.2, proj_hidden_dim: int = 2048,
                 proj_output_dim: int = 128, proj_layers: int = 2) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = mlp(backbone.feat_dim, proj_hidden_dim, proj_output_dim, proj_layers)
        self.temperature = temperature

    def forward(self, views: list[torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        # Both large views go through the backbone in one batch: one pass, BN statistics over both.
        n = views[0].shape[0]
        z = self.projector(self.backbone(torch.cat(views[:2])))
        z1, z2 = z[:n], z[n:]
        return {"loss": nt_xent(z1, z2, self.temperature), "z": z1}
