"""CPC v2 (Hénaff, Srinivas, De Fauw, Razavi, Doersch, Eslami & van den Oord, ICML 2020, "Data-Efficient Image
Recognition with Contrastive Predictive Coding"): predict the embeddings of an image's lower patches from a
causal summary of the patches above, and tell them apart from every other patch of the batch.

- The image is cut into an overlapping grid of patches (the paper: 64-px patches at a 32-px stride of a 256-px
  image, a 7x7 grid); each patch is encoded alone by the backbone into ``z[i, j]`` (its pooled features).
- The backbone's batch norm is replaced by layer norm (per sample: ``GroupNorm(1, C)`` for conv features,
  ``LayerNorm`` for vectors; ``norm=layer``, the paper's "+LN"): batch statistics are shared by the patches of an
  image, so a patch's embedding would carry information about the patches it is asked to predict.
- A context network of masked (PixelCNN-style) convolutions reads the grid: ``c[i, j]`` depends on the rows
  ``<= i`` only (each convolution sees its own row and the rows above, never below).
- ``W_k c[i, j]`` predicts ``z[i+k, j]`` for ``k`` = ``min_steps`` .. ``max_steps``. The paper's InfoNCE:
  ``-log exp(zhat . z+) / sum_l exp(zhat . z_l)`` where ``z_l`` runs over every patch of the (global) batch, the
  positive among them; averaged over all predictions. Patches overlap by half, so the row right below shares half
  its pixels with the context's own row: ``min_steps = 2`` predicts from the first row that shares none (CPC v1's
  image setup skips that row as well).
- ``directions = 4`` repeats this on the grid rotated by 90, 180 and 270 degrees (the paper's bottom-up and
  horizontal predictions), each direction with its own context network and predictors.
The probes read the mean of the patch features over the grid (:class:`PatchPooled`), as the paper's linear
evaluation does. Not reproduced: the per-patch augmentations (+PA) and the paper's exact context-network depth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import dist
from ..errors import SslrunError
from .base import Method
from .losses import in_fp32


def batchnorm_to_layernorm(module: nn.Module) -> nn.Module:
    """Replace every batch norm of ``module`` in place by its per-sample counterpart and return ``module``:
    ``BatchNorm2d(C)`` -> ``GroupNorm(1, C)`` (layer norm over C, H, W), ``BatchNorm1d(C)`` -> ``LayerNorm(C)``,
    keeping ``affine``. No statistic is then shared between the samples (patches) of a batch."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.GroupNorm(1, child.num_features, eps=child.eps, affine=child.affine))
        elif isinstance(child, nn.BatchNorm1d):
            setattr(module, name, nn.LayerNorm(child.num_features, eps=child.eps, elementwise_affine=child.affine))
        elif isinstance(child, _BatchNorm):
            raise SslrunError(f"CPC's method.norm=layer cannot convert {type(child).__name__} in the backbone; use "
                              "method.norm=batch or a backbone with 1-d or 2-d batch norm.")
        else:
            batchnorm_to_layernorm(child)
    return module


def patch_grid(x: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """The overlapping ``size`` x ``size`` patches of images at ``stride`` px, row by row.

    Shape:
        x: [N, C, H, W]; output: [N, rows, cols, C, size, size] with rows = (H - size) // stride + 1 (cols alike).
    """
    if x.shape[-1] < size or x.shape[-2] < size:
        raise SslrunError(f"CPC cuts images into patches of method.patch_size={size} px, larger than these "
                          f"{x.shape[-2]}x{x.shape[-1]} images; lower method.patch_size (and patch_stride).")
    return x.unfold(2, size, stride).unfold(3, size, stride).permute(0, 2, 3, 1, 4, 5)


class PatchPooled(nn.Module):
    """Image -> the backbone's features of each patch of the grid (:func:`patch_grid`), as a grid or mean-pooled.

    ``forward`` is what the probes evaluate: [N, C, H, W] -> [N, ``feat_dim``], the patch features averaged over
    the grid. ``grid`` gives them per patch: [N, ``feat_dim``, rows, cols].
    """

    def __init__(self, backbone: nn.Module, patch_size: int, patch_stride: int) -> None:
        super().__init__()
        self.backbone, self.patch_size, self.patch_stride = backbone, patch_size, patch_stride
        self.feat_dim = backbone.feat_dim

    def grid(self, x: torch.Tensor) -> torch.Tensor:
        patches = patch_grid(x, self.patch_size, self.patch_stride)
        n, rows, cols = patches.shape[:3]
        try:
            z = self.backbone(patches.reshape(n * rows * cols, *patches.shape[3:]))
        except RuntimeError as e:
            raise SslrunError(f"CPC encodes {self.patch_size}-px patches with the backbone, which cannot take them "
                              f"({str(e).splitlines()[0]}). Use a backbone that accepts small inputs (small_cnn, a "
                              "ResNet with the CIFAR stem; a ViT needs backbone.image_size equal to "
                              "method.patch_size), or change method.patch_size.") from e
        return z.view(n, rows, cols, -1).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.grid(x).mean(dim=(2, 3))


class CausalConv2d(nn.Conv2d):
    """A convolution over a grid whose output at row ``i`` reads input rows ``i - kernel_rows + 1 .. i`` only
    (the masked convolution of PixelCNN, with the mask folded into one-sided padding); full width, zero-padded."""

    def __init__(self, channels: int, out_channels: int, kernel_rows: int = 2, kernel_cols: int = 3) -> None:
        super().__init__(channels, out_channels, (kernel_rows, kernel_cols))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = self.kernel_size
        return super().forward(F.pad(x, (cols // 2, cols // 2, rows - 1, 0)))


class ContextBlock(nn.Module):
    """A residual block of the context network: ReLU, 1x1 conv to ``hidden``, ReLU, causal conv, ReLU, 1x1 conv back."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, hidden, 1), nn.ReLU(), CausalConv2d(hidden, hidden),
                                  nn.ReLU(), nn.Conv2d(hidden, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


@in_fp32
def cpc_infonce(predictions: torch.Tensor, candidates: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """CPC's InfoNCE, averaged over the predictions: ``-log exp(p . z+) / sum_l exp(p . z_l)``, dot products
    without normalisation or temperature, as in the paper.

    Args:
        predictions: the predicted embeddings ``W_k c``.
        candidates: every patch embedding of the batch (the positives among them).
        positive: for each prediction, the row of ``candidates`` it should pick.

    Shape:
        predictions: [Q, D]; candidates: [M, D]; positive: [Q] (long); output: scalar.
    """
    return F.cross_entropy(predictions @ candidates.T, positive)


class CPCv2(Method):
    """CPC v2 (see the module docstring).

    Args:
        backbone: the patch encoder (``feat_dim`` features); its batch norms become layer norms with ``norm=layer``.
        patch_size, patch_stride: the patch grid in pixels (the paper: 64 and 32 at 256 px).
        norm: ``layer`` (the paper's) or ``batch`` (keep the backbone's batch norm).
        context_blocks, context_hidden_dim: depth and width of the masked context network.
        min_steps, max_steps: predict the patches ``min_steps`` .. ``max_steps`` rows ahead.
        directions: 1 (top to bottom) or 4 (and bottom-up, left-right, right-left: the paper's v2).

    Raises:
        SslrunError: a bad choice of norm, directions or steps, or a patch grid too small to predict anything.

    Source: Hénaff et al., ICML 2020, and van den Oord, Li & Vinyals, 2018 (CPC v1, images).
    """

    num_large_crops = 1      # one image per step, cut into patches
    unused_views_ok = True   # the augmentation's second view is unused
    min_batch_reason = "its negatives include the patches of the other images of the batch"

    def __init__(self, backbone: nn.Module, patch_size: int, patch_stride: int, norm: str, context_blocks: int,
                 context_hidden_dim: int, min_steps: int, max_steps: int, directions: int) -> None:
        super().__init__()
        if norm not in ("layer", "batch"):
            raise SslrunError(f"method.norm={norm!r} is not a valid choice; use one of: layer, batch.")
        if directions not in (1, 4):
            raise SslrunError(f"method.directions={directions} is not a valid choice; use 1 (top to bottom) or 4.")
        if not 1 <= min_steps <= max_steps:
            raise SslrunError(f"CPC predicts the rows min_steps..max_steps ahead, which needs 1 <= min_steps <= "
                              f"max_steps, but method.min_steps={min_steps}, method.max_steps={max_steps}.")
        self.backbone = batchnorm_to_layernorm(backbone) if norm == "layer" else backbone
        self.patches = PatchPooled(self.backbone, patch_size, patch_stride)
        dim = backbone.feat_dim
        self.context = nn.ModuleList(
            nn.Sequential(*(ContextBlock(dim, context_hidden_dim) for _ in range(context_blocks)))
            for _ in range(directions))
        self.steps = list(range(min_steps, max_steps + 1))
        # W_k of each direction: a 1x1 convolution, i.e. one linear map applied at every grid position.
        self.predictors = nn.ModuleList(
            nn.ModuleList(nn.Conv2d(dim, dim, 1) for _ in self.steps) for _ in range(directions))

    def eval_backbone(self) -> nn.Module:
        return self.patches

    def predictions(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All predictions of a grid of embeddings and the flat grid index of the patch each one targets.

        Shape:
            z: [N, D, rows, cols]; output: ([Q, D], [Q]) with indices into the [N * rows * cols] patches in
            (image, row, col) order.
        """
        n, d, rows, cols = z.shape
        ahead = rows if len(self.context) == 1 else min(rows, cols)  # grid length along every direction used
        if self.steps[-1] >= ahead:
            # Every predictor must have a target: one that never does would get no gradient (and DDP stops on it).
            raise SslrunError(f"CPC predicts up to method.max_steps={self.steps[-1]} patches ahead, but the patch grid "
                              f"is {rows}x{cols}; set method.max_steps to at most {ahead - 1}, or cut more patches "
                              "(a smaller method.patch_stride, or larger images).")
        index = torch.arange(n * rows * cols, device=z.device).view(n, 1, rows, cols)
        preds, targets = [], []
        for turn, (context, predictors) in enumerate(zip(self.context, self.predictors)):
            # Direction ``turn``: rotate the grid so that "ahead" is "below" (rot90 keeps the mapping to patches).
            zr, ir = torch.rot90(z, turn, (2, 3)), torch.rot90(index, turn, (2, 3))
            c = context(zr)
            for k, w_k in zip(self.steps, predictors):
                p = w_k(c[:, :, :-k])  # contexts of the rows that have a row k ahead
                preds.append(p.permute(0, 2, 3, 1).reshape(-1, d))
                targets.append(ir[:, :, k:].reshape(-1))
        return torch.cat(preds), torch.cat(targets)

    def forward(self, views: list[torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.patches.grid(views[0])  # one view per image, as in the paper
        preds, targets = self.predictions(z)
        candidates = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        # Every patch of the global batch is a candidate, with its gradient, as in one process holding the batch.
        offset = dist.rank() * candidates.shape[0]
        loss = cpc_infonce(preds, dist.gather_with_grad(candidates), targets + offset)
        return {"loss": loss, "z": z.mean(dim=(2, 3))}
