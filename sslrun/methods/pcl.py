"""PCL v1 (Li et al., 2021): MoCo v2 plus ProtoNCE, contrasting each query with k-means prototypes.

After ``warmup_epochs`` of plain MoCo, every epoch starts by clustering the momentum encoder's features of
the whole train set, once for each number of clusters in ``num_clusters``. Each cluster gives a prototype
(its l2-normalised centroid) and a concentration phi that acts as that prototype's temperature: loose
clusters get a higher phi, so their members are pulled less hard. The loss is InfoNCE over the queue plus
the mean over clusterings of ProtoNCE: the query against its own prototype and ``pcl_r`` others.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import FitInfo, TrainState
from .kmeans import MapDataset, encode_dataset, kmeans
from .losses import in_fp32
from .moco import MoCo


def concentration(distances: torch.Tensor, assignments: torch.Tensor, k: int, alpha: float, temperature: float,
                  clip_percentiles: Sequence[float]) -> torch.Tensor:
    """phi [k] of each cluster, as in the paper and the official ``run_kmeans``.

    phi = sum_z ||v'_z - c|| / (Z log(Z + alpha)) over the Z members of a cluster (``distances`` are the
    Euclidean distances of every point to its centroid); clusters with Z <= 1 take the largest phi; then
    phi is clipped to the given percentiles of all phis and rescaled so that its mean is ``temperature``.
    """
    sizes = torch.bincount(assignments, minlength=k).to(distances.dtype)
    sums = torch.zeros(k, dtype=distances.dtype, device=distances.device).index_add_(0, assignments, distances)
    multi = sizes > 1
    phi = torch.where(multi, sums / (sizes * torch.log(sizes + alpha)), torch.zeros_like(sums))
    # No cluster with two members (as many points as clusters): phi is then uniform, i.e. T for all.
    fill = phi[multi].max() if multi.any() else torch.ones((), dtype=phi.dtype, device=phi.device)
    phi = torch.where(multi, phi, fill)
    lo, hi = torch.quantile(phi, torch.tensor(clip_percentiles, dtype=phi.dtype, device=phi.device) / 100)
    phi = phi.clamp(lo, hi)
    return temperature * phi / phi.mean()


def sample_negatives(labels: torch.Tensor, k: int, r: int) -> torch.Tensor:
    """[B, r] prototype ids: for each query, r distinct ids drawn uniformly from the k - 1 that are not its
    own (``labels`` [B]).

    One draw of r of the k - 1 slots serves the whole batch: slot j names prototype j, or j + 1 from the
    query's own prototype on, a bijection onto the other prototypes, so each row is a uniform draw.
    """
    slots = torch.randperm(k - 1, device=labels.device)[:r]
    return slots + (slots >= labels[:, None]).long()


@in_fp32
def proto_nce(q: torch.Tensor, prototypes: torch.Tensor, phi: torch.Tensor, labels: torch.Tensor,
              num_negatives: int) -> torch.Tensor:
    """ProtoNCE's prototype term for one clustering m, averaged over the batch:
    ``-log exp(q.c_s/phi_s) / (exp(q.c_s/phi_s) + sum_j exp(q.c_j/phi_j))``.

    ``q`` [B, d] and ``prototypes`` [k, d] are l2-normalised, ``labels`` [B] the queries' own clusters.
    The j run over ``min(num_negatives, k - 1)`` prototypes from :func:`sample_negatives`. (The official
    code draws one set for the batch, excluding every query's positive, and lets the batch's positives
    act as each other's negatives; this follows the equation.)
    """
    k = prototypes.shape[0]
    negatives = sample_negatives(labels, k, min(num_negatives, k - 1))
    logits = q @ prototypes.T / phi  # every prototype's logit: B x k, cheaper than B x r x d
    logits = torch.cat([logits.gather(1, labels[:, None]), logits.gather(1, negatives)], dim=1)
    return F.cross_entropy(logits, torch.zeros_like(labels))


class PCL(MoCo):
    """MoCo (``moco`` are its keyword arguments: temperature, queue_size, momentum, ...) plus ProtoNCE.

    Under ``torch.distributed`` every process embeds the whole set (``FitInfo.map_dataset``), rank 0 runs
    k-means and broadcasts it (:func:`~sslrun.methods.kmeans.kmeans`), and ProtoNCE is per image.
    Source: Li et al., ICLR 2021; salesforce/PCL.
    """

    def __init__(self, backbone: nn.Module, num_clusters: Sequence[int] = (250, 500, 1000), warmup_epochs: int = 20,
                 pcl_r: int = 16384, concentration_alpha: float = 10.0,
                 concentration_clip: Sequence[float] = (10.0, 90.0), kmeans_iters: int = 10,
                 kmeans_max_points_per_centroid: int | None = 32, kmeans_spherical: bool = False,
                 **moco: Any) -> None:
        super().__init__(backbone, **moco)
        self.num_clusters, self.warmup_epochs, self.pcl_r = list(num_clusters), warmup_epochs, pcl_r
        self.alpha, self.clip = concentration_alpha, list(concentration_clip)
        self.kmeans_iters, self.kmeans_max_points = kmeans_iters, kmeans_max_points_per_centroid
        self.kmeans_spherical = kmeans_spherical
        self._map_dataset: MapDataset | None = None
        # (prototypes [k, d], phi [k], assignment of every image [N]) per clustering; empty while warming up.
        # Recomputed at every epoch start (also after a resume), so not kept in checkpoints.
        self.clusterings: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def on_fit_start(self, info: FitInfo) -> None:
        self._map_dataset = info.map_dataset

    def cluster(self, feats: torch.Tensor, seed: int) -> None:
        """k-means on ``feats`` [N, d] (momentum features of the train set) for every number of clusters."""
        self.clusterings = []
        for j, k in enumerate(self.num_clusters):
            centroids, assign, dist = kmeans(feats, k, niter=self.kmeans_iters, seed=seed + j,
                                             spherical=self.kmeans_spherical,
                                             max_points_per_centroid=self.kmeans_max_points)
            phi = concentration(dist, assign, k, self.alpha, self.temperature, self.clip)
            self.clusterings.append((F.normalize(centroids, dim=1), phi, assign))

    def on_epoch_start(self, state: TrainState) -> None:
        if state.epoch < self.warmup_epochs:
            self.clusterings = []
            return
        # As the official code: the momentum encoder's normalised features of un-augmented (centre-cropped) images.
        feats = encode_dataset(self._map_dataset, self._key, self.key_backbone, self.key_projector)
        self.cluster(feats, seed=state.epoch * len(self.num_clusters))

    def forward(self, views: list[torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().forward(views, index)  # InfoNCE over the queue; z is the normalised query of view 0
        if self.clusterings:
            q = out["z"]
            proto = torch.stack([proto_nce(q, c, phi, assign[index], self.pcl_r)
                                 for c, phi, assign in self.clusterings]).mean()
            out["proto_nce"] = proto
            out["loss"] = out["loss"] + proto
        return out
