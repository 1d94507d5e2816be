import faiss
import pytest
import torch
from torch import nn

from sslrun.errors import SslrunError
from sslrun.methods.kmeans import encode_dataset, fix_empty_clusters, kmeans


def blobs(n_per: int = 30, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three tight, far-apart blobs in 4-d and their true labels."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[10.0, 0, 0, 0], [0, 10.0, 0, 0], [0, 0, 10.0, 0]])
    labels = torch.arange(3).repeat_interleave(n_per)
    return centers[labels] + 0.1 * torch.randn(3 * n_per, 4, generator=g), labels


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two labelings group the points identically (cluster ids are arbitrary)."""
    return bool(((a[:, None] == a[None]) == (b[:, None] == b[None])).all())


def test_kmeans_recovers_separable_blobs():
    x, labels = blobs()
    centroids, assign, dist = kmeans(x, 3, niter=10, seed=0, nredo=10)  # best of 10 inits
    assert centroids.shape == (3, 4) and assign.shape == (90,) and assign.dtype == torch.long
    assert same_partition(assign, labels)
    for c in range(3):  # each centroid is the mean of its blob
        torch.testing.assert_close(centroids[c], x[assign == c].mean(0), atol=1e-4, rtol=0)
    # distances are Euclidean (not squared) distances to the assigned centroid
    torch.testing.assert_close(dist, (x - centroids[assign]).norm(dim=1))


def test_spherical_kmeans_gives_unit_centroids():
    x, labels = blobs()
    centroids, assign, _ = kmeans(x, 3, niter=10, seed=0, nredo=10, spherical=True)
    torch.testing.assert_close(centroids.norm(dim=1), torch.ones(3), atol=1e-5, rtol=0)
    assert same_partition(assign, labels)


def test_fix_empty_clusters_splits_a_cluster_into_the_empty_one():
    # Cluster 0 holds 4 points in two pairs, cluster 1 one point, cluster 2 is empty.
    x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 0.0], [5.1, 0.0], [0.0, 9.0]])
    assign = torch.tensor([0, 0, 0, 0, 1])
    centroids = torch.tensor([[2.55, 0.0], [0.0, 9.0], [100.0, 100.0]])
    new_c, new_a = fix_empty_clusters(x, centroids, assign, torch.Generator().manual_seed(0))
    assert torch.bincount(new_a, minlength=3).min() >= 1
    # Only the one cluster that could be split (cluster 0) gave points to cluster 2; cluster 1 is untouched.
    assert new_a[4] == 1 and set(new_a[:4].tolist()) == {0, 2}
    for c in (0, 2):  # both halves' centroids are their members' means
        torch.testing.assert_close(new_c[c], x[new_a == c].mean(0))
    torch.testing.assert_close(new_c[1], centroids[1])


def test_fix_empty_clusters_halves_identical_points():
    x = torch.ones(4, 3)
    new_c, new_a = fix_empty_clusters(x, torch.zeros(2, 3), torch.zeros(4, dtype=torch.long),
                                      torch.Generator().manual_seed(0))
    assert torch.bincount(new_a, minlength=2).tolist() == [2, 2]
    torch.testing.assert_close(new_c, torch.ones(2, 3))


def test_kmeans_with_fix_leaves_no_cluster_empty():
    # Three distinct points repeated: at most three clusters can be non-empty without the fix.
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]).repeat(4, 1)
    _, plain, _ = kmeans(x, 5, niter=5, seed=0)
    assert (torch.bincount(plain, minlength=5) == 0).any()
    centroids, assign, dist = kmeans(x, 5, niter=5, seed=0, fix_empty=True)
    assert (torch.bincount(assign, minlength=5) > 0).all()
    torch.testing.assert_close(dist, (x - centroids[assign]).norm(dim=1))


def test_kmeans_needs_as_many_points_as_clusters():
    with pytest.raises(SslrunError, match="at least 10 images"):
        kmeans(torch.randn(5, 2), 10)


@pytest.mark.skipif(hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0, reason="faiss-gpu present")
def test_kmeans_gpu_without_faiss_gpu_is_a_clear_error():
    with pytest.raises(SslrunError, match="faiss-gpu"):
        kmeans(torch.randn(20, 2), 2, gpu=True)


def test_encode_dataset_runs_in_eval_mode_and_restores_the_mode():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    net.train()
    modes = []

    def fn(x):
        modes.append(net.training)
        return net(x).to(torch.bfloat16)

    def map_dataset(f):
        return torch.cat([f(torch.randn(3, 2)) for _ in range(2)])

    out = encode_dataset(map_dataset, fn, net)
    assert modes == [False, False] and net.training
    assert out.dtype == torch.float32 and out.shape == (6, 2) and not out.requires_grad
