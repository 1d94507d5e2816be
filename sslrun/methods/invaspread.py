"""Invariant and Spreading Instance Feature (Ye et al., CVPR 2019, "Unsupervised Embedding Learning via Invariant
and Spreading Instance Feature"): one encoder trained end to end, each image a class whose weight vector is its
own feature in the current batch, no memory bank.

Two augmented views of every image go through the same network (backbone -> linear -> l2-normalise, 128-d).
With ``f`` the 2N features of the batch, every row ``i`` is scored against the other 2N-1:
``P(j|i) = exp(f_j . f_i / T) / sum_{k != i} exp(f_k . f_i / T)``; the loss (the paper's softmax embedding, as the
official ``BatchCriterion`` computes it with negM = 1) pulls the other view ``i'`` of the same image in and pushes
every other instance out:
``L = -(1/2N) sum_i [ log P(i'|i) + sum_{j not in {i, i'}} log(1 - P(j|i)) ]``.
As in the official code (mangye16/Unsupervised_Embedding_Learning, ``BatchAverage.py``: ``feat.data``), the
candidates ``f_j`` act as fixed class weights: the gradient reaches each feature through its own row only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import dist
from .base import Method
from .losses import in_fp32


@in_fp32
def invaspread_loss(f: torch.Tensor, candidates: torch.Tensor, own: torch.Tensor, positive: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """The softmax-embedding loss of InvaSpread (Ye et al., 2019; the official ``BatchCriterion``), averaged
    over the rows of ``f``.

    Args:
        f: l2-normalised features of the rows scored here (this process's views).
        candidates: l2-normalised features of every view of the (global) batch, ``f``'s rows among them; used
            as constant class weights (detached), as in the official code.
        own: the column of ``candidates`` that holds each row of ``f`` itself (excluded from the softmax).
        positive: the column holding each row's other view of the same image.
        temperature: the softmax temperature T (the paper's tau = 0.1).

    Shape:
        f: [M, d]; candidates: [K, d]; own, positive: [M] (long); output: scalar.
    """
    rows = torch.arange(f.shape[0], device=f.device)
    logits = f @ candidates.detach().T / temperature
    logits[rows, own] = float("-inf")  # an instance is never scored against itself
    log_p = logits.log_softmax(dim=1)  # log P(j | i) over the K-1 others
    # log(1 - P(j|i)) for the negatives; the clamp only keeps a probability rounded to 1.0 finite.
    log_not = torch.log1p(-log_p.exp().clamp(max=1 - 1e-6))
    negatives = torch.ones_like(logits, dtype=torch.bool)
    negatives[rows, own] = False
    negatives[rows, positive] = False
    return -(log_p[rows, positive] + (log_not * negatives).sum(dim=1)).mean()


class InvaSpread(Method):
    """InvaSpread: backbone -> Linear(feat_dim, ``proj_output_dim``) -> l2-normalise, trained with
    :func:`invaspread_loss` over two views of each image; the other instances of the batch are the negatives.

    Under ``torch.distributed`` the candidates are the features of the global batch (each process scores its own
    rows against all of them), so the loss is the one-process loss of the global batch.

    Args:
        backbone: the encoder (``feat_dim`` features).
        proj_output_dim: the embedding size (the paper's 128-d ``low-dim``).
        temperature: T of the softmax (the paper and the official CIFAR script: 0.1).

    Source: Ye, Zhang, Yuen & Chang, CVPR 2019; official code mangye16/Unsupervised_Embedding_Learning
    (``demo_seen.py``, ``BatchAverage.py``).
    """

    min_batch_reason = "the other images of the batch are its negatives"

    def __init__(self, backbone: nn.Module, proj_output_dim: int, temperature: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = nn.Linear(backbone.feat_dim, proj_output_dim)
        self.temperature = temperature

    def forward(self, views: list[torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        n = views[0].shape[0]
        # Both views in one pass, as the official code concatenates them: rows 0..n-1 and their partners n..2n-1.
        f = F.normalize(self.projector(self.backbone(torch.cat(views[:2]))).float(), dim=1)
        local = torch.arange(2 * n, device=f.device) + dist.rank() * 2 * n  # rows in the global batch
        partner = (local + n) % (2 * n) + dist.rank() * 2 * n
        # The candidates are constants (see the module docstring), so a gather without gradient is exact.
        loss = invaspread_loss(f, dist.all_gather(f), local, partner, self.temperature)
        return {"loss": loss, "z": f[:n]}
