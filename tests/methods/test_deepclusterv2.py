"""DeepCluster V2: the loss against the formula, the bank, the spherical k-means and its prototypes, the frozen
prototypes, and the first epoch (solo-learn: no clusters yet, loss 0)."""

import math

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from runner import method_config

from sslrun.backbones.small_cnn import SmallCNN
from sslrun.errors import SslrunError
from sslrun.methods.base import FitInfo, TrainState
from sslrun.methods.deepclusterv2 import DeepClusterV2, deepclusterv2_loss

B, N, D = 4, 24, 8


def make(num_prototypes=(3, 4, 3), **kw) -> DeepClusterV2:
    torch.manual_seed(0)
    node = OmegaConf.merge(method_config("deepclusterv2"), {"proj_hidden_dim": 16, "proj_output_dim": D,
                                                           "num_prototypes": list(num_prototypes), **kw})
    return instantiate(node, backbone=SmallCNN(in_channels=3, width=4, feat_dim=16))


def fit(method: DeepClusterV2, epochs: int = 2) -> DeepClusterV2:
    method.on_fit_start(FitInfo(num_samples=N, steps_per_epoch=N // B, total_steps=epochs * N // B, epochs=epochs))
    return method


def views(seed: int, n_small: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(B, 3, 16, 16, generator=g) for _ in range(2)]
            + [torch.randn(B, 3, 8, 8, generator=g) for _ in range(n_small)])


def reference_loss(scores: list[torch.Tensor], assignments: torch.Tensor, t: float) -> float:
    """The formula written out: for each set h, -log(exp(s[c]/t) / sum_k exp(s[k]/t)) averaged over the (crop v,
    image b) pairs whose image has a cluster c = assignments[h, b] >= 0; then the mean over the sets."""
    per_set = []
    for s, a in zip(scores, assignments):
        terms = [math.log(sum(math.exp(x / t) for x in s[v, b].tolist())) - s[v, b, a[b]].item() / t
                 for v in range(s.shape[0]) for b in range(s.shape[1]) if a[b] >= 0]
        per_set.append(sum(terms) / len(terms))
    return sum(per_set) / len(per_set)


def test_loss_on_a_hand_computed_example():
    # One set, 2 prototypes, 1 crop, 2 images: scores (1, 0) and (0, 1), clusters 0 and 0, T = 0.5 -> logits
    # (2, 0) and (0, 2): -log(e^2/(e^2+1)) = log(1+e^-2) and log(1+e^2); a third image without cluster is left out.
    scores = [torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, -5.0]]])]
    loss = deepclusterv2_loss(scores, torch.tensor([[0, 0, -1]]), 0.5)
    assert loss.item() == pytest.approx((math.log(1 + math.exp(-2)) + math.log(1 + math.exp(2))) / 2, rel=1e-6)


def test_loss_averages_crops_images_then_sets_and_skips_images_without_cluster():
    g = torch.Generator().manual_seed(0)
    scores = [F.normalize(torch.randn(3, 4, k, generator=g), dim=-1) for k in (3, 5)]  # V=3 crops, B=4 images
    assignments = torch.tensor([[2, -1, 0, 1], [4, 4, -1, 0]])
    got = deepclusterv2_loss(scores, assignments, 0.1).item()
    assert got == pytest.approx(reference_loss(scores, assignments, 0.1), rel=1e-5)


def test_a_batch_without_clusters_has_loss_zero_and_zero_gradients():
    """Before the first clustering every image is unassigned (solo-learn: -1, ignored): a loss of 0, not 0/0."""
    s = torch.randn(2, B, 3, requires_grad=True)
    loss = deepclusterv2_loss([s], torch.full((1, B), -1), 0.1)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s))


def test_the_first_epoch_trains_nothing_and_fills_the_bank_at_the_batch_indexes():
    method = fit(make())
    protos = [p.weight.clone() for p in method.prototypes]
    method.on_epoch_start(TrainState(epoch=0))
    assert all(torch.equal(p.weight, q) for p, q in zip(method.prototypes, protos))  # no clustering yet
    assert (method.assignments == -1).all()
    index = torch.tensor([5, 0, 17, 9])
    v = views(1)
    out = method(v, index)
    assert out["loss"].item() == 0.0
    method.on_after_step(TrainState(step=1))
    with torch.no_grad():  # BN in train mode on the same batch: the same embeddings
        z = F.normalize(method.projector(method.backbone(torch.cat(v))), dim=1).view(2, B, D)
    torch.testing.assert_close(method.bank[:, index], z)  # crop a of image index[b] at bank[a, index[b]]
    others = torch.ones(N, dtype=torch.bool)
    others[index] = False
    assert (method.bank[:, others] == 0).all()
    assert torch.equal(method.seen, ~others)


def planted(n_groups: int, labels: torch.Tensor, seed: int) -> torch.Tensor:
    """Unit vectors near ``n_groups`` random directions, image i near direction labels[i]."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(n_groups, D, generator=g), dim=1)
    return F.normalize(centres[labels] + 0.05 * torch.randn(len(labels), D, generator=g), dim=1)


def refines(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Every cluster of ``a`` lies inside one group of ``b`` (equal partitions when both have as many groups)."""
    return bool(((a[:, None] == a[None]) <= (b[:, None] == b[None])).all())


def test_clustering_sets_the_prototypes_to_the_spherical_centroids_and_assigns_by_argmax():
    method = fit(make(num_prototypes=(2, 3, 2)))
    seen = torch.arange(N) < 20  # 4 images were not seen in the last epoch
    crop0, crop1 = torch.arange(N) % 2, torch.arange(N) // 12  # other groups in the two large crops' banks
    with torch.no_grad():
        method.bank[0], method.bank[1] = planted(2, crop0, 0), planted(2, crop1, 1)
        method.bank[:, ~seen] = F.normalize(torch.ones(D), dim=0)  # stale rows must not be clustered
        method.seen.copy_(seen)
    method.on_epoch_start(TrainState(epoch=1, step=N // B))
    # Sets 0 and 2 cluster the first crop's bank, set 1 the second's (crop h mod 2, as the official code).
    for h, (proto, groups, other) in enumerate(zip(method.prototypes, (crop0, crop1, crop0), (crop1, crop0, crop1))):
        bank, a = method.bank[h % 2, seen], method.assignments[h, seen]
        assert refines(a, groups[seen]) and not refines(a, other[seen]), f"set {h}"
        assert torch.equal(a, (bank @ proto.weight.T).argmax(1))  # the nearest centroid on the sphere
        means = torch.stack([bank[a == c].mean(0) for c in range(proto.weight.shape[0])])
        torch.testing.assert_close(proto.weight, F.normalize(means, dim=1), atol=1e-5, rtol=0)
        assert (method.assignments[h, ~seen] == -1).all()
    assert not method.seen.any()  # the next epoch banks afresh


def test_after_clustering_the_loss_is_the_formula_and_no_gradient_reaches_the_prototypes():
    method = fit(make(num_prototypes=(3, 4, 3)))
    sgd = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    assert not any(p is q for p in method.prototypes.parameters() for group in sgd.param_groups
                   for q in group["params"])
    method.on_epoch_start(TrainState(epoch=0))
    for step in range(N // B):  # the first epoch: every image banked once
        method(views(step), torch.arange(step * B, (step + 1) * B))
        method.on_after_step(TrainState(step=step + 1))
    method.on_epoch_start(TrainState(epoch=1, step=N // B))
    protos = [p.weight.clone() for p in method.prototypes]
    v, index = views(10, n_small=2), torch.tensor([3, 22, 7, 11])
    out = method(v, index)
    with torch.no_grad():
        z = F.normalize(method.projector(torch.cat([method.backbone(torch.cat(v[:2])),
                                                    method.backbone(torch.cat(v[2:]))])), dim=1)
        scores = [(z @ p.weight.T).view(4, B, -1) for p in method.prototypes]
    assert out["loss"].item() == pytest.approx(reference_loss(scores, method.assignments[:, index], 0.1), rel=1e-5)
    sgd.zero_grad()
    out["loss"].backward()
    sgd.step()
    assert all(p.grad is None and not p.requires_grad for p in method.prototypes.parameters())
    assert all(torch.equal(p.weight, q) for p, q in zip(method.prototypes, protos))
    assert method.projector[0].weight.grad.abs().sum() > 0


def test_refuses_a_single_epoch_and_more_clusters_than_images():
    with pytest.raises(SslrunError, match=r"trainer\.epochs=1; set trainer\.epochs to 2"):
        fit(make(), epochs=1)
    with pytest.raises(SslrunError, match=r"num_prototypes=\[3, 30, 3\].*has 24 images"):
        fit(make(num_prototypes=(3, 30, 3)))
    method = fit(make(num_prototypes=(3, 8, 3)))
    method.seen[:5] = True  # an epoch that saw fewer images than a set's clusters
    with pytest.raises(SslrunError, match=r"images seen in the last epoch, 5, into 8 clusters"):
        method.on_epoch_start(TrainState(epoch=1))


def test_multicrop_is_accepted_and_a_small_crop_as_the_second_large_one_refused():
    """The first two views are banked as the large crops: a small crop among them would be clustered as one."""
    method = make()
    method.check_setup([32, 32] + [18] * 6, 256)
    with pytest.raises(SslrunError, match=r"first 2 views.*augmentation\.views\.0\.count=2"):
        method.check_setup([32] + [18] * 6, 256)
