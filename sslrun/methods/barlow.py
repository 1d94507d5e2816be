"""Barlow Twins (Zbontar et al., 2021): make the cross-correlation of the two views' embeddings the identity."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import dist
from .base import Method
from .heads import mlp
from .losses import in_fp32

BN_EPS = 1e-5  # the official code's affine-free nn.BatchNorm1d


@in_fp32
def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float, scale_loss: float = 1.0) -> torch.Tensor:
    """scale_loss * [sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2], C = BN(z1)^T BN(z2) / B.

    BN standardises each view's embeddings along ITS OWN batch (per-view BN, not over the concatenated
    batch): C is then the cross-correlation matrix of the paper, with entries in [-1, 1]. In fp32 even
    under bf16 autocast: the loss sums D^2 squared entries. Under ``torch.distributed`` the batch is the
    global one: every process gathers all embeddings (with their gradient) and computes the same loss, so
    the standardisation and C are those of one process holding the whole batch (the official code's
    synchronised BN and all-reduced C).

    Args:
        z1, z2: [n, D] this process's embeddings of the two views.
        lambd: weight of the off-diagonal (redundancy-reduction) term.
        scale_loss: a factor on the whole loss.
    """
    z1, z2 = dist.gather_with_grad(z1), dist.gather_with_grad(z2)
    n = z1.shape[0]
    z1 = F.batch_norm(z1, None, None, training=True, eps=BN_EPS)
    z2 = F.batch_norm(z2, None, None, training=True, eps=BN_EPS)
    c = z1.T @ z2 / n
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return scale_loss * (on_diag + lambd * off_diag)


class BarlowTwins(Method):
    """Barlow Twins: the cross-correlation of the two views' standardised embeddings is driven to the identity.

    Source: Zbontar et al., ICML 2021; facebookresearch/barlowtwins main.py.
    """

    min_batch_reason = "its loss standardises each embedding dimension over the batch"

    def __init__(self, backbone: nn.Module, proj_hidden_dim: int = 2048, proj_output_dim: int = 2048,
                 proj_layers: int = 3, lambd: float = 0.0051, scale_loss: float = 1.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = mlp(backbone.feat_dim, proj_hidden_dim, proj_output_dim, proj_layers)
        self.lambd = lambd
        self.scale_loss = scale_loss

    def forward(self, views: list[torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        n = views[0].shape[0]
        # One backbone/projector pass over both views (speed; the hidden BNs then see both views, like
        # SimCLR's). The normalisation the loss depends on, of the embeddings, is per view, in the loss.
        z = self.projector(self.backbone(torch.cat(views[:2])))
        z1, z2 = z[:n], z[n:]
        return {"loss": barlow_twins_loss(z1, z2, self.lambd, self.scale_loss), "z": z1}
