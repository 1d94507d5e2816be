"""Linear probe on cached frozen features: standardised features, one linear layer, cross entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.optim import lr_factor


def train_linear(train_feats: torch.Tensor, train_labels: torch.Tensor, num_classes: int, epochs: int = 100,
                 lr: float = 0.1, batch_size: int = 256, weight_decay: float = 0.0, seed: int = 0) -> nn.Module:
    """Train ``Linear(standardise(x))`` with SGD + nesterov and a cosine schedule; return it in eval mode.

    Standardising with the train statistics is the BatchNorm-without-affine that linear-eval recipes put
    before the classifier; on cached features it makes one lr work across backbones.
    """
    device = train_feats.device
    g = torch.Generator(device="cpu").manual_seed(seed)
    mean, std = train_feats.mean(0), train_feats.std(0).clamp_min(1e-6)
    with torch.random.fork_rng(devices=[]):  # the init depends on the seed alone, not on what ran before
        torch.manual_seed(seed)
        clf = nn.Linear(train_feats.shape[1], num_classes).to(device)
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    x_all, y_all = (train_feats - mean) / std, train_labels.to(device)
    n = x_all.shape[0]
    steps = epochs * max(1, n // batch_size)
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g).to(device)
        for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            for group in opt.param_groups:
                group["lr"] = lr * lr_factor(step / steps, 0.0, 0.0)
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(clf(x_all[idx]), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return _Standardised(clf, mean, std).eval()


class _Standardised(nn.Module):
    def __init__(self, linear: nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.linear = linear
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((x - self.mean) / self.std)
