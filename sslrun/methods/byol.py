"""BYOL (Grill et al., 2020): an online network with a predictor regresses an EMA target's projection of
the other view.

MoCo v3 (Chen et al., 2021) is the same online/target skeleton with a contrastive loss, so the skeleton,
:class:`OnlineTarget`, lives here and both methods build on it.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Method, TrainState
from .heads import mlp
from .losses import negative_cosine
from .momentum import cosine_momentum, ema_update, momentum_copy


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's eq. (2), ``||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z)``, with ``z`` detached, averaged over the batch."""
    return 2 + 2 * negative_cosine(p, z, stop_gradient=True)


class OnlineTarget(Method):
    """Online backbone -> projector -> predictor, and a target (an EMA copy of backbone -> projector)
    that never gets a gradient. The EMA momentum follows BYOL's cosine schedule from ``base_momentum``
    to ``final_momentum`` over the training budget."""

    def __init__(self, backbone: nn.Module, projector: nn.Module, predictor: nn.Module, base_momentum: float,
                 final_momentum: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.predictor = predictor
        self.target_backbone = momentum_copy(backbone)
        self.target_projector = momentum_copy(projector)
        self.base_momentum = base_momentum
        self.final_momentum = final_momentum

    def encode(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Online projections, online predictions and target projections of the two large views, each
        [2N, d] with view 1 first.

        Both views go through each network in one batch: the losses compare a view's prediction with
        the *other* view's target, both normalised over the same 2N images, so sharing BN statistics
        across the views gives no shortcut (the papers' per-view passes are a multi-GPU layout).
        """
        x = torch.cat(views[:2])
        z = self.projector(self.backbone(x))
        with torch.no_grad():
            target = self.target_projector(self.target_backbone(x))
        return z, self.predictor(z), target

    def target_momentum(self, progress: float) -> float:
        """The EMA momentum at ``progress`` in [0, 1] of the training budget."""
        return cosine_momentum(self.base_momentum, progress, self.final_momentum)

    def on_after_step(self, state: TrainState) -> None:
        m = self.target_momentum(state.progress)
        ema_update(self.target_backbone, self.backbone, m)
        ema_update(self.target_projector, self.projector, m)


class BYOL(OnlineTarget):
    """BYOL: the online prediction of each view regresses the EMA target's projection of the other (eq. 2).

    The loss is per image, so under ``torch.distributed`` only batch norm couples the batch (see
    ``trainer.sync_batchnorm``). Source: Grill et al., NeurIPS 2020.
    """

    def __init__(self, backbone: nn.Module, proj_hidden_dim: int = 4096, proj_output_dim: int = 256,
                 pred_hidden_dim: int = 4096, base_momentum: float = 0.99, final_momentum: float = 1.0) -> None:
        # Projector and predictor are both Linear-BN-ReLU-Linear, as in the paper.
        projector = mlp(backbone.feat_dim, proj_hidden_dim, proj_output_dim, 2)
        predictor = mlp(proj_output_dim, pred_hidden_dim, proj_output_dim, 2)
        super().__init__(backbone, projector, predictor, base_momentum, final_momentum)

    def forward(self, views: list[torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        n = views[0].shape[0]
        z, p, target = self.encode(views)
        # The symmetrised loss of the paper: the sum over both directions.
        loss = byol_loss(p[:n], target[n:]) + byol_loss(p[n:], target[:n])
        return {"loss": loss, "z": z[:n]}
