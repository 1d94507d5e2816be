"""DeepCluster V2 (Caron et al., 2020, SwAV paper App. A): each crop predicts its image's k-means cluster.

Follows the official main_deepclusterv2.py and solo-learn's deepclusterv2: an MLP projector to an
l2-normalised embedding z; P sets of prototypes (linear, no bias, unit rows) that no gradient trains; a
memory bank of every image's embedding of each large crop, filled during an epoch; at the start of each
later epoch, spherical k-means of the bank (one clustering per prototype set, on the large crops' banks in
turn) gives every image one cluster per set, and the prototypes become the centroids. The loss is the
cross-entropy of softmax(prototypes_h . z / T) against the image's cluster in set h, over every crop, averaged
over the crops and the images and then over the P sets.

The first epoch has no clustering yet and trains on no target while the bank fills, as in solo-learn (whose
first-epoch assignments are all -1: its cross-entropy, a mean over no target, is NaN with zero gradients); here
the loss is 0 with zero gradients, so only weight decay moves the weights. The official code instead fills the
bank with a pass over the data before training and clusters at epoch 0.

k-means is :func:`~sslrun.methods.kmeans.kmeans` (faiss, spherical, every banked image as a training point),
where the official code runs its own: the same Lloyd iterations on the unit sphere from random banked
images, but faiss re-seeds a cluster that goes empty by splitting a large one where the official code keeps
its old centroid. The final assignment is the nearest centroid, i.e. the largest dot product on the sphere.

Under ``torch.distributed`` the bank holds the large crops of the global batch (gathered in rank order, the
order one process would write them), identical on every process; k-means runs on rank 0 and is broadcast.
The loss divides by the global number of (crop, image) pairs that have a cluster, so that DDP's averaging
of the processes' gradients gives one process's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import dist
from ..errors import SslrunError
from .base import FitInfo, Method, TrainState
from .heads import mlp
from .kmeans import kmeans
from .losses import in_fp32
from .multicrop import NUM_LARGE_CROPS, encode_by_resolution

UNASSIGNED = -1  # an image the last epoch did not see (or the first epoch): no target, ignored by the loss


def deepclusterv2_loss(scores: Sequence[torch.Tensor], assignments: torch.Tensor, temperature: float,
                       counts: torch.Tensor | None = None) -> torch.Tensor:
    """DeepCluster V2's loss: for each prototype set h, the cross-entropy between p = softmax(scores_h / T) of
    every crop and the crop's image cluster c_h, -log p[c_h], averaged over the (crop, image) pairs whose image
    has a cluster; then averaged over the P sets (official ``train``; solo-learn ``deepclusterv2_loss_func``).

    Args:
        scores: P tensors [V, B, K_h]: cosine scores (dimensionless, in [-1, 1]) of the V crops of B images
            against the K_h prototypes of set h.
        assignments: [P, B] long, each image's cluster in each set; ``-1`` = none (the pair is left out).
        temperature: softmax temperature T (> 0).
        counts: [P] the number of (crop, image) pairs each set's sum is divided by; default: this batch's pairs
            with a cluster (under DDP, the global count over the number of processes). A count of 0 gives a loss
            of 0 (no pair has a target), with zero gradients.

    Returns:
        The scalar loss (nats).

    Shape:
        scores [V, B, K_h] each, assignments [P, B], counts [P] -> scalar.
    """
    if counts is None:
        counts = (assignments >= 0).sum(1) * scores[0].shape[0]
    losses = []
    for s, c, n in zip(scores, assignments, counts):
        targets = c.repeat(s.shape[0])  # every crop of an image predicts the image's cluster
        ce = F.cross_entropy(s.reshape(-1, s.shape[-1]) / temperature, targets, ignore_index=UNASSIGNED,
                             reduction="sum")
        losses.append(ce / torch.where(n > 0, n, torch.ones_like(n)))
    return torch.stack(losses).mean()


class DeepClusterV2(Method):
    """DeepCluster V2: cross-entropy against per-epoch spherical k-means clusters of a memory bank, through
    frozen prototypes set to the centroids.

    Views: the first two (large crops, one size) are banked and clustered; every crop, small crops included,
    predicts the image's clusters (official code). Needs at least 2 epochs: the first only fills the bank.
    Source: Caron et al., NeurIPS 2020 (App. A); facebookresearch/swav main_deepclusterv2.py; vturrisi/solo-learn
    solo/methods/deepclusterv2.py, solo/utils/kmeans.py.

    Args:
        backbone: the encoder, with a ``feat_dim``.
        proj_hidden_dim, proj_output_dim: the projector's hidden width and the embedding dimension d.
        num_prototypes: K_h of each prototype set (clusters per k-means).
        temperature: softmax temperature T of the loss.
        kmeans_iters: Lloyd iterations of each k-means.
    """

    small_crops = True
    min_batch_reason = "batch norm in the projector needs two images"

    def __init__(self, backbone: nn.Module, proj_hidden_dim: int, proj_output_dim: int,
                 num_prototypes: Sequence[int], temperature: float, kmeans_iters: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = mlp(backbone.feat_dim, proj_hidden_dim, proj_output_dim, 2)
        self.prototypes = nn.ModuleList([nn.Linear(proj_output_dim, k, bias=False) for k in num_prototypes])
        with torch.no_grad():
            for proto in self.prototypes:
                proto.weight.requires_grad_(False)  # set from the centroids, never by the optimizer
                proto.weight.copy_(F.normalize(proto.weight, dim=1))  # unused until the first clustering
        self.num_prototypes, self.temperature, self.kmeans_iters = list(num_prototypes), temperature, kmeans_iters
        # Sized at on_fit_start and saved in checkpoints, so that a resumed run continues the epoch's bank and
        # trains on the assignments its epoch started with.
        self.register_buffer("bank", torch.zeros(NUM_LARGE_CROPS, 0, proj_output_dim))  # [A, N, d]
        self.register_buffer("seen", torch.zeros(0, dtype=torch.bool))  # [N] banked during this epoch
        self.register_buffer("assignments", torch.zeros(len(num_prototypes), 0, dtype=torch.long))  # [P, N]
        self._to_bank: tuple[torch.Tensor, torch.Tensor] | None = None

    def on_fit_start(self, info: FitInfo) -> None:
        if info.epochs < 2:
            raise SslrunError(f"DeepCluster V2 learns from its second epoch on (the first fills the memory bank that "
                              f"k-means clusters, with a loss of 0), but trainer.epochs={info.epochs}; set "
                              "trainer.epochs to 2 or more (solo-learn's CIFAR recipe: 1000).")
        if info.num_samples < max(self.num_prototypes):
            raise SslrunError(f"DeepCluster V2 clusters the pretraining images into method.num_prototypes="
                              f"{self.num_prototypes} clusters, but the set has {info.num_samples} images; lower "
                              "method.num_prototypes below the number of images seen in an epoch.")
        device, n = self.bank.device, info.num_samples
        self.bank = torch.zeros(NUM_LARGE_CROPS, n, self.bank.shape[-1], device=device)
        self.seen = torch.zeros(n, dtype=torch.bool, device=device)
        self.assignments = torch.full((len(self.num_prototypes), n), UNASSIGNED, dtype=torch.long, device=device)

    @torch.no_grad()
    def cluster(self, seed: int) -> None:
        """Spherical k-means of the images banked this epoch, one per prototype set h on the bank of large crop
        h mod A: set the prototypes to the centroids and the assignments ([P, N], -1 for images not banked), and
        empty the bank for the next epoch. Seeds ``seed * P + h``."""
        idx = self.seen.nonzero().flatten()
        if idx.numel() < max(self.num_prototypes):
            raise SslrunError(f"DeepCluster V2 clusters the images seen in the last epoch, {idx.numel()}, into "
                              f"{max(self.num_prototypes)} clusters (method.num_prototypes={self.num_prototypes}); "
                              "lower method.num_prototypes or use more images per epoch.")
        for h, (proto, k) in enumerate(zip(self.prototypes, self.num_prototypes)):
            # Every banked image trains the centroids, as in the official code (faiss would subsample otherwise).
            centroids, labels, _ = kmeans(self.bank[h % NUM_LARGE_CROPS, idx], k, niter=self.kmeans_iters,
                                          seed=seed * len(self.prototypes) + h, spherical=True,
                                          max_points_per_centroid=None)
            proto.weight.copy_(F.normalize(centroids, dim=1))
            self.assignments[h].fill_(UNASSIGNED)
            self.assignments[h, idx] = labels
        self.seen.zero_()

    def on_epoch_start(self, state: TrainState) -> None:
        # Nothing banked: the first epoch (solo-learn), or a resume mid-epoch whose checkpoint is loaded next.
        if bool(self.seen.any()):
            self.cluster(seed=state.epoch)

    @in_fp32
    def _scores(self, z: torch.Tensor) -> list[torch.Tensor]:
        # fp32 under bf16 autocast: cosine scores are divided by T = 0.1.
        return [proto(z) for proto in self.prototypes]

    def forward(self, views: list[torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        n = views[0].shape[0]
        z = F.normalize(self.projector(encode_by_resolution(self.backbone, views)).float(), dim=1)
        scores = [s.view(len(views), n, -1) for s in self._scores(z)]  # P x [V, B, K_h]
        targets = self.assignments[:, index]
        # The global count of (crop, image) pairs with a target, over the processes: each process's share of
        # the mean, which DDP's averaging of gradients sums back.
        counts = dist.all_reduce_sum((targets >= 0).sum(1) * len(views)) / dist.world_size()
        loss = deepclusterv2_loss(scores, targets, self.temperature, counts)
        # [A, global B, d]: the large crops of every process, in rank order; banked after the step.
        large = z[: NUM_LARGE_CROPS * n].detach().view(NUM_LARGE_CROPS, n, -1)
        self._to_bank = (dist.all_gather(index), dist.all_gather(large.transpose(0, 1).contiguous()).transpose(0, 1))
        return {"loss": loss, "z": z[:n]}

    @torch.no_grad()
    def on_after_step(self, state: TrainState) -> None:
        if self._to_bank is not None:
            index, large = self._to_bank
            self.bank[:, index] = large.to(self.bank.dtype)
            self.seen[index] = True
            self._to_bank = None
