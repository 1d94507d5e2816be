import math

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from runner import engine_step, method_config

from sslrun.backbones.small_cnn import SmallCNN
from sslrun.methods.base import TrainState
from sslrun.methods.invaspread import invaspread_loss


def loss_reference(f: torch.Tensor, t: float) -> float:
    """The paper's loss with loops (the official BatchCriterion, negM = 1): rows i and i' = (i + n) mod 2n are
    the two views of one image."""
    m, n = f.shape[0], f.shape[0] // 2
    total = 0.0
    for i in range(m):
        others = [j for j in range(m) if j != i]
        z = sum(math.exp(float(f[i] @ f[j]) / t) for j in others)
        partner = (i + n) % m
        total += math.log(math.exp(float(f[i] @ f[partner]) / t) / z)
        total += sum(math.log(1 - math.exp(float(f[i] @ f[j]) / t) / z) for j in others if j != partner)
    return -total / m


def in_batch(f: torch.Tensor, t: float) -> torch.Tensor:
    rows = torch.arange(f.shape[0])
    return invaspread_loss(f, f, rows, (rows + f.shape[0] // 2) % f.shape[0], t)


def test_loss_hand_computed():
    # Two images, each view identical to its partner, the images orthogonal; T = 1. Every row sees its partner
    # at similarity 1 and two negatives at 0: -[log(e/(e+2)) + 2 log(1 - 1/(e+2))].
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    e = math.e
    expected = -(math.log(e / (e + 2)) + 2 * math.log((e + 1) / (e + 2)))
    assert in_batch(f, 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_loss_matches_loop_reference_at_the_configured_temperature():
    t = method_config("invaspread").temperature
    assert t == 0.1  # the paper's tau
    f = F.normalize(torch.randn(10, 6, generator=torch.Generator().manual_seed(0)), dim=1)
    assert in_batch(f, t).item() == pytest.approx(loss_reference(f, t), rel=1e-5)


def test_gradient_flows_through_the_rows_only():
    # The candidates are constant class weights (the official feat.data): d loss / d f equals the gradient of the
    # reference in which only the row side varies.
    g = torch.Generator().manual_seed(1)
    f = F.normalize(torch.randn(6, 4, generator=g), dim=1).requires_grad_()
    rows = torch.arange(6)
    invaspread_loss(f, f, rows, (rows + 3) % 6, 0.5).backward()
    fixed = f.detach().clone()
    rowside = f.detach().clone().requires_grad_()
    invaspread_loss(rowside, fixed, rows, (rows + 3) % 6, 0.5).backward()
    torch.testing.assert_close(f.grad, rowside.grad)
    assert f.grad.abs().sum() > 0


def test_the_loss_prefers_invariant_spread_features():
    # Partners equal and images apart scores lower than partners apart.
    good = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    bad = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    assert in_batch(good, 0.1) < in_batch(bad, 0.1)


def test_steps_on_synthetic_views():
    torch.manual_seed(0)
    method = instantiate(method_config("invaspread"), backbone=SmallCNN(in_channels=3, width=8, feat_dim=32))
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    views = [torch.randn(8, 3, 16, 16) for _ in range(2)]
    losses = [engine_step(method, opt, views, TrainState())["loss"].item() for _ in range(3)]
    assert all(math.isfinite(v) for v in losses)
    out = method(views, torch.arange(8))
    assert out["z"].shape == (8, 128)
    torch.testing.assert_close(out["z"].norm(dim=1), torch.ones(8))
    assert losses[-1] < losses[0]  # the same batch, three steps: the loss must fall
