"""Zero-shot classification (CLIP, Radford et al., 2021, Sec. 3.1): the test images' embeddings scored against
the text embeddings of prompts naming each class ("a photo of a {}.", several templates averaged, as in
CLIP's prompt-engineering notebook), with no training on the labels."""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from ..data.image_set import DatasetSplits
from .features import extract_features
from .knn import topk_accuracy


class _ImageTower(nn.Module):
    """A method's ``encode_image`` as a module, so that feature extraction can run it like a backbone."""

    def __init__(self, method: nn.Module) -> None:
        super().__init__()
        self.method = method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.encode_image(x)


def zero_shot_scores(image_embeddings: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every image to every class, [N, C], from l2-normalised [N, D] and [C, D]."""
    return image_embeddings.float() @ class_embeddings.float().T


def zero_shot_eval(method: nn.Module, splits: DatasetSplits, cfg: DictConfig, device: torch.device,
                   autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """``zeroshot_top1``/``zeroshot_top5`` on the test split, for a method with a text tower.

    Args:
        method: has ``zero_shot_head(class_names, templates) -> [C, D]`` and ``encode_image(x) -> [B, D]``,
            both l2-normalised (``sslrun.methods.clip.CLIP``); any other method gives ``{}``.
        splits: the class names are ``splits.classes``, in label order.
        cfg: the ``eval`` node: ``zero_shot.enabled``, ``zero_shot.templates`` (each with one ``{}`` for the class
            name) and ``batch_size`` (feature extraction).

    Returns:
        fractions of the test images in [0, 1]; ``{}`` when disabled, the method has no text tower, or the
        dataset has no class names.
    """
    if not cfg.zero_shot.enabled or not hasattr(method, "zero_shot_head") or not splits.classes:
        return {}
    was_training = method.training
    method.eval()
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        head = method.zero_shot_head(list(splits.classes), list(cfg.zero_shot.templates))
    method.train(was_training)
    images = extract_features(_ImageTower(method), splits.test.images, splits.mean, splits.std, device,
                              cfg.batch_size, autocast_dtype)
    acc = topk_accuracy(zero_shot_scores(images, head), splits.test.labels)
    return {"zeroshot_top1": acc[1], "zeroshot_top5": acc[5]}
