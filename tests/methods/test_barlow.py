import math

import pytest
import torch
from hydra.utils import instantiate
from runner import engine_step, method_config

from sslrun.backbones.small_cnn import SmallCNN
from sslrun.methods.barlow import BarlowTwins, barlow_twins_loss
from sslrun.methods.base import TrainState

A = [1.0, -1.0, 1.0, -1.0]  # two standardised columns (mean 0, variance 1) ...
C = [1.0, 1.0, -1.0, -1.0]  # ... orthogonal to each other
EPS = 1e-5  # BN's epsilon: standardised columns are divided by sqrt(1 + eps)


def barlow_reference(z1: torch.Tensor, z2: torch.Tensor, lambd: float) -> float:
    """The paper's eq. (1)-(2) written out, each view standardised along its own batch."""
    n, d = z1.shape

    def standardise(z: torch.Tensor) -> list[list[float]]:
        cols = []
        for j in range(d):
            col = [z[b, j].item() for b in range(n)]
            mean = sum(col) / n
            var = sum((x - mean) ** 2 for x in col) / n
            cols.append([(x - mean) / math.sqrt(var + EPS) for x in col])
        return cols

    a, b = standardise(z1), standardise(z2)
    loss = 0.0
    for i in range(d):
        for j in range(d):
            cij = sum(a[i][k] * b[j][k] for k in range(n)) / n
            loss += (1 - cij) ** 2 if i == j else lambd * cij ** 2
    return loss


def test_hand_computed_on_and_off_diagonal_terms():
    # z1 = [A, C], z2 = [A, A]: C = [[1, 1], [0, 0]] (up to BN's eps). The on-diagonal term is
    # (1 - 1)^2 + (1 - 0)^2 = 1 and the off-diagonal one lambda * (1^2 + 0^2) = lambda.
    z1 = torch.tensor([A, C]).T
    z2 = torch.tensor([A, A]).T
    for lambd in (0.0051, 0.5):
        assert barlow_twins_loss(z1, z2, lambd).item() == pytest.approx(1 + lambd, abs=1e-4)
    assert barlow_twins_loss(z1, z2, 0.5, scale_loss=0.1).item() == pytest.approx(0.15, abs=1e-5)


def test_identical_views_have_no_on_diagonal_loss():
    z = torch.randn(16, 5, generator=torch.Generator().manual_seed(0))
    on_diag_only = barlow_twins_loss(z, z.clone(), lambd=0.0)
    assert on_diag_only.item() == pytest.approx(0.0, abs=1e-6)
    # Two perfectly correlated and mutually decorrelated dimensions: zero loss altogether.
    z = torch.tensor([A, C]).T
    assert barlow_twins_loss(z, z.clone(), lambd=0.0051).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("lambd", [0.0051, 1.0])
def test_matches_the_papers_formula(lambd):
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    assert barlow_twins_loss(z1, z2, lambd).item() == pytest.approx(barlow_reference(z1, z2, lambd), rel=1e-5)


def test_invariant_to_per_dimension_affine_rescaling_of_each_view():
    # Per-view BN: each view may get its own per-dimension scale and shift (a concatenated-batch BN
    # would not cancel a shift applied to one view only).
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(32, 6, generator=g), torch.randn(32, 6, generator=g)
    base = barlow_twins_loss(z1, z2, 0.0051)
    scale1, scale2 = torch.rand(6, generator=g) * 5 + 0.1, torch.rand(6, generator=g) * 5 + 0.1
    shift1, shift2 = torch.randn(6, generator=g) * 10, torch.randn(6, generator=g) * 10
    moved = barlow_twins_loss(z1 * scale1 + shift1, z2 * scale2 + shift2, 0.0051)
    assert moved.item() == pytest.approx(base.item(), rel=1e-4)


def test_yaml_builds_and_trains():
    torch.manual_seed(0)
    method = instantiate(method_config('barlow'), backbone=SmallCNN(3, 8, 32), proj_hidden_dim=16,
                         proj_output_dim=16)
    assert isinstance(method, BarlowTwins) and (method.lambd, method.scale_loss) == (0.0051, 1.0)
    opt, state = torch.optim.SGD(method.parameters(), lr=0.01, momentum=0.9), TrainState()
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        views = [torch.randn(8, 3, 16, 16, generator=g) for _ in range(2)]
        out = engine_step(method, opt, views, state, torch.arange(8))
        assert torch.isfinite(out["loss"]) and out["z"].shape == (8, 16)
    assert method.backbone.conv1[0].weight.grad is not None


def test_bf16_autocast_computes_the_loss_in_fp32():
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = barlow_twins_loss(z1.bfloat16(), z2.bfloat16(), 0.0051)
    assert loss.dtype == torch.float32
    expected = barlow_twins_loss(z1.bfloat16().float(), z2.bfloat16().float(), 0.0051)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
