"""Sinkhorn-Knopp: the equipartitioned soft assignment of a batch to prototypes (SwAV's codes).

Caron et al., 2020, eq. (3) and ``distributed_sinkhorn`` in the official main_swav.py: the codes are the
optimal transport plan between B samples and K prototypes, with the entropy weight ``epsilon``, under the
constraint that every prototype receives the same share of the batch. Single process: under DDP the sums
over the batch (the total and the per-prototype sums) would have to be all-reduced, as the official code does.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, n_iters: int = 3) -> torch.Tensor:
    """Codes [B, K] from prototype scores [B, K]: each row (sample) sums to 1, each column (prototype)
    to about B/K (exactly, as ``n_iters`` grows).

    Computed in float32 without gradient: the codes are targets, and exp(score/0.05) amplifies any
    rounding of bf16/fp16 scores twenty-fold.
    """
    scores = scores.detach().float()
    # exp(s/eps - max): the same plan as exp(s/eps) once normalised, but cannot overflow.
    q = torch.exp((scores - scores.max()) / epsilon).T  # [K, B], the paper's orientation
    n_protos, n_samples = q.shape
    q /= q.sum()
    for _ in range(n_iters):
        q /= q.sum(dim=1, keepdim=True)  # each prototype gets total weight 1/K
        q /= n_protos
        q /= q.sum(dim=0, keepdim=True)  # each sample gets total weight 1/B
        q /= n_samples
    return (q * n_samples).T  # columns summing to 1: each sample's codes are a distribution
