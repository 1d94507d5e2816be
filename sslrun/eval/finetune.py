"""Semi-supervised evaluation (SimCLR v2, Chen et al., NeurIPS 2020, Sec. 3 and Appendix B.4): fine-tune the
whole pretrained network plus a new linear classifier on 1% and 10% of the labels, then classify the test split.

The recipe follows the official code's semi-supervised command (google-research/simclr, tf2/README.md,
"fine-tuning the whole network"): LARS with lr 0.005 x sqrt(batch), no weight decay, no warmup, a cosine
schedule, a zero-initialised classifier (``zero_init_logits_layer``), random-resized crops and horizontal
flips as the only augmentation, 60 epochs on 1% of the labels and 30 on 10%. Every knob is a key of
``eval.finetune`` (conf/eval/default.yaml), where the defaults live.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..data.augment import ViewGenerator, normalize
from ..data.image_set import DatasetSplits
from ..engine.lars import LARS
from ..engine.optim import lr_factor
from ..errors import SslrunError
from .features import extract_features
from .knn import topk_accuracy


def balanced_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices of a class-balanced ``fraction`` of the labelled samples, the same for the same ``seed``.

    Every class present (labels >= 0; -1 marks unlabeled images) gets ``round(fraction * N / C)`` samples,
    at least 1, drawn without replacement; a class with fewer samples gives all it has. This is how the
    1% and 10% ImageNet subsets of SimCLR are built (about 12.8 and 128 images per class).

    Args:
        labels: class indices, -1 for unlabeled.
        fraction: share of the labelled samples to keep, in (0, 1].
        seed: picks the samples.

    Shape:
        labels: [N]; returns [M], sorted.
    """
    if not 0 < fraction <= 1:
        raise SslrunError(f"eval.finetune.fractions holds {fraction}: each fraction of the labels must be in (0, 1].")
    classes = labels[labels >= 0].unique().tolist()
    if not classes:
        raise SslrunError("eval.finetune needs a labelled train split, but every train label is -1 (unlabeled).")
    per_class = max(1, round(fraction * int((labels >= 0).sum()) / len(classes)))
    generator = torch.Generator().manual_seed(seed)
    picked = []
    for c in classes:  # sorted by unique(): the draw order, hence the subset, depends only on the seed
        members = (labels == c).nonzero().flatten()
        picked.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return torch.cat(picked).sort().values


def fraction_key(fraction: float) -> str:
    """``0.01 -> "1pct"``, ``0.1 -> "10pct"``, ``0.005 -> "0.5pct"``: the metric-name part of a fraction."""
    return f"{round(fraction * 100, 6):g}pct"


class _Classifier(nn.Module):
    """The fine-tuned network: the pretrained trunk and a new linear layer on its output."""

    def __init__(self, trunk: nn.Module, feat_dim: int, num_classes: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(feat_dim, num_classes)
        nn.init.zeros_(self.head.weight)  # SimCLR v2's zero_init_logits_layer: start from uniform predictions
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def _optimizer(model: _Classifier, cfg: DictConfig, lr: float) -> torch.optim.Optimizer:
    # As the official LARS (model_util.get_optimizer: exclude_from_weight_decay=['batch_normalization', 'bias',
    # 'head_supervised'], which also excludes them from the adaptation): the new classifier, biases and norm
    # scales (1-d) take plain momentum steps without weight decay. A zero-initialised head under LARS' trust
    # ratio would barely move.
    decay = [p for p in model.trunk.parameters() if p.ndim > 1]
    plain = [p for p in model.trunk.parameters() if p.ndim <= 1] + list(model.head.parameters())
    if cfg.optimizer == "lars":
        groups = [{"params": decay}, {"params": plain, "weight_decay": 0.0, "lars_exclude": True}]
        return LARS(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, eta=cfg.lars_eta)
    if cfg.optimizer == "sgd":
        groups = [{"params": decay}, {"params": plain, "weight_decay": 0.0}]
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    raise SslrunError(f"eval.finetune.optimizer={cfg.optimizer!r} is not a valid choice; use one of: lars, sgd.")


def _check(cfg: DictConfig) -> None:
    if len(cfg.epochs) != len(cfg.fractions):
        raise SslrunError(f"eval.finetune.epochs={list(cfg.epochs)} must give one epoch count per fraction in "
                          f"eval.finetune.fractions={list(cfg.fractions)}.")
    for key in ("batch_size", "lr"):
        if not cfg[key] > 0:
            raise SslrunError(f"eval.finetune.{key}={cfg[key]} must be positive.")
    if any(not isinstance(e, int) or e < 1 for e in cfg.epochs):
        raise SslrunError(f"eval.finetune.epochs={list(cfg.epochs)} must be positive integers, one per fraction.")


def finetune_once(trunk: nn.Module, splits: DatasetSplits, index: torch.Tensor, epochs: int, cfg: DictConfig,
                  device: torch.device, autocast_dtype: torch.dtype | None = None) -> nn.Module:
    """Fine-tune a copy of ``trunk`` plus a new linear classifier on ``splits.train[index]``; return it in eval mode.

    ``trunk`` itself is never modified. The lr is ``cfg.lr * sqrt(batch)`` (SimCLR v2's square-root scaling),
    cosine-annealed to 0 over ``epochs``; each epoch is one pass over the subset in shuffled batches (a last
    batch of one image is dropped: batch norm cannot train on it).

    Args:
        trunk: maps normalised images [B,C,H,W] to features [B,D].
        index: the labelled train images to fine-tune on, e.g. from ``balanced_subset``.
        epochs: passes over those images.

    Shape:
        the returned module maps [B,C,H,W] to class logits [B, num_classes].
    """
    if len(index) < 2:
        raise SslrunError(f"eval.finetune has {len(index)} labelled image(s) to fine-tune on: raise the fraction.")
    g = torch.Generator().manual_seed(cfg.seed)
    images, labels = splits.train.images[index], splits.train.labels[index].to(device)
    trunk = copy.deepcopy(trunk).to(device).requires_grad_(True)  # the whole network trains, frozen parts too
    with torch.no_grad():
        probe = normalize(splits.train.images[:2].to(device), splits.mean, splits.std)
        feat_dim = trunk.eval()(probe).shape[1]
    model = _Classifier(trunk, feat_dim, splits.num_classes).to(device).train()
    batch = min(cfg.batch_size, len(index))
    base_lr = cfg.lr * math.sqrt(batch)
    opt = _optimizer(model, cfg, base_lr)
    view = {"count": 1, "size": None, "scale": list(cfg.scale), "ratio": list(cfg.ratio), "hflip": cfg.hflip}
    augment = ViewGenerator([view], splits.mean, splits.std)
    aug_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    steps_per_epoch = math.ceil(len(index) / batch)
    total, step = epochs * steps_per_epoch, 0
    for _ in range(epochs):
        perm = torch.randperm(len(index), generator=g)
        for i in range(0, len(index), batch):
            idx = perm[i:i + batch]
            if len(idx) < 2:
                continue
            for group in opt.param_groups:
                group["lr"] = base_lr * lr_factor(step / total, 0.0, 0.0)
            x = augment(images[idx].to(device), aug_gen)[0]
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), labels[idx.to(device)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    if not math.isfinite(loss.item()):
        raise SslrunError(f"Fine-tuning diverged (loss {loss.item()}): lower eval.finetune.lr (now {cfg.lr}).")
    return model.eval()


def finetune_eval(backbone: nn.Module, splits: DatasetSplits, cfg_finetune: DictConfig | Mapping,
                  device: torch.device, autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """SimCLR v2's semi-supervised protocol: for each fraction in ``cfg_finetune.fractions``, fine-tune a copy of
    ``backbone`` and a new linear classifier on a class-balanced subset of the train labels (``balanced_subset``
    with ``cfg_finetune.seed``), then report top-1/top-5 on the un-augmented test split.

    Args:
        backbone: the pretrained network, normalised images [B,C,H,W] -> features [B,D] (for SimCLR v2 the
            backbone and the projector's first layer). Left unchanged.
        cfg_finetune: the ``eval.finetune`` node.

    Returns:
        ``{"finetune_1pct_top1": ..., "finetune_1pct_top5": ..., "finetune_10pct_top1": ..., ...}``, fractions of
        the test images in [0, 1].
    """
    cfg = cfg_finetune if isinstance(cfg_finetune, DictConfig) else OmegaConf.create(dict(cfg_finetune))
    _check(cfg)
    results: dict[str, float] = {}
    for fraction, epochs in zip(cfg.fractions, cfg.epochs):
        index = balanced_subset(splits.train.labels, fraction, cfg.seed)
        model = finetune_once(backbone, splits, index, epochs, cfg, device, autocast_dtype)
        logits = extract_features(model, splits.test.images, splits.mean, splits.std, device, cfg.batch_size,
                                  autocast_dtype)
        acc = topk_accuracy(logits, splits.test.labels)
        key = fraction_key(fraction)
        results.update({f"finetune_{key}_top1": acc[1], f"finetune_{key}_top5": acc[5]})
    return results

