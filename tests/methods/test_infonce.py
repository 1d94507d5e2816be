import math

import pytest
import torch
import torch.nn.functional as F

from sslrun.methods.infonce import info_nce, info_nce_in_batch


def info_nce_reference(q, k, negatives, t):
    """MoCo's eq. (1) with a loop: -log exp(q.k+/t) / (exp(q.k+/t) + sum_j exp(q.n_j/t)), batch mean."""
    total = 0.0
    for qi, ki in zip(q, k):
        pos = math.exp(float(qi @ ki) / t)
        total += -math.log(pos / (pos + sum(math.exp(float(qi @ nj) / t) for nj in negatives)))
    return total / len(q)


def test_info_nce_hand_computed():
    # Query 1 = key 1 (dot 1) against negatives at dots 0 and -1; query 2 has dot 0.8 with its key and
    # dots 1 and 0 with the negatives.
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    negatives = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    for t in (1.0, 0.5):
        l1 = -math.log(math.exp(1 / t) / (math.exp(1 / t) + math.exp(0 / t) + math.exp(-1 / t)))
        l2 = -math.log(math.exp(0.8 / t) / (math.exp(0.8 / t) + math.exp(1 / t) + math.exp(0 / t)))
        assert info_nce(q, k, negatives, t).item() == pytest.approx((l1 + l2) / 2, abs=1e-6)


def test_info_nce_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    q, k = (F.normalize(torch.randn(4, 8, generator=g), dim=1) for _ in range(2))
    negatives = F.normalize(torch.randn(10, 8, generator=g), dim=1)
    assert info_nce(q, k, negatives, 0.07).item() == pytest.approx(
        info_nce_reference(q, k, negatives, 0.07), rel=1e-5)


def test_info_nce_in_batch_hand_computed():
    # Two orthogonal pairs, each key equal to its query: every row is [1, 0] / t with the positive first.
    q = torch.eye(2)
    for t in (1.0, 0.2):
        expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 1))
        assert info_nce_in_batch(q, q.clone(), t).item() == pytest.approx(expected, abs=1e-6)


def test_info_nce_in_batch_is_info_nce_with_the_other_keys_as_negatives():
    g = torch.Generator().manual_seed(1)
    q, k = (F.normalize(torch.randn(5, 6, generator=g), dim=1) for _ in range(2))
    reference = sum(info_nce_reference(q[i:i + 1], k[i:i + 1], torch.cat([k[:i], k[i + 1:]]), 0.2)
                    for i in range(5)) / 5
    assert info_nce_in_batch(q, k, 0.2).item() == pytest.approx(reference, rel=1e-5)
