import math

import pytest
import torch
import torch.nn.functional as F

from sslrun.methods.infonce import info_nce
from sslrun.methods.losses import negative_cosine, nt_xent


def nt_xent_reference(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """The paper's eq. (1), l(i,j) = -log exp(s_ij/t) / sum_{k!=i} exp(s_ik/t), averaged over all 2N anchors."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        denom = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[j]) / t) / denom)
    return torch.tensor(total / (2 * n))


def test_nt_xent_hand_computed():
    # Two orthogonal images, each view identical to its pair: every anchor sees its positive at
    # similarity 1 and two negatives at 0, so the loss is -log(e / (e + 2)) at T = 1.
    z = torch.eye(2)
    assert nt_xent(z, z.clone(), 1.0).item() == pytest.approx(math.log(1 + 2 / math.e), abs=1e-6)


@pytest.mark.parametrize("t", [0.1, 0.5])
def test_nt_xent_matches_formula(t):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    assert nt_xent(z1, z2, t).item() == pytest.approx(nt_xent_reference(z1, z2, t).item(), rel=1e-5)


def test_nt_xent_invariant_to_scale_and_view_swap():
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    base = nt_xent(z1, z2, 0.2)
    assert nt_xent(3 * z1, 0.5 * z2, 0.2).item() == pytest.approx(base.item(), rel=1e-5)
    assert nt_xent(z2, z1, 0.2).item() == pytest.approx(base.item(), rel=1e-5)


def test_negative_cosine_value_and_stop_gradient():
    p = torch.tensor([[1.0, 0.0], [1.0, 1.0]], requires_grad=True)
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    loss = negative_cosine(p, z)
    assert loss.item() == pytest.approx(-(1.0 + 1 / math.sqrt(2)) / 2, abs=1e-6)
    loss.backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    assert z.grad is None  # the target branch gets no gradient


def test_negative_cosine_without_stop_gradient_reaches_target():
    p = torch.randn(3, 4, requires_grad=True)
    z = torch.randn(3, 4, requires_grad=True)
    negative_cosine(p, z, stop_gradient=False).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


@pytest.mark.parametrize("loss_fn", [lambda a, b: nt_xent(a, b, 0.1), negative_cosine,
                                     lambda a, b: info_nce(a, b, b, 0.07)])
def test_losses_run_in_fp32_under_bf16_autocast(loss_fn):
    # Rounding the similarities to bf16 would move the loss by ~1e-2; the fp32 loss matches to ~1e-6.
    torch.manual_seed(0)
    a, b = F.normalize(torch.randn(64, 32), dim=1), F.normalize(torch.randn(64, 32), dim=1)
    exact = loss_fn(a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = loss_fn(a.bfloat16(), b.bfloat16())
    rounded = loss_fn(a.bfloat16().float(), b.bfloat16().float())  # only the inputs' own rounding
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, rounded, rtol=1e-5, atol=1e-6)
    assert torch.isclose(mixed, exact, atol=2e-2)
