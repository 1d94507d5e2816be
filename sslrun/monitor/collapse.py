"""Collapse signals: SimSiam's output std (Chen & He, 2021, Fig. 2 middle) and RankMe's effective rank
(Garrido et al., 2023)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

RANKME_EPS = 1e-7  # RankMe's epsilon in the normalised singular values (keeps log finite at sigma = 0)


@torch.no_grad()
def collapse_std(z: torch.Tensor) -> torch.Tensor:
    """Per-channel std over the batch of l2-normalised outputs, averaged over channels.

    It is 0 for a collapsed (constant) output and about 1/sqrt(d) for outputs spread over the unit sphere.
    """
    return F.normalize(z.float(), dim=1).std(dim=0).mean()


@torch.no_grad()
def effective_rank(z: torch.Tensor) -> torch.Tensor:
    """RankMe: ``exp(entropy(p))`` with ``p_k = sigma_k / sum(sigma) + eps`` over the singular values of
    ``z`` [N, d] (not centred, as in the paper). d for d equal orthogonal directions, 1 for rank 1, and at
    most min(N, d).
    """
    s = torch.linalg.svdvals(z.float())
    p = s / s.sum().clamp_min(torch.finfo(s.dtype).tiny) + RANKME_EPS
    return torch.exp(-(p * p.log()).sum())
