"""MLP heads shared by the methods (projectors and predictors)."""

from __future__ import annotations

from torch import nn


def mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, last_bn: bool = False,
        last_bn_affine: bool = True, hidden_bn: bool = True) -> nn.Sequential:
    """Linear-(BN)-ReLU blocks then a final Linear, optionally followed by BN.

    ``last_bn`` covers SimSiam's projector (BN on the output) and MoCo v3's (BN without affine).
    """
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        layers += [nn.Linear(dim, hidden_dim, bias=not hidden_bn)]
        if hidden_bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.ReLU(inplace=True))
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=not last_bn))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=last_bn_affine))
    return nn.Sequential(*layers)
