"""DeepCluster (Caron et al., 2018): k-means on the features gives pseudo-labels, a classifier learns them.

At the start of every clustering epoch: backbone features of the whole (un-augmented) train set,
PCA-whitened and l2-normalised, are clustered with k-means; each image's cluster is its pseudo-label
for the epoch, and the classifier on top of the backbone is re-initialised (the cluster ids are
arbitrary from one clustering to the next). Training is cross entropy on one augmented view.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import dist
from .base import FitInfo, Method, TrainState
from .kmeans import MapDataset, encode_dataset, kmeans


def pca_whiten(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Project ``x`` [N, d] on its top ``min(dim, d)`` principal components, each scaled to unit variance.

    DeepCluster's ``preprocess_features`` uses ``faiss.PCAMatrix(d, dim, eigen_power=-0.5)``, which gives
    the same up to a global 1/sqrt(N) (it whitens with the scatter matrix); the l2-normalisation that
    follows removes the difference. In torch, it runs on the features' device.
    """
    x = x.double()
    x = x - x.mean(0)
    evals, evecs = torch.linalg.eigh(x.T @ x / x.shape[0])  # ascending order
    dim = min(dim, x.shape[1])
    evals, evecs = evals[-dim:].flip(0), evecs[:, -dim:].flip(1)
    # Directions without variance would be divided by ~0: floor at machine precision of the largest.
    evals = evals.clamp_min(torch.finfo(evals.dtype).eps * evals[0])
    return (x @ evecs / evals.sqrt()).float()


def balanced_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-sample weights ``n / (C * |cluster(i)|)`` over the C non-empty clusters.

    DeepCluster samples images uniformly over pseudo-classes so that a huge cluster cannot dominate. The
    engine draws batches uniformly over images instead, and these weights make that equivalent in
    expectation: E_i[w_i l_i] = (1/C) sum_c (1/|c|) sum_{i in c} l_i = E_{c uniform, i uniform in c}[l_i].
    Every cluster gets the same total weight n / C, and the weights average to 1 over the dataset.
    """
    sizes = torch.bincount(labels, minlength=num_classes)
    nonempty = int((sizes > 0).sum())
    return labels.shape[0] / (nonempty * sizes[labels].float())


class DeepCluster(Method):
    """DeepCluster: a classifier learns k-means pseudo-labels of the backbone's features, re-clustered per epoch.

    Uses one view per image (the first; further views are ignored). Under ``torch.distributed`` the whole
    set is clustered once, on rank 0, and the labels and the re-initialised classifier are broadcast, so
    every process trains the same model. Source: Caron et al., ECCV 2018; facebookresearch/deepcluster.
    """

    num_large_crops = 1
    unused_views_ok = True  # the default augmentations make two views; the second is unused

    def __init__(self, backbone: nn.Module, num_clusters: int = 100, pca_dim: int | None = 256,
                 recluster_every: int = 1, balance_classes: bool = True, head_init_std: float = 0.01,
                 kmeans_iters: int = 20, kmeans_max_points_per_centroid: int | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(backbone.feat_dim, num_clusters)
        self.num_clusters, self.pca_dim, self.recluster_every = num_clusters, pca_dim, recluster_every
        self.balance_classes, self.head_init_std = balance_classes, head_init_std
        self.kmeans_iters, self.kmeans_max_points = kmeans_iters, kmeans_max_points_per_centroid
        # Kept in checkpoints (sized at on_fit_start): a run resumed mid-epoch must train on the labels its
        # epoch started with, not on a clustering of the weights it had when it stopped.
        self.register_buffer("pseudo_labels", torch.zeros(0, dtype=torch.long))
        self.register_buffer("sample_weights", torch.zeros(0))
        self.register_buffer("clustered", torch.tensor(False))
        self._map_dataset: MapDataset | None = None
        self.reset_classifier()

    def on_fit_start(self, info: FitInfo) -> None:
        self._map_dataset = info.map_dataset
        self.pseudo_labels = torch.zeros(info.num_samples, dtype=torch.long, device=self.pseudo_labels.device)
        self.sample_weights = torch.zeros(info.num_samples, device=self.sample_weights.device)

    def params_to_reset(self) -> list[nn.Parameter]:
        # The official code builds a fresh optimizer for the new top layer: no momentum carries over.
        return list(self.classifier.parameters())

    def reset_classifier(self) -> None:
        """The paper's top-layer init (normal(0, 0.01), zero bias), in place so the optimizer keeps the tensors."""
        with torch.no_grad():
            nn.init.normal_(self.classifier.weight, 0.0, self.head_init_std)
            nn.init.zeros_(self.classifier.bias)
        # Each process drew its own init: DDP synchronises gradients, not weights, so take rank 0's.
        dist.broadcast(self.classifier.weight.data)

    def cluster_features(self, feats: torch.Tensor) -> torch.Tensor:
        """The paper's preprocessing: PCA-whitening to ``pca_dim`` (none when null), then l2-normalisation."""
        return F.normalize(pca_whiten(feats, self.pca_dim) if self.pca_dim else feats, dim=1)

    def assign(self, feats: torch.Tensor, seed: int) -> None:
        """Cluster ``feats`` [N, d] of the whole train set: store pseudo-labels and weights, reset the classifier."""
        _, labels, _ = kmeans(self.cluster_features(feats), self.num_clusters, niter=self.kmeans_iters, seed=seed,
                              max_points_per_centroid=self.kmeans_max_points, fix_empty=True)
        self.pseudo_labels = labels
        self.sample_weights = (balanced_weights(labels, self.num_clusters) if self.balance_classes
                               else torch.ones(labels.shape[0], device=labels.device))
        self.clustered.fill_(True)
        self.reset_classifier()

    def on_epoch_start(self, state: TrainState) -> None:
        if self.clustered and state.epoch % self.recluster_every:
            return
        self.assign(encode_dataset(self._map_dataset, self.backbone, self.backbone), seed=state.epoch)

    def forward(self, views: list[torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.backbone(views[0])  # one augmented view per image, as in the paper
        ce = F.cross_entropy(self.classifier(h).float(), self.pseudo_labels[index], reduction="none")
        return {"loss": (ce * self.sample_weights[index]).mean(), "z": h}
