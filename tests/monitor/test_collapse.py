import math

import pytest
import torch

from sslrun.monitor.collapse import collapse_std, effective_rank


def test_collapse_std_extremes():
    assert collapse_std(torch.ones(64, 16)).item() == 0.0  # a constant output: collapsed
    z = torch.randn(20000, 16, generator=torch.Generator().manual_seed(0))
    assert abs(collapse_std(z).item() - 1 / math.sqrt(16)) < 0.01  # spread over the sphere: 1/sqrt(d)


@pytest.mark.parametrize("d", [1, 4, 32])
def test_rankme_of_identity_is_full_rank(d):
    # All singular values equal: p_k = 1/d, entropy log d, rank d (up to RankMe's epsilon).
    assert effective_rank(torch.eye(d)).item() == pytest.approx(d, rel=1e-4)
    assert effective_rank(7.0 * torch.eye(d)).item() == pytest.approx(d, rel=1e-4)  # scale does not matter


def test_rankme_of_rank_one_is_one():
    u, v = torch.randn(50, 1), torch.randn(1, 20)
    assert effective_rank(u @ v).item() == pytest.approx(1.0, abs=1e-3)
    assert effective_rank(torch.ones(64, 16)).item() == pytest.approx(1.0, abs=1e-3)  # collapsed output


def test_rankme_hand_computed_two_unequal_directions():
    # Singular values 3 and 1: p = (3/4, 1/4), rank = exp(-(3/4 ln 3/4 + 1/4 ln 1/4)) = 4 / 3^(3/4).
    z = torch.diag(torch.tensor([3.0, 1.0]))
    assert effective_rank(z).item() == pytest.approx(4 / 3 ** 0.75, rel=1e-4)
