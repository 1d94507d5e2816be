import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from runner import engine_step, method_config

from sslrun.backbones.small_cnn import SmallCNN
from sslrun.methods.base import FitInfo, TrainState
from sslrun.methods.pcl import PCL, concentration, proto_nce, sample_negatives

N = 48  # images in the toy dataset


def proto_nce_reference(q, prototypes, phi, labels, negatives):
    """The paper's ProtoNCE term with a loop: -log exp(q.c_s/phi_s) / sum_{j in {s} + negatives} exp(q.c_j/phi_j)."""
    total = 0.0
    for b in range(q.shape[0]):
        ids = [int(labels[b])] + [int(j) for j in negatives[b]]
        e = [math.exp(float(q[b] @ prototypes[j]) / float(phi[j])) for j in ids]
        total += -math.log(e[0] / sum(e))
    return total / q.shape[0]


# ---- concentration -------------------------------------------------------------------------------------


def test_concentration_hand_computed():
    # Cluster 0: three points at distances 1, 2, 3; cluster 1: two at 1; cluster 2: one point (takes the max).
    dist = torch.tensor([1.0, 2.0, 3.0, 1.0, 1.0, 0.5])
    assign = torch.tensor([0, 0, 0, 1, 1, 2])
    phi0, phi1 = 6 / (3 * math.log(3 + 10)), 2 / (2 * math.log(2 + 10))
    raw = torch.tensor([phi0, phi1, max(phi0, phi1)])
    out = concentration(dist, assign, 3, alpha=10.0, temperature=0.2, clip_percentiles=[0.0, 100.0])
    torch.testing.assert_close(out, 0.2 * raw / raw.mean())
    assert out.mean().item() == pytest.approx(0.2)


def test_concentration_clips_to_percentiles_then_rescales_to_t():
    # Eleven clusters of 2 points each, the i-th at distance i + 1 from its centroid: raw phi_i = (i+1)/log(12).
    k = 11
    assign = torch.arange(k).repeat_interleave(2)
    dist = (torch.arange(k, dtype=torch.float64) + 1).repeat_interleave(2)
    raw = (np.arange(k) + 1.0) / math.log(12)
    clipped = raw.clip(np.percentile(raw, 10), np.percentile(raw, 90))  # as the official run_kmeans
    expected = 0.3 * clipped / clipped.mean()
    out = concentration(dist, assign, k, alpha=10.0, temperature=0.3, clip_percentiles=[10.0, 90.0])
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10)
    assert out[0] == out[1] and out[-1] == out[-2]  # the extremes are clipped


def test_concentration_single_member_and_empty_clusters_take_the_max():
    dist = torch.tensor([1.0, 1.0, 4.0, 2.0, 2.0])
    assign = torch.tensor([0, 0, 1, 2, 2])  # cluster 1 has one point, cluster 3 none
    out = concentration(dist, assign, 4, alpha=10.0, temperature=1.0, clip_percentiles=[0.0, 100.0])
    assert out[1] == out[3] == out[2] == out.max()


# ---- ProtoNCE -------------------------------------------------------------------------------------------


def test_proto_nce_hand_computed():
    # Two prototypes, all negatives used: -log e^{1/phi0} / (e^{1/phi0} + e^{0/phi1}).
    q = torch.tensor([[1.0, 0.0]])
    prototypes = torch.eye(2)
    phi = torch.tensor([0.5, 0.25])
    expected = -math.log(math.exp(2.0) / (math.exp(2.0) + 1.0))
    assert proto_nce(q, prototypes, phi, torch.tensor([0]), 10).item() == pytest.approx(expected, rel=1e-6)


def test_proto_nce_matches_loop_reference_with_all_negatives():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    prototypes = F.normalize(torch.randn(6, 8, generator=g), dim=1)
    phi = 0.1 + torch.rand(6, generator=g)
    labels = torch.tensor([0, 3, 3, 5, 1])
    others = [[j for j in range(6) if j != int(s)] for s in labels]  # r >= k - 1: every other prototype
    assert proto_nce(q, prototypes, phi, labels, 16384).item() == pytest.approx(
        proto_nce_reference(q, prototypes, phi, labels, others), rel=1e-5)


def test_proto_nce_matches_loop_reference_with_sampled_negatives():
    g = torch.Generator().manual_seed(1)
    q = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    prototypes = F.normalize(torch.randn(20, 8, generator=g), dim=1)
    phi = 0.1 + torch.rand(20, generator=g)
    labels = torch.tensor([2, 19, 0, 7])
    torch.manual_seed(5)
    loss = proto_nce(q, prototypes, phi, labels, 6)
    torch.manual_seed(5)
    negatives = sample_negatives(labels, 20, 6)  # the same draw
    assert loss.item() == pytest.approx(proto_nce_reference(q, prototypes, phi, labels, negatives), rel=1e-5)


def test_sampled_negatives_exclude_the_positive_and_are_uniform():
    torch.manual_seed(0)
    k, r = 10, 4
    labels = torch.tensor([0, 3, 9, 3])
    counts = torch.zeros(len(labels), k)
    for _ in range(2000):
        neg = sample_negatives(labels, k, r)
        assert neg.shape == (4, r)
        assert (neg != labels[:, None]).all() and neg.min() >= 0 and neg.max() < k
        assert all(len(set(row.tolist())) == r for row in neg)  # distinct
        counts.scatter_add_(1, neg, torch.ones_like(neg, dtype=torch.float))
    # Each of the k - 1 other prototypes is drawn with probability r / (k - 1).
    freq = counts / 2000
    expected = torch.full((len(labels), k), r / (k - 1)).scatter_(1, labels[:, None], 0.0)
    torch.testing.assert_close(freq, expected, atol=0.05, rtol=0)


# ---- the method ---------------------------------------------------------------------------------------


def build(**overrides) -> PCL:
    torch.manual_seed(0)
    cfg = method_config('pcl')
    params = {'num_clusters': [4, 6], 'warmup_epochs': 1, 'queue_size': 32, 'proj_hidden_dim': 32, 'bn_splits': 2}
    return instantiate(cfg, backbone=SmallCNN(in_channels=3, width=8, feat_dim=32), **(params | overrides))


class Images:
    """A toy pretraining set and the engine's ``map_dataset`` over it, recording the encoder's mode."""

    def __init__(self, method: PCL) -> None:
        self.images = torch.randn(N, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        self.method, self.calls, self.key_training = method, 0, []

    def map_dataset(self, fn):
        self.calls += 1
        self.key_training.append(self.method.key_backbone.training)
        with torch.no_grad():
            return torch.cat([fn(self.images[i:i + 16]) for i in range(0, N, 16)])

    def batch(self, step: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        g = torch.Generator().manual_seed(step)
        index = torch.randperm(N, generator=g)[:8]
        x = self.images[index]
        return [x + 0.1 * torch.randn(x.shape, generator=g) for _ in range(2)], index


def test_warmup_has_no_protonce_then_clusters_momentum_features():
    method = build(warmup_epochs=1)
    data = Images(method)
    method.on_fit_start(FitInfo(N, 6, 12, 2, data.map_dataset))
    method.on_epoch_start(TrainState(epoch=0))
    out = method(*data.batch(0))
    assert data.calls == 0 and method.clusterings == [] and "proto_nce" not in out
    method.on_after_step(TrainState(step=1))
    method.on_epoch_start(TrainState(epoch=1, step=6))
    assert data.calls == 1 and data.key_training == [False] and method.key_backbone.training
    assert [c.shape[0] for c, _, _ in method.clusterings] == [4, 6]
    for c, phi, assign in method.clusterings:
        torch.testing.assert_close(c.norm(dim=1), torch.ones(c.shape[0]))
        assert phi.mean().item() == pytest.approx(0.2, rel=1e-5) and assign.shape == (N,)
    views, index = data.batch(1)
    torch.manual_seed(7)
    out = method(views, index)
    # ProtoNCE is the mean over the clusterings, added to InfoNCE.
    torch.manual_seed(7)
    moco = super(PCL, method).forward(views, index)
    q = moco["z"]
    terms = [proto_nce(q, c, phi, a[index], method.pcl_r) for c, phi, a in method.clusterings]
    torch.testing.assert_close(out["proto_nce"], torch.stack(terms).mean())
    torch.testing.assert_close(out["loss"], moco["loss"] + out["proto_nce"])


def test_clustering_features_are_the_normalised_momentum_features():
    method = build()
    data = Images(method)
    seen = []
    method.on_fit_start(FitInfo(N, 6, 12, 2, lambda fn: seen.append(data.map_dataset(fn)) or seen[-1]))
    method.on_epoch_start(TrainState(epoch=1))
    method.key_backbone.eval()
    method.key_projector.eval()
    with torch.no_grad():
        expected = F.normalize(method.key_projector(method.key_backbone(data.images)), dim=1)
    torch.testing.assert_close(seen[0], expected, atol=1e-5, rtol=1e-5)


def test_no_gradient_reaches_the_momentum_encoder_or_the_prototypes():
    method = build()
    data = Images(method)
    method.on_fit_start(FitInfo(N, 6, 12, 2, data.map_dataset))
    method.on_epoch_start(TrainState(epoch=1))
    out = method(*data.batch(0))
    out["proto_nce"].backward()
    assert all(p.grad is None for p in method.key_backbone.parameters())
    assert all(p.grad is None for p in method.key_projector.parameters())
    assert all(not t.requires_grad for c in method.clusterings for t in c)
    assert method.backbone.conv1[0].weight.grad.abs().sum() > 0  # ProtoNCE trains the query encoder


def test_smoke_steps_with_engine_hooks():
    method = build(warmup_epochs=1)
    data = Images(method)
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    state = TrainState()
    method.on_fit_start(FitInfo(N, 1, 2, 2, data.map_dataset))
    for epoch in range(2):  # one step of warm-up (InfoNCE alone), one with ProtoNCE
        state.epoch = epoch
        method.on_epoch_start(state)
        views, index = data.batch(state.step)
        out = engine_step(method, opt, views, state, index)
        assert torch.isfinite(out["loss"]) and out["z"].shape == (8, 128)
    assert "proto_nce" in out and torch.isfinite(out["proto_nce"])
