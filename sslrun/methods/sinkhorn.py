"""Sinkhorn-Knopp: the equipartitioned soft assignment of a batch to prototypes (SwAV's codes).

Caron et al., 2020, eq. (3) and ``distributed_sinkhorn`` in the official main_swav.py: the codes are the
optimal transport plan between B samples and K prototypes, with the entropy weight ``epsilon``, under the
constraint that every prototype receives the same share of the batch. Under ``torch.distributed`` the
batch is the union of the processes' rows: the sums over samples (the total, each prototype's share, the
sample count) are all-reduced, as in the official code, so each process gets its rows of the one plan.
"""

from __future__ import annotations

import torch

from .. import dist


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, n_iters: int = 3) -> torch.Tensor:
    """Codes [B, K] from prototype scores [B, K]: each row (sample) sums to 1, each column (prototype)
    to about B/K over the global batch (exactly, as ``n_iters`` grows). ``B`` is this process's rows.

    Computed in float32 without gradient: the codes are targets, and exp(score/0.05) amplifies any
    rounding of bf16/fp16 scores twenty-fold.
    """
    scores = scores.detach().float()
    # exp(s/eps - max): the same plan as exp(s/eps) once normalised, but cannot overflow; one max for the
    # global batch, so that every process's rows are scaled alike.
    q = torch.exp((scores - dist.all_reduce_max(scores.max())) / epsilon).T  # [K, B], the paper's orientation
    n_protos = q.shape[0]
    n_samples = dist.all_reduce_sum(torch.tensor(float(q.shape[1]), device=q.device))
    q /= dist.all_reduce_sum(q.sum())
    for _ in range(n_iters):
        q /= dist.all_reduce_sum(q.sum(dim=1, keepdim=True))  # each prototype gets total weight 1/K
        q /= n_protos
        q /= q.sum(dim=0, keepdim=True)  # each sample gets total weight 1/B
        q /= n_samples
    return (q * n_samples).T  # columns summing to 1: each sample's codes are a distribution
