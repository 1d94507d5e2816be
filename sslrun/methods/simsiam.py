"""SimSiam (Chen & He, 2021): a predictor on one branch, stop-gradient on the other."""

from __future__ import annotations

import torch
from torch import nn

from .base import Method
from .heads import mlp
from .losses import negative_cosine


class SimSiam(Method):
    """SimSiam: a predictor on one branch, stop-gradient on the other, negative cosine between the two views.

    The loss is per image, so under ``torch.distributed`` only batch norm couples the batch (see
    ``trainer.sync_batchnorm``). Source: Chen & He, CVPR 2021, Algorithm 1.
    """

    def __init__(self, backbone: nn.Module, proj_hidden_dim: int = 2048, proj_output_dim: int = 2048,
                 pred_hidden_dim: int = 512, proj_layers: int = 3, fixed_predictor_lr: bool = True,
                 stop_gradient: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        # The projector ends in BN, as in the paper.
        self.projector = mlp(backbone.feat_dim, proj_hidden_dim, proj_output_dim, proj_layers, last_bn=True)
        self.predictor = mlp(proj_output_dim, pred_hidden_dim, proj_output_dim, 2)
        self.fixed_predictor_lr = fixed_predictor_lr
        self.stop_gradient = stop_gradient

    def forward(self, views: list[torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        n = views[0].shape[0]
        z = self.projector(self.backbone(torch.cat(views[:2])))
        p = self.predictor(z)
        z1, z2, p1, p2 = z[:n], z[n:], p[:n], p[n:]
        # stop_gradient=false is the ablation of the paper's Fig. 2: it collapses.
        sg = self.stop_gradient
        loss = 0.5 * (negative_cosine(p1, z2, sg) + negative_cosine(p2, z1, sg))
        return {"loss": loss, "z": z1}

    def param_groups(self) -> list[dict]:
        # The paper keeps the predictor's lr fixed (no decay): it helps and is its default.
        pred = list(self.predictor.parameters())
        pred_ids = {id(p) for p in pred}
        rest = [p for p in self.parameters() if id(p) not in pred_ids]
        return [{"params": rest}, {"params": pred, "fixed_lr": self.fixed_predictor_lr}]
