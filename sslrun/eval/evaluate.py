"""The probes a run ends with (and the per-epoch kNN monitor): kNN and linear on frozen features."""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from .. import dist
from ..data.image_set import DatasetSplits
from .features import extract_features
from .knn import knn_predict, topk_accuracy
from .adapt import adapt_on_corruptions
from .linear import train_linear


def frozen_features(backbone: nn.Module, images: torch.Tensor, splits: DatasetSplits, device: torch.device,
                    batch_size: int, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Features [N, D] of ``images`` in order; with several processes each extracts one shard and all get every
    row. Rank 0's buffers (batch-norm statistics) are used everywhere, so the shards come from one network."""
    if dist.world_size() > 1:
        for buf in backbone.buffers():
            dist.broadcast(buf)
    return dist.map_sharded(images.shape[0], lambda lo, hi: extract_features(
        backbone, images[lo:hi], splits.mean, splits.std, device, batch_size, autocast_dtype))


def evaluate(backbone: nn.Module, splits: DatasetSplits, cfg: DictConfig, device: torch.device,
             autocast_dtype: torch.dtype | None = None, seed: int = 0,
             classifier: nn.Module | None = None) -> dict[str, float]:
    """kNN and linear-probe top-1/top-5 on the test split, from features extracted once, and with a method's own
    ``classifier`` (supervised, distillation: a head on the backbone's features) its top-1/top-5 as
    ``classifier_top1/5``.

    ``seed`` fixes the linear probe (its init and shuffles), so a training run's evaluation and an
    ``eval.only`` run of its checkpoint give the same numbers.
    """
    train_f, test_f = (frozen_features(backbone, s.images, splits, device, cfg.batch_size, autocast_dtype)
                       for s in (splits.train, splits.test))
    results: dict[str, float] = {}
    if not dist.is_main():  # the probes run once, on rank 0, which reports them
        return results
    if cfg.knn.enabled:
        scores = knn_predict(train_f, splits.train.labels, test_f, splits.num_classes, cfg.knn.k,
                             cfg.knn.temperature, cfg.knn.backend)
        acc = topk_accuracy(scores, splits.test.labels)
        results.update(knn_top1=acc[1], knn_top5=acc[5])
    if cfg.linear.enabled:
        clf = train_linear(train_f, splits.train.labels, splits.num_classes, cfg.linear.epochs, cfg.linear.lr,
                           cfg.linear.batch_size, cfg.linear.weight_decay, seed)
        with torch.no_grad():
            acc = topk_accuracy(clf(test_f), splits.test.labels)
        results.update(linear_top1=acc[1], linear_top5=acc[5])
    if classifier is not None:
        was = classifier.training
        with torch.no_grad():
            acc = topk_accuracy(classifier.eval()(test_f.to(next(classifier.parameters()).device)).float(),
                                splits.test.labels)
        classifier.train(was)
        results.update(classifier_top1=acc[1], classifier_top5=acc[5])
    if cfg.tta.method != "none":  # test-time adaptation of the linear-probed model on corrupted test sets
        results.update(adapt_on_corruptions(backbone, clf if cfg.linear.enabled else None, splits, cfg.tta, device))
    return results
