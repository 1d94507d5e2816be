import math

import pytest
import torch

from sslrun.methods.sinkhorn import sinkhorn


def _scores(b: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(b, k, generator=g), dim=1)


def test_hand_computed_2x2_one_iteration():
    # epsilon = 1 and scores = log M make exp(scores / eps) = M. With M = [[1, 2], [3, 4]] (2 samples x
    # 2 prototypes), Q = M^T = [[1, 3], [2, 4]] / 10. Prototype rows sum to .4 and .6 -> divide, /K:
    # [[1/8, 3/8], [1/6, 1/3]]; sample columns sum to 7/24 and 17/24 -> divide, /B: [[3/14, 9/34], [4/14, 8/34]];
    # x B and transposed: [[3/7, 4/7], [9/17, 8/17]].
    m = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    q = sinkhorn(m.log(), epsilon=1.0, n_iters=1)
    torch.testing.assert_close(q, torch.tensor([[3 / 7, 4 / 7], [9 / 17, 8 / 17]]))


def test_zero_iterations_is_the_normalised_gibbs_kernel_times_b():
    s = _scores(3, 4)
    q = sinkhorn(s, epsilon=0.5, n_iters=0)
    e = torch.exp(s / 0.5)
    torch.testing.assert_close(q, e / e.sum() * 3)


@pytest.mark.parametrize("b,k", [(8, 5), (4, 12)])
def test_marginals(b, k):
    s = _scores(b, k)
    # The official code ends on the sample normalisation, so after any number of iterations every
    # sample's codes sum to exactly 1 ...
    q = sinkhorn(s, epsilon=0.05, n_iters=3)
    torch.testing.assert_close(q.sum(1), torch.ones(b))
    # ... and the prototypes share the batch equally (each gets B/K) once it has converged.
    q = sinkhorn(s, epsilon=0.5, n_iters=500)
    torch.testing.assert_close(q.sum(0), torch.full((k,), b / k), rtol=1e-4, atol=1e-5)
    assert (q >= 0).all()


def test_each_iteration_moves_towards_equipartition():
    s = _scores(64, 10)
    gaps = [sinkhorn(s, epsilon=0.05, n_iters=n).sum(0).sub(6.4).abs().max().item() for n in (0, 1, 3, 30)]
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 0.1


def test_invariant_to_a_constant_added_to_all_scores():
    s = _scores(6, 5)
    base = sinkhorn(s)
    torch.testing.assert_close(sinkhorn(s + 0.7), base)
    # +10 at epsilon 0.05 is exp(200) before normalisation: no overflow either.
    torch.testing.assert_close(sinkhorn(s + 10.0), base)


def test_float32_without_gradient():
    s = _scores(4, 3).to(torch.bfloat16).requires_grad_()
    q = sinkhorn(s)
    assert q.dtype == torch.float32
    assert not q.requires_grad and q.grad_fn is None


def test_assigns_each_sample_to_its_best_prototype_when_the_batch_is_balanced():
    # Two samples, each closest to a different prototype: the equipartition is also the argmax.
    s = torch.tensor([[1.0, 0.2], [0.1, 0.9]])
    q = sinkhorn(s, epsilon=0.05, n_iters=3)
    assert q.argmax(1).tolist() == [0, 1]
    assert q[0, 0].item() > 1 - math.exp(-10)
