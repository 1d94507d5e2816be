"""The supervised baseline: cross-entropy on the labels, with the same backbone, views and optimizer groups as the
self-supervised methods, so that its probes sit in the same tables (the upper bound every SSL table prints). It keeps
its classifier, so that a distillation run can use it as a teacher (``sslrun.methods.distill``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SslrunError
from .base import FitInfo, Method


def classifier_head(in_dim: int, num_classes: int, hidden_dim: int, dropout: float) -> nn.Sequential:
    """``Linear(in_dim, num_classes)``, or with ``hidden_dim > 0`` Linear-ReLU-Dropout-Linear (the PyTorch
    distillation tutorial's DeepNN and LightNN heads: 2048->512->10 and 1024->256->10, dropout 0.1)."""
    if hidden_dim <= 0:
        return nn.Sequential(nn.Linear(in_dim, num_classes))
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Dropout(dropout),
                         nn.Linear(hidden_dim, num_classes))


class LabelsByIndex(nn.Module):
    """The pretraining set's labels [N] (-1 = unlabeled), kept on the method's device and read by the batch's
    dataset ``index``; refuses a set without a single label."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("labels", torch.empty(0, dtype=torch.long), persistent=False)

    def fit(self, info: FitInfo, num_classes: int, who: str) -> None:
        labels = info.labels
        if labels is None or not bool((labels >= 0).any()):
            raise SslrunError(f"{who} trains on labels, but this dataset's pretraining set has none (every label "
                              "is -1, as in STL-10's unlabeled split, or the dataset gives no labels). Pick a "
                              "labelled dataset, or a self-supervised method.")
        if int(labels.max()) >= num_classes:
            raise SslrunError(f"The dataset has labels up to {int(labels.max())}, but method.num_classes={num_classes}."
                              f" Set method.num_classes={int(labels.max()) + 1} (the dataset's class count).")
        self.labels = labels.to(self.labels.device, torch.long)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.labels[index.to(self.labels.device)]


class Supervised(Method):
    """Cross-entropy on the labels of the pretraining set, on the first view of the batch.

    Args:
        backbone: any sslrun backbone (``feat_dim`` wide features).
        num_classes: classifier outputs; must cover the dataset's labels.
        hidden_dim: 0 for a linear classifier, else the hidden width of a two-layer head.
        dropout: dropout before the head's last layer (with ``hidden_dim > 0``).

    ``forward`` returns ``loss`` (mean cross-entropy in nats over the first view, unlabeled samples with label -1
    ignored; further views are ignored), ``z`` = backbone features [B, feat_dim], and ``accuracy`` (top-1 on the batch, logged as
    ``train/accuracy``). ``logits(x)`` gives the classifier's output [B, num_classes], which distillation reads.
    """

    num_large_crops = 1      # only the first view is used (checked by Method.check_setup)
    unused_views_ok = True

    def __init__(self, backbone: nn.Module, num_classes: int, hidden_dim: int, dropout: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.classifier = classifier_head(backbone.feat_dim, num_classes, hidden_dim, dropout)
        self.targets = LabelsByIndex()

    def on_fit_start(self, info: FitInfo) -> None:
        self.targets.fit(info, self.num_classes, "method=supervised")

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(x))

    def forward(self, views: list[torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(views[0])
        logits = self.classifier(feats).float()
        y = self.targets(index)
        # Sum over the labelled samples divided by their count (at least 1): a batch of only unlabeled
        # samples (STL-10) gives 0, not mean cross-entropy's 0/0, and no host sync is needed to tell.
        labelled = (y >= 0).sum().clamp_min(1)
        loss = F.cross_entropy(logits, y, ignore_index=-1, reduction="sum") / labelled
        acc = (logits.argmax(1) == y).sum() / labelled  # a prediction is never -1
        return {"loss": loss, "z": feats, "accuracy": acc}
