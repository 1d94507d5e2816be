"""k-means over the features of the whole pretraining set (PCL's prototypes, DeepCluster's pseudo-labels).

Why faiss: it is the k-means both papers' official code uses (the field's de facto choice), a fast
multi-threaded C++/BLAS implementation on CPU, with the same API on GPU (faiss-gpu). It subsamples the
training points (``max_points_per_centroid``) and re-seeds clusters that go empty during its iterations
by splitting a large one; the final assignment of every point can still leave a cluster empty, which
:func:`fix_empty_clusters` repairs the way DeepCluster's paper describes.
"""

from __future__ import annotations

from collections.abc import Callable

import faiss
import torch
import torch.nn.functional as F
from torch import nn

from .. import dist
from ..errors import SslrunError

# FitInfo.map_dataset: runs a function over the un-augmented pretraining images in index order.
MapDataset = Callable[[Callable[[torch.Tensor], torch.Tensor]], torch.Tensor]


def _use_gpu(features: torch.Tensor, gpu: bool | str) -> bool:
    has_gpu_faiss = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if gpu == "auto":
        return features.is_cuda and has_gpu_faiss
    if gpu and not has_gpu_faiss:
        raise SslrunError("k-means was asked to run on the GPU (gpu=true), but the installed faiss has no GPU "
                          "support or sees no GPU; install faiss-gpu (pip install 'sslrun[gpu]') or use gpu=auto.")
    return bool(gpu)


def kmeans(features: torch.Tensor, k: int, niter: int = 20, seed: int = 0, spherical: bool = False,
           gpu: bool | str = "auto", nredo: int = 1, max_points_per_centroid: int | None = 256,
           fix_empty: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cluster ``features`` [N, d] into ``k`` clusters with ``faiss.Kmeans``.

    Returns ``(centroids [k, d], assignments [N] (long), distances [N])`` on the features' device, where
    ``distances`` are the Euclidean (not squared) distances of each point to its centroid.
    ``max_points_per_centroid=None`` trains on every point; otherwise faiss trains on a random subset of
    ``k * max_points_per_centroid`` points and every point is assigned afterwards. ``fix_empty`` applies
    :func:`fix_empty_clusters` to the final assignment (DeepCluster).

    Under ``torch.distributed`` (every process passing the same ``features``), rank 0 clusters and broadcasts
    its result: faiss's multi-threaded k-means need not give bit-identical centroids on every process.
    """
    n, d = features.shape
    if n < k:
        raise SslrunError(f"k-means into {k} clusters needs at least {k} images, but the pretraining set has {n}; "
                          "lower the method's number of clusters or use a larger dataset.")
    if dist.is_main():
        result = _kmeans(features, k, niter, seed, spherical, gpu, nredo, max_points_per_centroid, fix_empty)
    else:
        feats = features.detach().float()
        result = (feats.new_empty(k, d), torch.empty(n, dtype=torch.long, device=features.device), feats.new_empty(n))
    return tuple(dist.broadcast(t) for t in result)


def _kmeans(features: torch.Tensor, k: int, niter: int, seed: int, spherical: bool, gpu: bool | str, nredo: int,
            max_points_per_centroid: int | None, fix_empty: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, d = features.shape
    x = features.detach().float().cpu().contiguous().numpy()
    # min_points_per_centroid=1: faiss only uses it to print advice to stderr when there are few points.
    km = faiss.Kmeans(d, k, niter=niter, nredo=nredo, seed=seed, spherical=spherical, verbose=False,
                      gpu=_use_gpu(features, gpu), min_points_per_centroid=1,
                      max_points_per_centroid=max_points_per_centroid or n)
    km.train(x)
    _, nearest = km.index.search(x, 1)
    centroids = torch.from_numpy(km.centroids).to(features.device)
    assignments = torch.from_numpy(nearest[:, 0]).long().to(features.device)
    feats = features.detach().float()
    if fix_empty:
        centroids, assignments = fix_empty_clusters(feats, centroids, assignments,
                                                    torch.Generator().manual_seed(seed))
        if spherical:
            centroids = F.normalize(centroids, dim=1)
    distances = (feats - centroids[assignments]).norm(dim=1)
    return centroids, assignments, distances


@torch.no_grad()
def fix_empty_clusters(features: torch.Tensor, centroids: torch.Tensor, assignments: torch.Tensor,
                       generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepCluster's fix (Caron et al., 2018, sec. 3.3): while a cluster is empty, pick a non-empty cluster at
    random (in proportion to its size, as faiss does), give the empty cluster that cluster's centroid plus a
    small perturbation and the other the centroid minus it, split its points between the two (nearer centroid),
    and move both centroids to the means of their new members.

    With the centroid at the members' mean ``m`` and a perturbation along a random unit direction ``u``, the
    nearer of ``m + eps*u`` and ``m - eps*u`` is given by the sign of ``(x - m) . u`` whatever the size of eps,
    and both signs occur unless the members are all identical; then any split is as good: halve them.
    """
    centroids, assignments = centroids.clone(), assignments.clone()
    k = centroids.shape[0]
    sizes = torch.bincount(assignments, minlength=k).cpu()
    for empty in (sizes == 0).nonzero().flatten().tolist():
        splittable = (sizes - 1).clamp_min(0).double()
        if splittable.sum() == 0:
            break  # every cluster has a single point: nothing left to split
        big = int(torch.multinomial(splittable, 1, generator=generator))
        members = (assignments == big).nonzero().flatten()
        pts = features[members]
        u = torch.randn(pts.shape[1], generator=generator).to(pts)
        side = (pts - pts.mean(0)) @ u > 0
        if side.all() or not side.any():
            side = torch.arange(len(members), device=members.device) < len(members) // 2
        assignments[members[side]] = empty
        centroids[empty], centroids[big] = pts[side].mean(0), pts[~side].mean(0)
        sizes[empty], sizes[big] = int(side.sum()), int((~side).sum())
    return centroids, assignments


@torch.no_grad()
def encode_dataset(map_dataset: MapDataset, fn: Callable[[torch.Tensor], torch.Tensor],
                   *modules: nn.Module) -> torch.Tensor:
    """``fn`` over the whole un-augmented pretraining set, in index order, as float32.

    ``modules`` run in eval mode meanwhile (BN on running statistics), as in the official PCL and DeepCluster
    feature extraction, and get their train/eval mode back afterwards.
    """
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        return map_dataset(fn).float()
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
