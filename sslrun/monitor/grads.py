"""Gradient magnitudes read after backward, kept on the device until the next log step."""

from __future__ import annotations

import torch
from torch import nn


def _params(module: nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.grad is not None]


def _linf(module: nn.Module) -> torch.Tensor:
    grads = [p.grad.abs().max().float() for p in _params(module)]
    return torch.stack(grads).max() if grads else torch.zeros(())  # a frozen layer has no gradient


class GradNorms:
    """Collects, per step and without a host sync, the total l2 norm and the inf-norms of the first
    and last layers of the backbone (named by the backbone's ``first_layer``/``last_layer``)."""

    names = ("l2_total", "linf/first_layer", "linf/last_layer")

    def __init__(self, model: nn.Module, backbone: nn.Module) -> None:
        self.model = model
        self.first_module = backbone.get_submodule(backbone.first_layer)
        self.last_module = backbone.get_submodule(backbone.last_layer)

    @torch.no_grad()
    def __call__(self) -> torch.Tensor:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        l2 = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        return torch.stack([l2, _linf(self.first_module), _linf(self.last_module)])
