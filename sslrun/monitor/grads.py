"""Gradient magnitudes per layer, read after backward and kept on the device until the next log step."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

INF = float("inf")


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _unwrap(module: nn.Module, prefix: str) -> tuple[nn.Module, str]:
    """Descend through wrappers with a single parameterised child and no parameters of their own (ResNet's
    ``net``): the layers are that child's children."""
    while not _has_params_own(module):
        children = [(n, c) for n, c in module.named_children() if _has_params(c)]
        if len(children) != 1:
            break
        name, module = children[0]
        prefix = f"{prefix}.{name}"
    return module, prefix


def _has_params_own(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def _layer_path(root: nn.Module, name: str, depth: int | str) -> str:
    """The layer a parameter of ``root`` is reported under: its module path cut to ``depth`` components.
    ``auto`` = the top-level children, with a ModuleList's items as layers of their own (a ViT's
    ``blocks.3``), since a stack of blocks is where one wants one curve per block."""
    comps = name.split(".")
    if depth == "auto":
        depth = 2 if len(comps) > 2 and isinstance(root.get_submodule(comps[0]), nn.ModuleList) else 1
    return ".".join(comps[:min(int(depth), len(comps) - 1)] or comps)  # a top-level parameter (cls_token): itself


def layer_names(method: nn.Module, backbone: nn.Module, depth: int | str = "auto") -> list[tuple[str, nn.Parameter]]:
    """Every trainable parameter of ``method`` with the layer it is reported under: ``backbone.<layer>``
    for the backbone's, the method's top-level module (``projector``, ``predictor``) for the heads'."""
    root, prefix = _unwrap(backbone, "backbone")
    out = [(f"{prefix}.{_layer_path(root, n, depth)}", p) for n, p in root.named_parameters() if p.requires_grad]
    seen = {id(p) for p in backbone.parameters()}
    for n, p in method.named_parameters():
        if p.requires_grad and id(p) not in seen:
            out.append((n.split(".", 1)[0], p))
    return out


@dataclass
class GradStats:
    """One step's gradient magnitudes, on the device: ``flat`` = [l2_total, linf first layer, linf last
    layer, l2 per layer..., linf per layer...]; ``linf`` is the per-layer slice."""

    flat: torch.Tensor
    linf: torch.Tensor


class LayerGrads:
    """Reads, per step and without a host sync, the gradient l2 and inf-norms of every layer (see
    ``layer_names``), the total l2 norm, and the inf-norms of the backbone's ``first_layer`` and
    ``last_layer`` (the MoCo v3 curves).

    Cost: two fused ``torch._foreach_norm`` calls over all gradients (ord 2 and ord inf: the inf-norm
    kernel reads the gradients in place, where ``abs`` + ``_foreach_max`` would first copy them all),
    then one scatter per statistic to reduce per-tensor norms to per-layer ones.
    """

    fixed = ("l2_total", "linf/first_layer", "linf/last_layer")

    def __init__(self, method: nn.Module, backbone: nn.Module, depth: int | str = "auto") -> None:
        named = layer_names(method, backbone, depth)
        self.layers: list[str] = list(dict.fromkeys(n for n, _ in named))
        self.params = [p for _, p in named]
        self._layer_of = [self.layers.index(n) for n, _ in named]
        first = {id(p) for p in backbone.get_submodule(backbone.first_layer).parameters()}
        last = {id(p) for p in backbone.get_submodule(backbone.last_layer).parameters()}
        self._in_first = [id(p) in first for p in self.params]
        self._in_last = [id(p) in last for p in self.params]
        self._present: tuple[int, ...] | None = None
        self._index: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.layers)

    def _grads(self) -> list[torch.Tensor]:
        # The set of parameters with a gradient can change (a head frozen for the first epoch): the
        # index tensors are rebuilt only when it does.
        present = tuple(i for i, p in enumerate(self.params) if p.grad is not None)
        if present != self._present:
            dev = self.params[0].device

            def index(values: list[int]) -> torch.Tensor:
                return torch.tensor(values, dtype=torch.long, device=dev)

            self._index = {"layer": index([self._layer_of[i] for i in present]),
                           "first": index([k for k, i in enumerate(present) if self._in_first[i]]),
                           "last": index([k for k, i in enumerate(present) if self._in_last[i]])}
            self._present = present
        return [self.params[i].grad for i in present]

    @torch.no_grad()
    def __call__(self) -> GradStats:
        grads = self._grads()
        dev = self.params[0].device
        n = len(self.layers)
        if not grads:
            zeros = torch.zeros(3 + 2 * n, device=dev)
            return GradStats(zeros, zeros[3 + n:])
        l2 = torch.stack(torch._foreach_norm(grads)).float()
        linf = torch.stack(torch._foreach_norm(grads, INF)).float()
        idx = self._index
        layer_l2 = torch.zeros(n, device=dev).index_add_(0, idx["layer"], l2.square()).sqrt_()
        layer_linf = torch.zeros(n, device=dev).scatter_reduce_(0, idx["layer"], linf, "amax")  # norms are >= 0
        side = [linf[idx[k]].amax() if idx[k].numel() else torch.zeros((), device=dev) for k in ("first", "last")]
        flat = torch.cat([l2.square().sum().sqrt().reshape(1), torch.stack(side), layer_l2, layer_linf])
        return GradStats(flat, flat[3 + n:])

    @torch.no_grad()
    def scale_(self, layer_scale: torch.Tensor) -> None:
        """Multiply each layer's gradients by its factor in ``layer_scale`` [layers], on the device."""
        grads = self._grads()
        if grads:
            torch._foreach_mul_(grads, list(layer_scale[self._index["layer"]].unbind()))
