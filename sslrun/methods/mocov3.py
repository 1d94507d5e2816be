"""MoCo v3 (Chen, Xie & He, 2021): BYOL's online/target networks with a symmetric in-batch InfoNCE
instead of a regression loss, and no queue (large batches supply the negatives)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .byol import OnlineTarget
from .heads import mlp
from .infonce import info_nce_in_batch


def mocov3_loss(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """The paper's ``ctr(q, k) = 2T * CE`` over the batch; ``q`` and ``k`` need not be normalised.

    The 2T factor is the official code's: it makes the gradient's scale less dependent on T.
    """
    ce = info_nce_in_batch(F.normalize(q, dim=1), F.normalize(k, dim=1), temperature)
    return 2 * temperature * ce


class MoCoV3(OnlineTarget):
    """MoCo v3: symmetric in-batch InfoNCE between online predictions and momentum-encoder keys.

    Under ``torch.distributed`` the keys of the global batch are the candidates (gathered; they carry no
    gradient), as in the official code. Source: Chen, Xie & He, ICCV 2021; facebookresearch/moco-v3.
    """

    min_batch_reason = "each query's negatives are the other images' keys in the batch"

    def __init__(self, backbone: nn.Module, temperature: float = 0.2, proj_layers: int = 3,
                 proj_hidden_dim: int = 4096, proj_output_dim: int = 256, pred_layers: int = 2,
                 pred_hidden_dim: int = 4096, base_momentum: float = 0.99, final_momentum: float = 1.0) -> None:
        # Both heads are Linear-BN-ReLU blocks ending in BN without affine, as in the official code.
        projector = mlp(backbone.feat_dim, proj_hidden_dim, proj_output_dim, proj_layers, last_bn=True,
                        last_bn_affine=False)
        predictor = mlp(proj_output_dim, pred_hidden_dim, proj_output_dim, pred_layers, last_bn=True,
                        last_bn_affine=False)
        super().__init__(backbone, projector, predictor, base_momentum, final_momentum)
        self.temperature = temperature

    def forward(self, views: list[torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        n, t = views[0].shape[0], self.temperature
        z, q, k = self.encode(views)
        loss = mocov3_loss(q[:n], k[n:], t) + mocov3_loss(q[n:], k[:n], t)
        return {"loss": loss, "z": z[:n]}
