
import faiss
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from runner import engine_step, method_config

from sslrun.backbones.small_cnn import SmallCNN
from sslrun.methods.base import FitInfo, TrainState
from sslrun.methods.deepcluster import DeepCluster, balanced_weights, pca_whiten

N = 48


def build(**overrides) -> DeepCluster:
    torch.manual_seed(0)
    cfg = method_config('deepcluster')
    params = {'num_clusters': 3, 'pca_dim': None}
    return instantiate(cfg, backbone=SmallCNN(in_channels=3, width=8, feat_dim=32), **(params | overrides))


def blobs(n_per: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Three separable groups of features, in directions that stay apart after l2-normalisation."""
    g = torch.Generator().manual_seed(0)
    centers = 5 * torch.eye(3, 32)
    labels = torch.arange(3).repeat_interleave(n_per)
    return centers[labels] + 0.1 * torch.randn(3 * n_per, 32, generator=g), labels


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a[:, None] == a[None]) == (b[:, None] == b[None])).all())


def test_pseudo_labels_are_the_kmeans_clusters_of_separable_features():
    method = build(kmeans_iters=10)
    feats, labels = blobs()
    # Shuffle so that the ids the first k-means seeds land on are not the blobs in order.
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))
    method.assign(feats[perm], seed=0)
    assert method.pseudo_labels.shape == (N,)
    assert same_partition(method.pseudo_labels, labels[perm])


def test_classifier_is_reinitialised_after_every_clustering():
    method = build(head_init_std=0.01)
    weight, bias = method.classifier.weight, method.classifier.bias
    with torch.no_grad():
        weight.fill_(3.0)
        bias.fill_(1.0)
    method.assign(blobs()[0], seed=0)
    # In place: the optimizer's references stay valid.
    assert method.classifier.weight is weight and method.classifier.bias is bias
    assert bias.abs().max() == 0
    assert 0.005 < weight.std().item() < 0.02 and weight.mean().abs() < 0.005


def test_empty_clusters_are_fixed():
    # 6 clusters asked of points with only 3 distinct values: k-means alone leaves clusters empty.
    method = build(num_clusters=6, kmeans_iters=5)
    feats = torch.eye(3, 32).repeat(8, 1)
    method.assign(feats, seed=0)
    sizes = torch.bincount(method.pseudo_labels, minlength=6)
    assert (sizes > 0).all() and sizes.sum() == 24


def test_balanced_weights_are_uniform_over_classes():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 3, 0])  # class 2 empty
    w = balanced_weights(labels, 4)
    torch.testing.assert_close(w, torch.tensor([8 / 15, 8 / 15, 8 / 15, 8 / 15, 4 / 3, 4 / 3, 8 / 3, 8 / 15]))
    per_class = torch.zeros(4).index_add_(0, labels, w)
    torch.testing.assert_close(per_class, torch.tensor([8 / 3, 8 / 3, 0.0, 8 / 3]))  # n / C for each non-empty
    assert w.mean().item() == pytest.approx(1.0)


def test_loss_is_the_weighted_cross_entropy_on_pseudo_labels_of_index():
    method = build()
    method.assign(blobs()[0], seed=0)
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    index = torch.tensor([0, 5, 17, 20, 40, 47])
    out = method([x, x.flip(-1)], index)
    h = method.backbone(x)
    ce = F.cross_entropy(method.classifier(h), method.pseudo_labels[index], reduction="none")
    torch.testing.assert_close(out["loss"], (ce * method.sample_weights[index]).mean())
    torch.testing.assert_close(out["z"], h)
    unbalanced = build(balance_classes=False)
    unbalanced.assign(blobs()[0], seed=0)
    assert (unbalanced.sample_weights == 1).all()


def test_pca_whitening_matches_faiss_and_whitens():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g) @ torch.randn(6, 6, generator=g) + 3
    out = pca_whiten(x, 4)
    assert out.shape == (200, 4)
    torch.testing.assert_close(out.T @ out / 200, torch.eye(4), atol=1e-4, rtol=0)
    mat = faiss.PCAMatrix(6, 4, -0.5)  # DeepCluster's preprocess_features
    mat.train(x.numpy())
    ref = torch.from_numpy(mat.apply_py(x.numpy()))
    signs = torch.sign((out * ref).sum(0))  # each component is defined up to sign
    # faiss whitens with the scatter matrix (covariance x n): the same up to 1/sqrt(n).
    torch.testing.assert_close(out * signs / 200 ** 0.5, ref, atol=1e-4, rtol=1e-3)


def test_reclusters_every_epoch_in_eval_mode():
    method = build(recluster_every=2)
    images = torch.randn(N, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    modes = []

    def map_dataset(fn):
        modes.append(method.backbone.training)
        return torch.cat([fn(images[i:i + 16]) for i in range(0, N, 16)])

    method.on_fit_start(FitInfo(N, 6, 12, 4, map_dataset))
    for epoch in range(4):
        method.on_epoch_start(TrainState(epoch=epoch))
    assert modes == [False, False] and method.backbone.training  # epochs 0 and 2


def test_smoke_steps_with_engine_hooks():
    method = build(num_clusters=4, pca_dim=16)
    images = torch.randn(N, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    def map_dataset(fn):
        return torch.cat([fn(images[i:i + 16]) for i in range(0, N, 16)])

    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    method.on_fit_start(FitInfo(N, 2, 4, 2, map_dataset))
    state = TrainState()
    for epoch in range(2):
        state.epoch = epoch
        method.on_epoch_start(state)
        for _ in range(2):
            index = torch.randperm(N)[:8]
            x = images[index]
            out = engine_step(method, opt, [x + 0.1 * torch.randn_like(x), x], state, index)
            assert torch.isfinite(out["loss"]) and out["z"].shape == (8, 32)
    assert method.classifier.weight.grad is not None
