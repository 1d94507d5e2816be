
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from runner import method_config
from torch import nn

from sslrun.backbones.small_cnn import SmallCNN
from sslrun.errors import SslrunError
from sslrun.methods.base import TrainState
from sslrun.methods.infonce import info_nce
from sslrun.methods.moco import MoCo, SplitBatchNorm, split_batchnorm


def tiny_backbone() -> SmallCNN:
    return SmallCNN(in_channels=3, width=8, feat_dim=32)


def views(n: int = 8, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 16, 16, generator=g) for _ in range(2)]


def from_yaml(name: str, **overrides) -> MoCo:
    torch.manual_seed(0)
    cfg = method_config(name)
    return instantiate(cfg, backbone=tiny_backbone(), **overrides)


# ---- split batch norm -------------------------------------------------------------------------------


def test_split_batchnorm_normalises_each_group_on_its_own():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    split = SplitBatchNorm(bn, num_splits=4)
    x = torch.randn(8, 3, 5, 5)
    out = split(x)
    for j in range(4):  # group j holds samples j and j + 4
        ref = nn.BatchNorm2d(3)
        ref.load_state_dict(bn.state_dict())
        torch.testing.assert_close(out[[j, j + 4]], ref(x[[j, j + 4]]))
    # The running statistics are the average of the groups' updates.
    means = torch.stack([x[[j, j + 4]].mean((0, 2, 3)) for j in range(4)])
    torch.testing.assert_close(split.running_mean, 0.9 * bn.running_mean + 0.1 * means.mean(0))


def test_split_batchnorm_is_plain_batchnorm_in_eval_and_keeps_the_state_dict():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 9, 6),
                          nn.BatchNorm1d(6))
    model.train()(torch.randn(8, 3, 5, 5))  # non-trivial running statistics
    keys = list(model.state_dict())
    x = torch.randn(4, 3, 5, 5)
    expected = model.eval()(x)
    split_batchnorm(model, 2)
    assert isinstance(model[1], SplitBatchNorm) and isinstance(model[4], SplitBatchNorm)
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model.eval()(x), expected)


def test_split_batchnorm_rejects_an_indivisible_batch():
    with pytest.raises(SslrunError, match="bn_splits"):
        SplitBatchNorm(nn.BatchNorm1d(2), 4).train()(torch.randn(6, 2))
    with pytest.raises(SslrunError, match="2 or more images"):
        SplitBatchNorm(nn.BatchNorm1d(2), 4).train()(torch.randn(4, 2))


def test_a_key_depends_only_on_the_samples_of_its_split():
    """Shuffle + split-BN: sample i's key is normalised with the statistics of its (random) group only."""
    torch.manual_seed(0)
    method = MoCo(tiny_backbone(), queue_size=64, bn_splits=4, proj_hidden_dim=16)
    n, splits = 16, 4
    x = views(n)[1]
    torch.manual_seed(123)
    perm = torch.randperm(n)  # the permutation _shuffled_keys draws after the same seed
    group = {int(perm[p]): p % splits for p in range(n)}  # shuffled position p falls in group p % splits
    i = 0
    same = next(j for j in range(n) if j != i and group[j] == group[i])
    other = next(j for j in range(n) if group[j] != group[i])

    def key_of_i(batch: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(123)
        return method._shuffled_keys(batch)[i]

    base = key_of_i(x)
    changed_other, changed_same = x.clone(), x.clone()
    changed_other[other] += 5.0
    changed_same[same] += 5.0
    torch.testing.assert_close(key_of_i(changed_other), base)
    assert not torch.allclose(key_of_i(changed_same), base, atol=1e-4)


def test_both_encoders_use_split_batchnorm_with_groups_per_pass():
    method = MoCo(tiny_backbone(), queue_size=64, bn_splits=4, symmetric=True, proj_hidden_dim=16)
    for encoder in (method.backbone, method.key_backbone):
        splits = {m.num_splits for m in encoder.modules() if isinstance(m, SplitBatchNorm)}
        assert splits == {8}  # 2 views per pass x 4 groups per view
    plain = MoCo(tiny_backbone(), queue_size=64, bn_splits=1, proj_hidden_dim=16)
    assert not any(isinstance(m, SplitBatchNorm) for m in plain.modules())


# ---- queue, key encoder, loss -----------------------------------------------------------------------


def step(method: MoCo, opt: torch.optim.Optimizer, batch: list[torch.Tensor], progress: float = 0.0) -> dict:
    out = method(batch, torch.arange(batch[0].shape[0]))
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    method.on_after_backward(TrainState(progress=progress))
    opt.step()
    method.on_after_step(TrainState(step=1, progress=progress))
    return out


def expected_keys(method: MoCo, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(method.key_projector(method.key_backbone(x)), dim=1)


def test_queue_receives_the_keys_in_fifo_order():
    # bn_splits=1: BN over the whole batch does not depend on the order, so the expected keys are
    # the key encoder's output on the batch as given; the shuffle must hand them back in that order.
    torch.manual_seed(0)
    method = MoCo(tiny_backbone(), queue_size=12, bn_splits=1, proj_hidden_dim=16)
    opt = torch.optim.SGD(method.param_groups()[0]["params"], lr=0.1)
    first, second = views(4, seed=1), views(4, seed=2)
    initial = method.queue.data.clone()

    keys1 = expected_keys(method, first[1])
    step(method, opt, first)
    torch.testing.assert_close(method.queue.data[:4], keys1)
    torch.testing.assert_close(method.queue.data[4:], initial[4:])
    keys2 = expected_keys(method, second[1])
    step(method, opt, second)
    torch.testing.assert_close(method.queue.data[:4], keys1)
    torch.testing.assert_close(method.queue.data[4:8], keys2)
    assert int(method.queue.ptr) == 8


def test_symmetric_queues_both_views_keys_and_sums_both_directions():
    torch.manual_seed(0)
    method = MoCo(tiny_backbone(), queue_size=16, bn_splits=1, symmetric=True, proj_hidden_dim=16)
    batch = views(4)
    negatives = method.queue.get().clone()
    state = {k: v.clone() for k, v in method.state_dict().items()}
    out = method(batch, torch.arange(4))
    # The same forward by hand: one pass per encoder over both views (restore BN running stats first).
    method.load_state_dict(state)
    x = torch.cat(batch)
    q = F.normalize(method.projector(method.backbone(x)), dim=1)
    k = expected_keys(method, x)
    expected = info_nce(q[:4], k[4:], negatives, 0.2) + info_nce(q[4:], k[:4], negatives, 0.2)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    method.on_after_step(TrainState(step=1))
    torch.testing.assert_close(method.queue.data[:8], k)


def test_key_encoder_gets_no_gradient_and_follows_the_ema():
    torch.manual_seed(0)
    method = MoCo(tiny_backbone(), queue_size=64, bn_splits=2, momentum=0.9, proj_hidden_dim=16)
    opt = torch.optim.SGD(method.param_groups()[0]["params"], lr=0.5)
    key_modules = (method.key_backbone, method.key_projector)
    query_modules = (method.backbone, method.projector)
    before = [p.clone() for m in key_modules for p in m.parameters()]
    out = method(views(8), torch.arange(8))
    opt.zero_grad()
    out["loss"].backward()
    for m in key_modules:
        assert all(p.grad is None and not p.requires_grad for p in m.parameters())
    opt.step()
    method.on_after_step(TrainState(step=1))
    query = [p for m in query_modules for p in m.parameters()]
    key = [p for m in key_modules for p in m.parameters()]
    for k_new, k_old, q in zip(key, before, query):
        torch.testing.assert_close(k_new, 0.9 * k_old + 0.1 * q)
    assert any(not torch.equal(k_new, k_old) for k_new, k_old in zip(key, before))


def test_queue_smaller_than_the_keys_of_a_step_is_an_error():
    method = MoCo(tiny_backbone(), queue_size=4, bn_splits=1, proj_hidden_dim=16)
    with pytest.raises(SslrunError, match="queue_size"):
        method.check_setup([16, 16], 8)
    method.check_setup([16, 16], 4)


@pytest.mark.parametrize("name,temperature,head", [("mocov1", 0.07, 1), ("mocov2", 0.2, 3)])
def test_yaml_builds_and_trains(name, temperature, head):
    method = from_yaml(name, queue_size=64)
    assert method.temperature == temperature and len(method.projector) == head
    opt = torch.optim.SGD(method.param_groups()[0]["params"], lr=0.05, momentum=0.9)
    for s in range(3):
        out = step(method, opt, views(16, seed=s), progress=s / 3)
        assert torch.isfinite(out["loss"]) and out["z"].shape == (16, 128)
    assert int(method.queue.ptr) == 48


def test_symmetric_yaml_option_trains():
    method = from_yaml("mocov2", queue_size=64, symmetric=True, proj_hidden_dim=16)
    opt = torch.optim.SGD(method.param_groups()[0]["params"], lr=0.05)
    for s in range(2):
        assert torch.isfinite(step(method, opt, views(16, seed=s))["loss"])
    assert int(method.queue.ptr) == 0  # 2 steps x 32 keys wrap a 64-row queue
