"""InstDisc (Wu et al., 2018): every image is its own class, scored against a memory bank of features.

backbone -> linear -> l2-normalise gives ``f``; ``P(i|f) = exp(v_i . f / T) / Z`` over the bank entries
``v_i``. Training uses noise-contrastive estimation against ``nce_k`` entries drawn uniformly from the bank
(the default, as in the paper), or a softmax over the bank. After each step the bank entries of the batch
move towards the new features with momentum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import dist
from ..errors import SslrunError
from .base import FitInfo, Method, TrainState
from .losses import in_fp32
from .membank import MemoryBank


def nce_loss(p_pos: torch.Tensor, p_neg: torch.Tensor, num_samples: int) -> torch.Tensor:
    """The paper's NCE objective with the uniform noise distribution P_n = 1/n and m = K noise samples.

    ``p_pos`` [B] holds P(i|v) of each image's own entry, ``p_neg`` [B, K] that of its noise entries.
    h(i, v) = P(i|v) / (P(i|v) + m P_n); loss = -(1/B) sum_b [log h(pos_b) + sum_j log(1 - h(neg_bj))].
    (The official code adds 1e-7 to the denominators; the terms are positive, so it is not needed here.)
    """
    m_pn = p_neg.shape[1] / num_samples
    log_h_pos = torch.log(p_pos / (p_pos + m_pn))
    log_1m_h_neg = torch.log(m_pn / (p_neg + m_pn))
    return -(log_h_pos.sum() + log_1m_h_neg.sum()) / p_pos.shape[0]


class InstDisc(Method):
    """InstDisc: each image is its own class, scored by NCE (or softmax) against a memory bank of features.

    Uses one view per image (the first; further views are ignored). Under ``torch.distributed`` every process
    writes the whole global batch into its bank, so the banks stay identical, and the NCE normaliser is
    estimated over the global first batch. Source: Wu et al., CVPR 2018; zhirongw/lemniscate.pytorch.
    """

    num_large_crops = 1
    unused_views_ok = True  # the default augmentation makes two views; the second is unused

    def __init__(self, backbone: nn.Module, proj_output_dim: int = 128, temperature: float = 0.07,
                 nce_k: int | None = 4096, bank_momentum: float = 0.5, loss: str = "nce") -> None:
        super().__init__()
        if loss not in ("nce", "softmax"):
            raise SslrunError(f"method.loss={loss!r} is not a valid choice; use one of: nce, softmax.")
        if loss == "nce" and not nce_k:
            raise SslrunError(f"method.loss=nce needs noise samples, but method.nce_k={nce_k}; set it, e.g. "
                              "method.nce_k=4096, or use method.loss=softmax for the full softmax.")
        self.backbone = backbone
        self.projector = nn.Linear(backbone.feat_dim, proj_output_dim)
        self.temperature, self.nce_k, self.bank_momentum, self.objective = temperature, nce_k, bank_momentum, loss
        self.bank: MemoryBank | None = None
        # NCE's normaliser Z, estimated once from the first batch (lemniscate's NCEAverage); kept in checkpoints.
        self.register_buffer("nce_z", torch.tensor(-1.0))
        self._z_checked = False  # avoids a host sync per step once Z is known
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def on_fit_start(self, info: FitInfo) -> None:
        device = self.nce_z.device
        self.bank = MemoryBank(info.num_samples, self.projector.out_features).to(device)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        # The loss runs in float32 (see _loss): exp(1/T) is ~2e4 at T=0.1, too coarse in bf16.
        return F.normalize(self.projector(self.backbone(x)).float(), dim=1)

    def forward(self, views: list[torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        # One augmented view per image, as in the paper.
        f = self.embed(views[0])
        loss = self._loss(f, index)
        self._pending = (dist.all_gather(index), dist.all_gather(f.detach()))
        return {"loss": loss, "z": f}

    @in_fp32
    def _loss(self, f: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        bank = self.bank.data  # a buffer: no gradient reaches it
        pos = (f * bank[index]).sum(1)
        if self.objective == "softmax" and self.nce_k is None:
            logits = f @ bank.T / self.temperature  # the non-parametric softmax over all n instances
            loss = F.cross_entropy(logits, index)
        else:
            # Noise entries drawn uniformly, shared by the batch: each image still sees K i.i.d. uniform
            # negatives (as in the official code) at K x d instead of B x K x d memory.
            neg = f @ bank[torch.randint(len(self.bank), (self.nce_k,), device=f.device)].T
            logits = torch.cat([pos[:, None], neg], 1) / self.temperature
            if self.objective == "softmax":
                loss = F.cross_entropy(logits, torch.zeros_like(index))
            else:
                p = torch.exp(logits) / self._normaliser(logits)
                loss = nce_loss(p[:, 0], p[:, 1:], len(self.bank))
        return loss

    def _normaliser(self, logits: torch.Tensor) -> torch.Tensor:
        """Z ~ n * E_j[exp(v_j . f / T)], a Monte-Carlo estimate from the first batch, then fixed (the paper)."""
        if not self._z_checked:
            if self.nce_z.item() <= 0:  # not resumed from a checkpoint that has it
                self.nce_z.copy_(dist.all_reduce_mean(torch.exp(logits.detach()).mean()) * len(self.bank))
            self._z_checked = True
        return self.nce_z

    def on_after_step(self, state: TrainState) -> None:
        index, f = self._pending
        self.bank.update(index, f, self.bank_momentum)
        self._pending = None
