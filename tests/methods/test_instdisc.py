import math

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from runner import engine_step, method_config

from sslrun.backbones.small_cnn import SmallCNN
from sslrun.errors import SslrunError
from sslrun.methods.base import FitInfo, TrainState
from sslrun.methods.instdisc import InstDisc, nce_loss
from sslrun.methods.membank import MemoryBank

N = 40  # images in the toy dataset


def nce_reference(p_pos, p_neg, n):
    """The paper's J_NCE with a loop: h = P / (P + m P_n), P_n = 1/n, m = K;
    -(1/B) sum_b [log h(pos_b) + sum_j log(1 - h(neg_bj))]."""
    p_pos, p_neg, m = p_pos.detach(), p_neg.detach(), p_neg.shape[1]
    total = 0.0
    for b in range(p_pos.shape[0]):
        h = float(p_pos[b]) / (float(p_pos[b]) + m / n)
        total += math.log(h)
        for j in range(m):
            hn = float(p_neg[b, j]) / (float(p_neg[b, j]) + m / n)
            total += math.log(1 - hn)
    return -total / p_pos.shape[0]


def build(**overrides) -> InstDisc:
    torch.manual_seed(0)
    cfg = method_config('instdisc')
    method = instantiate(cfg, backbone=SmallCNN(in_channels=3, width=8, feat_dim=32), **overrides)
    method.on_fit_start(FitInfo(N, 5, 10, 2))
    return method


def batch(n: int = 8, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 16, 16, generator=g) for _ in range(2)], torch.randperm(N, generator=g)[:n]


# ---- memory bank -------------------------------------------------------------------------------------


def test_bank_starts_with_random_unit_vectors_and_is_checkpointed():
    bank = MemoryBank(10, 4, torch.Generator().manual_seed(0))
    torch.testing.assert_close(bank.data.norm(dim=1), torch.ones(10))
    assert bank.data.std() > 0.1  # not all equal
    assert "data" in bank.state_dict()
    assert not bank.data.requires_grad


def test_bank_update_exact():
    bank = MemoryBank(3, 2)
    bank.data.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
    feats = torch.tensor([[0.0, 1.0], [0.0, -1.0]], requires_grad=True)
    bank.update(torch.tensor([0, 2]), feats, momentum=0.5)
    s = 1 / math.sqrt(2)  # 0.5*[1,0] + 0.5*[0,1] = [0.5,0.5] -> [s,s]
    # 0.5*[0.6,0.8] + 0.5*[0,-1] = [0.3,-0.1] -> /sqrt(0.1)
    expected = torch.tensor([[s, s], [0.0, 1.0], [0.3 / math.sqrt(0.1), -0.1 / math.sqrt(0.1)]])
    torch.testing.assert_close(bank.data, expected)
    assert not bank.data.requires_grad


# ---- NCE ---------------------------------------------------------------------------------------------


def test_nce_loss_hand_computed():
    # n = 4 images, K = 2 noise samples: m P_n = 0.5.
    p_pos, p_neg = torch.tensor([0.5]), torch.tensor([[0.1, 0.2]])
    expected = -(math.log(0.5 / 1.0) + math.log(0.5 / 0.6) + math.log(0.5 / 0.7))
    assert nce_loss(p_pos, p_neg, 4).item() == pytest.approx(expected, rel=1e-6)


def test_nce_loss_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    p_pos, p_neg = torch.rand(3, generator=g), torch.rand(3, 5, generator=g)
    assert nce_loss(p_pos, p_neg, 100).item() == pytest.approx(nce_reference(p_pos, p_neg, 100), rel=1e-5)


def test_forward_is_the_paper_nce_with_z_from_the_first_batch():
    method = build(nce_k=6)
    views, index = batch()
    torch.manual_seed(3)
    out = method(views, index)
    # Replay: same noise draw, the paper's P(i|v) = exp(v_i.f/T)/Z with Z = n * mean of exp(.) of this batch.
    torch.manual_seed(3)
    neg = torch.randint(N, (6,))
    f = F.normalize(method.projector(method.backbone(views[0])), dim=1)
    bank = method.bank.data
    e = torch.exp(torch.cat([(f * bank[index]).sum(1, keepdim=True), f @ bank[neg].T], 1) / method.temperature)
    z = e.mean() * N
    assert method.nce_z.item() == pytest.approx(z.item(), rel=1e-5)
    p = e / z
    assert out["loss"].item() == pytest.approx(nce_reference(p[:, 0], p[:, 1:], N), rel=1e-4)
    torch.testing.assert_close(out["z"], f)


def test_the_loss_runs_in_fp32_under_bf16_autocast():
    # Scores divided by T and exponentiated: bf16 similarities would move the loss measurably.
    method = build(nce_k=6)
    views, index = batch()
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method(views, index)
    torch.manual_seed(3)  # the same noise draw, scored from the same features with autocast off
    exact = method._loss(out["z"].detach(), index)
    assert out["loss"].dtype == torch.float32
    assert out["loss"].item() == pytest.approx(exact.item(), rel=1e-6)


def test_z_is_estimated_once_and_kept_in_checkpoints():
    method = build()
    views, index = batch()
    method(views, index)
    z = method.nce_z.item()
    method(*batch(seed=1))
    assert method.nce_z.item() == z
    resumed = build()
    resumed.load_state_dict(method.state_dict())
    resumed(*batch(seed=2))
    assert resumed.nce_z.item() == z


def test_softmax_losses():
    method = build(loss="softmax", nce_k=None)
    views, index = batch()
    out = method(views, index)
    f = F.normalize(method.projector(method.backbone(views[0])), dim=1)
    full = F.cross_entropy(f @ method.bank.data.T / method.temperature, index)
    assert out["loss"].item() == pytest.approx(full.item(), rel=1e-5)
    sampled = build(loss="softmax", nce_k=5)
    torch.manual_seed(4)
    out = sampled(views, index)
    torch.manual_seed(4)
    neg = torch.randint(N, (5,))
    f = F.normalize(sampled.projector(sampled.backbone(views[0])), dim=1)
    bank = sampled.bank.data
    logits = torch.cat([(f * bank[index]).sum(1, keepdim=True), f @ bank[neg].T], 1) / sampled.temperature
    assert out["loss"].item() == pytest.approx(F.cross_entropy(logits, torch.zeros(8, dtype=torch.long)).item(),
                                               rel=1e-5)


def test_no_gradient_into_the_bank_and_update_after_the_step():
    method = build()
    views, index = batch()
    before = method.bank.data.clone()
    out = method(views, index)
    out["loss"].backward()
    assert not method.bank.data.requires_grad and method.bank.data.grad is None
    torch.testing.assert_close(method.bank.data, before)  # forward and backward leave the bank alone
    assert method.projector.weight.grad.abs().sum() > 0
    method.on_after_step(TrainState(step=1))
    expected = F.normalize(0.5 * before[index] + 0.5 * out["z"].detach(), dim=1)
    torch.testing.assert_close(method.bank.data[index], expected)
    rest = torch.ones(N, dtype=torch.bool)
    rest[index] = False
    torch.testing.assert_close(method.bank.data[rest], before[rest])


def test_bad_config_is_a_clear_error():
    backbone = SmallCNN(in_channels=3, width=8, feat_dim=32)
    with pytest.raises(SslrunError, match="method.loss='hinge'"):
        InstDisc(backbone, loss="hinge")
    with pytest.raises(SslrunError, match="method.nce_k"):
        InstDisc(backbone, loss="nce", nce_k=None)


def test_smoke_steps_with_engine_hooks():
    method = build(nce_k=16)
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    state = TrainState()
    for step in range(3):
        method.on_epoch_start(state)
        views, index = batch(seed=step)
        out = engine_step(method, opt, views, state, index)
        assert torch.isfinite(out["loss"]) and out["z"].shape == (8, 128)
    torch.testing.assert_close(method.bank.data.norm(dim=1), torch.ones(N))
