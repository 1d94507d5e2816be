"""InfoNCE (van den Oord et al., 2018) as the MoCo family uses it.

MoCo v1/v2 (and PCL's instance term, which is MoCo v2's) contrast a query with its positive key and a queue
of negatives (``info_nce``); MoCo v3 contrasts it with the other keys of the batch (``info_nce_in_batch``);
CMC uses either, with negatives from its memory banks or its batch. Every function here takes L2-normalised
vectors: normalising the 65536 queued keys again at every step would be wasted work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import dist
from .losses import in_fp32


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
def info_nce_in_batch(q: torch.Tensor, k: torch.Tensor, temperature: float, keys_learn: bool = False) -> torch.Tensor:
    """InfoNCE whose negatives are the other keys of the batch: ``k[i]`` is the positive of ``q[i]`` and
    every ``k[j]``, j != i, a negative; averaged over the queries.

    Under ``torch.distributed`` the keys of all processes are the candidates, as in MoCo v3's code,
    so the negatives come from the global batch.
    """
    # MoCo v3's keys come from the momentum encoder and carry no gradient; with ``keys_learn`` (CMC, whose two
    # views both learn) every process's keys keep theirs, as one process holding the global batch would.
    keys = dist.gather_with_grad(k) if keys_learn else dist.all_gather(k)
    offset = dist.rank() * q.shape[0]
    logits = q @ keys.T / temperature
    targets = torch.arange(q.shape[0], device=q.device) + offset
    return F.cross_entropy(logits, targets)
