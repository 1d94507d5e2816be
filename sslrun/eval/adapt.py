"""Test-time adaptation of a linear-probed backbone on shifted test sets: test-time self-distillation (TSD).

Wang et al., "Feature Alignment and Uniformity for Test Time Adaptation", CVPR 2023 (official code:
github.com/SakurajimaMaiii/TSD, ``adapt_algorithm.py``). The model is a featurizer (a copy of the backbone, its
features standardised as the linear probe was trained) and the probe's linear classifier. For each incoming test
batch, online:
  1. z = featurizer(x), p = classifier(z); the batch's features, one-hot predictions, entropies and softmax scores
     join a support memory, which starts from the classifier's weight rows as pseudo-features;
  2. per predicted class the ``filter_K`` supports of lowest entropy are kept (``select_supports``);
  3. prototypes = normalise(supports)^T one-hot labels; the consistency loss is the KL between the softmax of
     cos(z, prototypes) / tau and the model's own scores (``prototype_loss``);
  4. the alignment loss weights, over each sample's ``top_k`` most similar supports, the squared distance between
     its logits and their scores by the similarity, with the official code's sign (``neighbour_alignment_loss``);
  5. one optimiser step on the featurizer (and the classifier with ``update_classifier``); p is the prediction.
Batch norm normalises with each test batch's statistics while adapting (``batch_norm: batch``), as the official
script, which puts the whole model in train mode (``algorithm.train()``). Accuracy is measured before adaptation
(the source model, running statistics), with test-batch statistics alone (``_bn``: Schneider et al., NeurIPS 2020,
"Improving robustness against common corruptions by covariate shift adaptation" — the baseline TSD's gains are
judged against), and online, during TSD, per corruption and severity.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from rich.table import Table
from torch import nn

from ..data.augment import normalize
from ..data.image_set import DatasetSplits
from ..errors import SslrunError
from .corruptions import corrupt

PREFIX = "tta_"
WHEN = ("before", "bn", "after")  # source model; test-batch batch norm alone; during TSD
STAGE = {"before": "source", "bn": "test-batch BN", "after": "TSD"}


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(logits), per row: [N, C] -> [N]."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def select_supports(entropy: torch.Tensor, labels: torch.Tensor, filter_k: int) -> torch.Tensor:
    """Indices of the supports to keep: per predicted class (the argmax of one-hot ``labels`` [M, C]) the ``filter_k``
    of lowest ``entropy`` [M], all of them with ``filter_k = -1``; classes in order, each sorted by entropy."""
    if filter_k == -1:
        return torch.arange(entropy.shape[0], device=entropy.device)
    cls = labels.argmax(1)
    keep = []
    for c in range(labels.shape[1]):
        members = (cls == c).nonzero().flatten()
        keep.append(members[entropy[members].argsort()[:filter_k]])
    return torch.cat(keep)


def prototype_loss(z: torch.Tensor, prototypes: torch.Tensor, scores: torch.Tensor, tau: float) -> torch.Tensor:
    """TSD's consistency loss: sum_c q_c (log q_c - log softmax(scores)_c), q = softmax(cos(z, prototypes) / tau),
    averaged over the batch. As in the official ``softmax_kl_loss(scores, dist)``, the scores (probabilities) pass
    through a log-softmax; the gradient reaches z only. Shapes: z [B, D], prototypes [C, D], scores [B, C]."""
    dist = F.normalize(z, dim=1) @ F.normalize(prototypes, dim=1).T / tau
    return F.kl_div(F.log_softmax(scores.detach(), 1), F.softmax(dist, 1), reduction="none").sum(1).mean()


def neighbour_alignment_loss(z: torch.Tensor, supports: torch.Tensor, support_scores: torch.Tensor,
                             logits: torch.Tensor, k: int) -> torch.Tensor:
    """TSD's top-k term: -mean over samples and their ``k`` most cosine-similar supports of
    sim * ||logits - scores_of_support||^2 (the official ``topk_cluster``: logits against the supports' softmax
    scores, negative sign). z [B, D] carries no gradient (the official code detaches it); logits [B, C] do."""
    sim = F.normalize(z.detach(), dim=1) @ F.normalize(supports, dim=1).T
    top_sim, idx = sim.topk(min(k, supports.shape[0]), dim=1)
    diff = (logits.unsqueeze(1) - support_scores[idx].detach()).square().sum(-1)
    return -(top_sim * diff).mean()


class Standardised(nn.Module):
    """The backbone's features standardised with the linear probe's statistics: the space its weights live in."""

    def __init__(self, backbone: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("std", std.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.backbone(x) - self.mean) / self.std


class TSD:
    """Test-time self-distillation over a featurizer and a linear classifier (adapted in place: pass copies).

    Args:
        featurizer: images [B, C, H, W] -> features [B, D].
        classifier: ``nn.Linear(D, num_classes)``; its weight rows seed the support memory.
        cfg: ``eval.tta`` (``filter_K``, ``top_k``, ``lam``, ``tau``, ``lr``, ``update_classifier``).
    """

    def __init__(self, featurizer: nn.Module, classifier: nn.Linear, cfg: DictConfig) -> None:
        self.featurizer, self.classifier, self.cfg = featurizer, classifier, cfg
        params = list(featurizer.parameters()) + (list(classifier.parameters()) if cfg.update_classifier else [])
        self.optimizer = torch.optim.Adam(params, lr=cfg.lr)
        with torch.no_grad():
            w = classifier.weight.detach().clone()
            logits = classifier(w)
        self.supports, self.entropy = w, softmax_entropy(logits)
        self.labels = F.one_hot(logits.argmax(1), logits.shape[1]).float()
        self.scores = logits.softmax(1)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """Adapt on batch ``x`` and return its logits [B, num_classes] (the online prediction)."""
        z = self.featurizer(x).float()
        p = self.classifier(z)
        with torch.no_grad():
            self.supports = torch.cat([self.supports, z.detach()])
            self.labels = torch.cat([self.labels, F.one_hot(p.argmax(1), p.shape[1]).float()])
            self.entropy = torch.cat([self.entropy, softmax_entropy(p)])
            self.scores = torch.cat([self.scores, p.softmax(1)])
            keep = select_supports(self.entropy, self.labels, self.cfg.filter_K)
            self.supports, self.labels = self.supports[keep], self.labels[keep]
            self.entropy, self.scores = self.entropy[keep], self.scores[keep]
            prototypes = (F.normalize(self.supports, dim=1).T @ self.labels).T  # [C, D]
        loss = prototype_loss(z, prototypes, p.softmax(1), self.cfg.tau)
        loss = loss + self.cfg.lam * neighbour_alignment_loss(z, self.supports, self.scores, p, self.cfg.top_k)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return p.detach()


def _batches(images: torch.Tensor, splits: DatasetSplits, device: torch.device, batch_size: int):
    """The online stream in order. A last batch of one image joins the one before: batch norm cannot normalise a
    single image with its own statistics."""
    starts = list(range(0, images.shape[0], batch_size))
    if len(starts) > 1 and images.shape[0] - starts[-1] == 1:
        starts.pop()
    for lo, hi in zip(starts, starts[1:] + [images.shape[0]]):
        yield normalize(images[lo:hi].to(device), splits.mean, splits.std)


def _normalise_with_test_batches(featurizer: nn.Module) -> nn.Module:
    """Batch-norm layers in train mode (each batch's own statistics); everything else (dropout) stays in eval."""
    for m in featurizer.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
    return featurizer


def _predict(featurizer: nn.Module, classifier: nn.Module, batches) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([classifier(featurizer(x).float()) for x in batches])


def adapt_on_corruptions(backbone: nn.Module, probe: nn.Module | None, splits: DatasetSplits, cfg: DictConfig,
                         device: torch.device) -> dict[str, float]:
    """Top-1 accuracy of backbone + linear ``probe`` (``train_linear``'s output: ``linear``, ``mean``, ``std``) on
    each corrupted copy of a fixed test subset: before adaptation (``tta_<corruption>_s<severity>_before``), with
    batch norm on test-batch statistics alone (``..._bn``, only with ``batch_norm: batch``) and online during TSD
    (``..._after``), each shifted set starting from a fresh copy of the backbone; and their means
    (``tta_mean_before/bn/after``). With ``batch_norm: running`` batch norm keeps the source's running statistics.

    Raises:
        SslrunError: for an unknown ``eval.tta.method``, corruption or severity, or without a linear probe.
    """
    if cfg.method != "tsd":
        raise SslrunError(f"eval.tta.method={cfg.method!r} is not a test-time adaptation here; use tsd or none.")
    if probe is None:
        raise SslrunError("eval.tta adapts the linear-probed model, but eval.linear.enabled=false; enable the linear "
                          "probe, or set eval.tta.method=none.")
    if cfg.batch_norm not in ("batch", "running"):
        raise SslrunError(f"eval.tta.batch_norm={cfg.batch_norm!r}: use batch (normalise with each test batch's "
                          "statistics, as the official TSD code) or running (the source model's statistics).")
    test = splits.test
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(test), generator=g)[:cfg.num_test or len(test)]  # a mixed stream of classes
    images, labels = test.images[order], test.labels[order].to(device)
    results: dict[str, float] = {}
    for name in cfg.corruptions:
        for severity in cfg.severities:
            shifted = corrupt(images, name, int(severity), cfg.seed)
            featurizer = Standardised(copy.deepcopy(backbone), probe.mean, probe.std).to(device).eval()
            classifier = copy.deepcopy(probe.linear).to(device)
            stream = functools.partial(_batches, shifted, splits, device, cfg.batch_size)  # one pass per call
            logits = {"before": _predict(featurizer, classifier, stream())}
            if cfg.batch_norm == "batch":
                # Train-mode forwards also move the running statistics; this copy's are not used again.
                logits["bn"] = _predict(_normalise_with_test_batches(featurizer), classifier, stream())
            tsd = TSD(featurizer, classifier, cfg)
            logits["after"] = torch.cat([tsd.step(x) for x in stream()])
            for when, out in logits.items():
                results[f"{PREFIX}{name}_s{severity}_{when}"] = (out.argmax(1) == labels).float().mean().item()
    for when in WHEN:
        vals = [v for k, v in results.items() if k.endswith(f"_{when}")]
        if vals:
            results[f"{PREFIX}mean_{when}"] = sum(vals) / len(vals)
    return results


def tta_table(metrics: dict) -> Table:
    """Top-1 accuracy per corruption (rows: the source model, test-batch batch norm alone where measured, during
    TSD) and severity (columns), with each row's mean over severities and the overall means."""
    stems = [k[len(PREFIX):-len("_before")] for k in metrics
             if k.startswith(PREFIX) and k.endswith("_before") and not k.startswith(PREFIX + "mean_")]
    severities = sorted({stem.rsplit("_s", 1)[1] for stem in stems}, key=int)
    names = list(dict.fromkeys(stem.rsplit("_s", 1)[0] for stem in stems))
    table = Table(title="Test-time adaptation (TSD): top-1 per corruption and severity")
    table.add_column("corruption", no_wrap=True)
    table.add_column("model", no_wrap=True)
    for s in [*severities, "mean"]:
        # min_width: an 80-column log (not a terminal) narrows the name columns, never cuts a figure to "0.4…"
        table.add_column(s if s == "mean" else f"s{s}", justify="right", no_wrap=True, min_width=5)
    for name in [*names, "all"]:
        for when in WHEN:
            keys = ([f"{PREFIX}mean_{when}"] if name == "all" else
                    [f"{PREFIX}{name}_s{s}_{when}" for s in severities])
            if not all(k in metrics for k in keys):
                continue
            vals = [metrics[k] for k in keys]
            cells = ([""] * len(severities) if name == "all" else [f"{v:.3f}" for v in vals])
            table.add_row(name if when == "before" else "", STAGE[when], *cells, f"{sum(vals) / len(vals):.3f}",
                          end_section=when == "after")
    return table
