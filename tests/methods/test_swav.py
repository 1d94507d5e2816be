import math

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from runner import engine_step, method_config

from sslrun.backbones.small_cnn import SmallCNN
from sslrun.methods.base import FitInfo, TrainState
from sslrun.methods.sinkhorn import sinkhorn
from sslrun.methods.swav import SwAV, swapped_prediction_loss

B = 4


def swav_loss_reference(scores: torch.Tensor, codes: torch.Tensor, t: float) -> float:
    """The paper's loss written out: for each coded crop a and every other crop v,
    -1/B sum_b sum_k q_a[b,k] log(exp(s_v[b,k]/t) / sum_k' exp(s_v[b,k']/t)), averaged over v != a, then over a."""
    n_views, n_b, n_k = scores.shape
    total = 0.0
    for a in range(codes.shape[0]):
        sub = 0.0
        for v in range(n_views):
            if v == a:
                continue
            for b in range(n_b):
                denom = sum(math.exp(scores[v, b, j].item() / t) for j in range(n_k))
                sub -= sum(codes[a, b, k].item() * math.log(math.exp(scores[v, b, k].item() / t) / denom)
                           for k in range(n_k)) / n_b
        total += sub / (n_views - 1)
    return total / codes.shape[0]


def make_views(n_small: int = 0, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(B, 3, 16, 16, generator=g) for _ in range(2)]
            + [torch.randn(B, 3, 8, 8, generator=g) for _ in range(n_small)])


def make_swav(**kw) -> SwAV:
    torch.manual_seed(0)
    args = {"proj_hidden_dim": 16, "proj_output_dim": 8, "num_prototypes": 6, "queue_length": 0,
            "freeze_prototypes_iters": 0}
    return SwAV(SmallCNN(in_channels=3, width=8, feat_dim=32), **{**args, **kw})



def sgd(method: SwAV, lr: float = 0.5) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=lr, momentum=0.9, weight_decay=1e-2)


def scores_of(method: SwAV, views: list[torch.Tensor]) -> torch.Tensor:
    """Recompute the prototype scores [V, B, K] of the views (BN in train mode: the same batch statistics)."""
    with torch.no_grad():
        z = F.normalize(method.projector(method.backbone(torch.cat(views))), dim=1)
        return method.prototypes(z).view(len(views), B, -1)


@pytest.mark.parametrize("n_views", [2, 6])
def test_swapped_prediction_matches_the_papers_formula(n_views):
    g = torch.Generator().manual_seed(n_views)
    scores = torch.randn(n_views, 3, 5, generator=g)
    codes = torch.softmax(torch.randn(2, 3, 5, generator=g), -1)
    got = swapped_prediction_loss(scores, codes, 0.1).item()
    assert got == pytest.approx(swav_loss_reference(scores, codes, 0.1), rel=1e-5)


def test_swapped_prediction_hand_computed():
    # Two crops, one sample, two prototypes; uniform scores -> p = (1/2, 1/2) -> each term is log 2.
    scores = torch.zeros(2, 1, 2)
    codes = torch.tensor([[[1.0, 0.0]], [[0.3, 0.7]]])
    assert swapped_prediction_loss(scores, codes, 0.1).item() == pytest.approx(math.log(2))


@pytest.mark.parametrize("n_small", [0, 4])
def test_multicrop_one_backbone_call_per_size(n_small):
    method = make_swav()
    calls = []
    method.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    views = make_views(n_small)
    out = method(views, torch.arange(B))
    assert calls == [(2 * B, 3, 16, 16)] + ([(n_small * B, 3, 8, 8)] if n_small else [])
    assert out["codes"].shape == (2, B, 6) and out["z"].shape == (B, 8)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert method.backbone.conv1[0].weight.grad is not None


def test_forward_loss_is_the_formula_on_its_scores_and_codes():
    method = make_swav()
    views = make_views()
    out = method(views, torch.arange(B))
    expected = swav_loss_reference(scores_of(method, views), out["codes"], 0.1)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)


def test_codes_carry_no_gradient_and_are_the_sinkhorn_codes_of_the_large_crops():
    method = make_swav()
    views = make_views(4)
    out = method(views, torch.arange(B))
    codes = out["codes"]
    assert not codes.requires_grad and codes.grad_fn is None
    torch.testing.assert_close(codes.sum(-1), torch.ones(2, B))
    out["loss"].backward()
    assert method.prototypes.weight.grad is not None  # the prediction side does get gradient


def test_prototypes_unit_norm_after_a_step():
    method = make_swav()
    opt, state = sgd(method, lr=5.0), TrainState()
    out = method(make_views(), torch.arange(B))
    out["loss"].backward()
    method.on_after_backward(state)
    opt.step()
    norms = method.prototypes.weight.norm(dim=1)
    assert (norms - 1).abs().max() > 1e-3  # the step moved them off the sphere ...
    state.step += 1
    method.on_after_step(state)
    torch.testing.assert_close(method.prototypes.weight.norm(dim=1), torch.ones(6))  # ... and the hook put them back


def test_prototypes_frozen_for_the_first_iterations():
    method = make_swav(freeze_prototypes_iters=2)
    opt, state = sgd(method), TrainState()
    w0, p0 = method.prototypes.weight.detach().clone(), method.projector[0].weight.detach().clone()
    for _ in range(2):
        engine_step(method, opt, make_views(seed=state.step), state)
        assert method.prototypes.weight.grad is None
    torch.testing.assert_close(method.prototypes.weight, w0, rtol=0, atol=1e-6)
    assert not torch.allclose(method.projector[0].weight, p0)  # the rest of the network did train
    engine_step(method, opt, make_views(seed=2), state)
    assert (method.prototypes.weight - w0).abs().max() > 1e-3


def test_queue_used_only_from_its_start_epoch_and_once_full():
    method = make_swav(queue_length=2 * B, queue_start_epoch=1)
    opt, state = sgd(method, lr=0.05), TrainState()
    method.on_fit_start(FitInfo(num_samples=64, steps_per_epoch=2, total_steps=8, epochs=4))
    method.on_epoch_start(state)
    for _ in range(2):  # epoch 0: the queue is off, nothing enters it
        views = make_views(seed=state.step)
        out = engine_step(method, opt, views, state)
    assert [int(q.filled) for q in method.queues] == [0, 0]

    state.epoch = 1
    method.on_epoch_start(state)
    for filled in (B, 2 * B):  # epoch 1: it fills, and is not used while filling
        views = make_views(seed=state.step)
        s = scores_of(method, views)
        out = engine_step(method, opt, views, state)
        torch.testing.assert_close(out["codes"], torch.stack([sinkhorn(s[i])[-B:] for i in range(2)]))
        assert [int(q.filled) for q in method.queues] == [filled, filled]

    # Full: its embeddings, scored by the current prototypes, are prepended to the Sinkhorn input.
    views = make_views(seed=99)
    s = scores_of(method, views)
    queued = [q.data.clone() for q in method.queues]
    w = method.prototypes.weight.detach()
    out = method(views, torch.arange(B))
    expected = torch.stack([sinkhorn(torch.cat([queued[i] @ w.T, s[i]]))[-B:] for i in range(2)])
    torch.testing.assert_close(out["codes"], expected)
    assert not torch.allclose(out["codes"], torch.stack([sinkhorn(s[i])[-B:] for i in range(2)]), atol=1e-3)
    # The queue holds past large-crop embeddings: unit vectors, view 1 in queue 0 and view 2 in queue 1.
    torch.testing.assert_close(queued[0].norm(dim=1), torch.ones(2 * B))


def test_queue_is_saved_in_checkpoints():
    method = make_swav(queue_length=2 * B, queue_start_epoch=0)
    keys = method.state_dict().keys()
    assert {"queues.0.data", "queues.0.ptr", "queues.1.filled"} <= set(keys)


@pytest.mark.parametrize("n_small", [0, 4])
def test_yaml_builds_and_trains(n_small):
    torch.manual_seed(0)
    method = instantiate(method_config('swav'), backbone=SmallCNN(3, 8, 32), proj_hidden_dim=16,
                         proj_output_dim=8, num_prototypes=6, queue_length=2 * B, queue_start_epoch=0,
                         freeze_prototypes_iters=1)
    assert (method.temperature, method.sinkhorn_epsilon, method.sinkhorn_iters) == (0.1, 0.05, 3)
    opt, state = sgd(method, lr=0.05), TrainState()
    method.on_fit_start(FitInfo(num_samples=64, steps_per_epoch=4, total_steps=4, epochs=1))
    method.on_epoch_start(state)
    for _ in range(4):
        state.progress = state.step / 4
        out = engine_step(method, opt, make_views(n_small, seed=state.step), state)
        assert torch.isfinite(out["loss"])
    assert int(method.queues[0].filled) == 2 * B


def test_bf16_autocast_keeps_scores_and_codes_in_fp32():
    method = make_swav()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method(make_views(2), torch.arange(B))
    assert out["codes"].dtype == torch.float32 and out["loss"].dtype == torch.float32
    out["loss"].backward()
    assert torch.isfinite(method.prototypes.weight.grad).all()
