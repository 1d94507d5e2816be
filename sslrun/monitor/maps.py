"""2-D maps of embeddings in plain torch: PCA, and exact t-SNE for the few thousand points a figure shows
(no scikit-learn dependency)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# t-SNE optimiser constants of van der Maaten & Hinton (2008) and scikit-learn's defaults.
EARLY_EXAGGERATION = 12.0
EXAGGERATION_ITERS = 250
MOMENTUM = (0.5, 0.8)  # before / after the exaggeration phase
MIN_GAIN = 0.01
PERPLEXITY_BISECTIONS = 64


def pca_2d(x: torch.Tensor) -> torch.Tensor:
    """[N, d] -> [N, 2]: projections on the two leading principal components (torch.pca_lowrank centres)."""
    x = x.float()
    _, _, v = torch.pca_lowrank(x, q=min(2, *x.shape), center=True, niter=4)
    y = (x - x.mean(0)) @ v
    return F.pad(y, (0, 2 - y.shape[1]))  # fewer than 2 components (1-D data): pad with zeros


def _affinities(x: torch.Tensor, perplexity: float) -> torch.Tensor:
    """Symmetric joint probabilities P [N, N]: per row a Gaussian whose precision is bisected so that its
    entropy is log(perplexity), all rows at once."""
    n = x.shape[0]
    d2 = torch.cdist(x, x).square()
    off = ~torch.eye(n, dtype=torch.bool, device=x.device)
    target = math.log(min(perplexity, (n - 1) / 3))
    beta = torch.ones(n, 1, device=x.device)
    lo, hi = torch.zeros_like(beta), torch.full_like(beta, math.inf)
    for _ in range(PERPLEXITY_BISECTIONS):
        logits = torch.where(off, -d2 * beta, -math.inf)
        p = torch.softmax(logits, dim=1)
        entropy = -(p * torch.log_softmax(logits, dim=1).masked_fill(~off, 0)).sum(1, keepdim=True)
        too_flat = entropy > target  # too wide a Gaussian: raise the precision
        lo = torch.where(too_flat, beta, lo)
        hi = torch.where(too_flat, hi, beta)
        beta = torch.where(hi.isinf(), beta * 2, (lo + hi) / 2)
    return ((p + p.T) / (2 * n)).clamp_min(1e-12)


def tsne_2d(x: torch.Tensor, perplexity: float = 30.0, iters: int = 500, seed: int = 0) -> torch.Tensor:
    """[N, d] -> [N, 2] exact t-SNE (O(N^2) per iteration: meant for N up to a few thousand) of the
    l2-normalised rows, with early exaggeration, momentum and per-coordinate gains as in the paper."""
    x = F.normalize(x.float(), dim=1)
    n = x.shape[0]
    p = _affinities(x, perplexity)
    g = torch.Generator(device="cpu").manual_seed(seed)
    y = (1e-4 * torch.randn(n, 2, generator=g)).to(x.device)
    velocity, gains = torch.zeros_like(y), torch.ones_like(y)
    lr = max(n / EARLY_EXAGGERATION / 4, 50.0)  # scikit-learn's "auto" learning rate
    for it in range(iters):
        early = it < EXAGGERATION_ITERS
        sq = y.square().sum(1)
        # Student-t kernel 1 / (1 + |y_i - y_j|^2), in place: this loop is the cost of the map.
        num = torch.addmm(sq[:, None] + sq[None, :], y, y.T, alpha=-2).clamp_min_(0).add_(1).reciprocal_()
        num.fill_diagonal_(0)
        w = torch.mul(p, EARLY_EXAGGERATION if early else 1.0).sub_(num, alpha=1 / num.sum().item()).mul_(num)
        grad = 4 * (w.sum(1, keepdim=True) * y - w @ y)
        same_sign = (grad > 0) == (velocity > 0)
        gains = torch.where(same_sign, gains * 0.8, gains + 0.2).clamp_min_(MIN_GAIN)
        velocity = MOMENTUM[0 if early else 1] * velocity - lr * gains * grad
        y = y + velocity
        y = y - y.mean(0)
    return y
