import math

import pytest
import torch
import torch.nn.functional as F

from sslrun.eval.knn import knn_predict, topk_accuracy


def brute_force_knn(train, labels, test, num_classes, k, t):
    train, test = F.normalize(train, dim=1), F.normalize(test, dim=1)
    out = []
    for q in test:
        sims = [(float(q @ x), int(y)) for x, y in zip(train, labels)]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for s, y in sims[:k]:
            votes[y] += math.exp((s - sims[0][0]) / t)  # exp(s/T) up to one factor per query: the same ranking
        out.append([v if v > 0 else -math.inf for v in votes])  # a class nobody voted for
    return torch.tensor(out)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_knn_matches_brute_force(backend):
    if backend == "faiss":
        pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(300, 12, generator=g), torch.randn(40, 12, generator=g)
    labels = torch.randint(0, 5, (300,), generator=g)
    ref = brute_force_knn(train, labels, test, 5, 20, 0.1)
    got = knn_predict(train, labels, test, 5, k=20, temperature=0.1, backend=backend, chunk=7)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_topk_accuracy():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.1, 0.6, 0.3]])
    labels = torch.tensor([0, 1, 2])
    acc = topk_accuracy(scores, labels, ks=(1, 2))
    assert acc[1] == pytest.approx(1 / 3)
    assert acc[2] == pytest.approx(1.0)


def test_top5_never_credits_a_class_without_votes():
    # Issue 8's toy: a bank of two points labelled 7 and 8, ten queries near the first, one per label 0..9.
    # With k=1 each query has one vote (class 7): only the query labelled 7 is right, at top-1 and at top-5.
    bank, bank_labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([7, 8])
    queries, labels = torch.tensor([[1.0, 0.1]]).repeat(10, 1), torch.arange(10)
    scores = knn_predict(bank, bank_labels, queries, 10, k=1, temperature=0.1)
    acc = topk_accuracy(scores, labels)
    assert acc[1] == pytest.approx(0.1) and acc[5] == pytest.approx(0.1)
    # With k=2 both classes have votes: top-5 holds 7 and 8 and nothing else.
    acc = topk_accuracy(knn_predict(bank, bank_labels, queries, 10, k=2, temperature=0.1), labels)
    assert acc[5] == pytest.approx(0.2)


def test_small_temperature_does_not_overflow():
    bank, bank_labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
    scores = knn_predict(bank, bank_labels, torch.tensor([[1.0, 0.05]]), 2, k=2, temperature=0.001)
    assert torch.isfinite(scores).all() and scores.argmax().item() == 0
