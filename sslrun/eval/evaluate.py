"""The probes a run ends with (and the per-epoch kNN monitor): kNN and linear on frozen features."""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from ..data.image_set import DatasetSplits, ImageSet
from .features import extract_features
from .knn import knn_predict, topk_accuracy
from .linear import train_linear


def knn_accuracy(backbone: nn.Module, bank: ImageSet, queries: ImageSet, splits: DatasetSplits,
                 device: torch.device, k: int, temperature: float, backend: str = "torch",
                 batch_size: int = 512, autocast_dtype: torch.dtype | None = None) -> dict[int, float]:
    feats = [extract_features(backbone, s.images, splits.mean, splits.std, device, batch_size, autocast_dtype)
             for s in (bank, queries)]
    scores = knn_predict(feats[0], bank.labels, feats[1], splits.num_classes, k, temperature, backend)
    return topk_accuracy(scores, queries.labels)


def evaluate(backbone: nn.Module, splits: DatasetSplits, cfg: DictConfig, device: torch.device,
             autocast_dtype: torch.dtype | None = None, seed: int = 0,
             classifier: nn.Module | None = None) -> dict[str, float]:
    """kNN and linear-probe top-1/top-5 on the test split, from features extracted once, and with a method's own
    ``classifier`` (supervised, distillation: a head on the backbone's features) its top-1/top-5 as
    ``classifier_top1/5``.

    ``seed`` fixes the linear probe (its init and shuffles), so a training run's evaluation and an
    ``eval.only`` run of its checkpoint give the same numbers.
    """
    train_f, test_f = (extract_features(backbone, s.images, splits.mean, splits.std, device, cfg.batch_size,
                                        autocast_dtype) for s in (splits.train, splits.test))
    results: dict[str, float] = {}
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
    return results
