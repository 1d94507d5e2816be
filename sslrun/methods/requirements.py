"""What a method needs of the run's batch and views, checked before training (``Method.check_setup``).

A config that does not fit a method must stop with one paragraph, not train to a wrong answer: at batch 1
SimCLR's loss is exactly 0 (no negatives), and SwAV given one large crop would code a small crop as its
second. Each check names the method, the key to change, its value and the fix.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import dist
from ..errors import SslrunError


def _sizes(view_sizes: list[int]) -> str:
    return "[" + ", ".join(f"{s}" for s in view_sizes) + "] px"


def check_batch(method: nn.Module, name: str, global_batch: int) -> None:
    """The global batch against the method's ``min_batch_size`` and the per-process batch against batch norm."""
    world = dist.world_size()
    if global_batch % world:
        raise SslrunError(f"trainer.batch_size={global_batch} is the global batch, split evenly over {world} "
                          f"processes; set it to a multiple of {world}.")
    if global_batch < method.min_batch_size:
        raise SslrunError(f"{name} needs a batch of at least {method.min_batch_size} images "
                          f"({method.min_batch_reason}), but trainer.batch_size={global_batch}; set "
                          f"trainer.batch_size={max(method.min_batch_size, 256)} or at least {method.min_batch_size}.")
    per_process = global_batch // world
    if per_process < 2 and any(isinstance(m, _BatchNorm) for m in method.modules()):
        raise SslrunError(f"{name}'s networks use batch norm, which needs at least 2 images per process (one image's "
                          f"statistics are degenerate), but trainer.batch_size={global_batch} gives {per_process} "
                          f"to each of {world} process(es); set trainer.batch_size to at least {2 * world}.")


def check_views(method: nn.Module, name: str, view_sizes: list[int]) -> None:
    """The views (output crop sizes, in the order the augmentation makes them, large crops first) against
    the method's ``num_large_crops``, ``equal_large_crops``, ``small_crops`` and ``unused_views_ok``, and every
    crop size against the backbone's ``patch_size`` (a ViT drops the pixels a patch does not cover)."""
    n_large, given = method.num_large_crops, len(view_sizes)
    if given < n_large:
        raise SslrunError(f"{name} needs {n_large} large crop(s) (views at full size, first), but the augmentation "
                          f"makes {given} view(s) {_sizes(view_sizes)}; set augmentation.views.0.count={n_large} "
                          f"or pick an augmentation with {n_large} views (e.g. augmentation=simclr).")
    large, rest = view_sizes[:n_large], view_sizes[n_large:]
    unequal = method.equal_large_crops and len(set(large)) > 1
    if unequal or (method.small_crops and rest and max(rest) > min(large)):
        raise SslrunError(f"{name} takes its first {n_large} views as its large crops, which must share the "
                          f"largest size (its loss pairs them), but the augmentation makes {_sizes(view_sizes)}. "
                          f"If the first recipe makes fewer than {n_large}, set augmentation.views.0.count={n_large}; "
                          f"otherwise give those views one size with augmentation.views.N.size (N = their recipe).")
    if rest and not (method.small_crops or method.unused_views_ok):
        raise SslrunError(f"{name} uses {n_large} view(s), but the augmentation makes {given} {_sizes(view_sizes)}: "
                          f"{len(rest)} would be computed and ignored ({name} does not use multi-crop). Drop them: "
                          f"set augmentation.views.N.count=0 for the extra recipes, or pick augmentation=simclr.")
    patch = getattr(method.backbone, "patch_size", None)
    used = view_sizes if method.small_crops else large
    bad = sorted({s for s in used if patch and s % patch})
    if bad:
        raise SslrunError(f"The ViT backbone cuts images into {patch}-px patches (backbone.patch_size={patch}), so "
                          f"every crop size must be a multiple of {patch}, but the augmentation makes "
                          f"{_sizes(view_sizes)} ({', '.join(map(str, bad))} px would lose the pixels no patch "
                          f"covers); set augmentation.views.N.size to a multiple of {patch}, or change "
                          "backbone.patch_size.")
