"""InfoNCE (van den Oord et al., 2018) as the MoCo family uses it, and the cross-process gather it needs.

MoCo v1/v2 contrast a query with its positive key and a queue of negatives; MoCo v3 (and PCL's
instance term) contrast it with the other keys of the batch. Every function here takes L2-normalised
vectors: normalising the 65536 queued keys again at every step would be wasted work.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .losses import in_fp32


def distributed() -> bool:
    """Whether this process is one of several under ``torch.distributed`` (e.g. torchrun)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """``x`` of every process concatenated in rank order (no gradient); ``x`` itself on one process."""
    if not distributed():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


@in_fp32
def info_nce(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo's eq. (1), averaged over the batch:
    ``-log exp(q.k+/T) / (exp(q.k+/T) + sum_j exp(q.k_j/T))``.

    ``q`` and ``k`` are [N, d] with ``k[i]`` the positive of ``q[i]``; ``negatives`` is [K, d], shared by
    all queries. The positive is logit 0 of each row, as in the official code.
    """
    pos = (q * k).sum(dim=1, keepdim=True)
    neg = q @ negatives.T
    logits = torch.cat([pos, neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


@in_fp32
def info_nce_in_batch(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE whose negatives are the other keys of the batch: ``k[i]`` is the positive of ``q[i]`` and
    every ``k[j]``, j != i, a negative; averaged over the queries.

    Under ``torch.distributed`` the keys of all processes are the candidates, as in MoCo v3's code,
    so the negatives come from the global batch.
    """
    keys = concat_all_gather(k)
    offset = dist.get_rank() * q.shape[0] if distributed() else 0
    logits = q @ keys.T / temperature
    targets = torch.arange(q.shape[0], device=q.device) + offset
    return F.cross_entropy(logits, targets)
