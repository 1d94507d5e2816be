import math

import pytest
import torch
from hydra.utils import instantiate
from runner import engine_step, method_config

from sslrun.backbones.small_cnn import SmallCNN
from sslrun.methods.base import FitInfo, TrainState
from sslrun.methods.dino import DINO, clip_per_parameter, dino_loss, teacher_temperature
from sslrun.methods.momentum import cosine_momentum

B = 4
OUT = 10


def dino_loss_reference(s: torch.Tensor, t: torch.Tensor, c: torch.Tensor, ts: float, tt: float) -> float:
    """The paper's Algorithm 1 written out: for each teacher crop i and student crop v != i,
    -1/B sum_b sum_k P_t(i)[b,k] log P_s(v)[b,k]; averaged over those pairs."""
    def softmax(row: list[float]) -> list[float]:
        e = [math.exp(x) for x in row]
        return [x / sum(e) for x in e]

    total, terms = 0.0, 0
    for i in range(t.shape[0]):
        for v in range(s.shape[0]):
            if v == i:
                continue
            for b in range(s.shape[1]):
                pt = softmax([(t[i, b, k] - c[0, k]).item() / tt for k in range(s.shape[2])])
                ps = softmax([s[v, b, k].item() / ts for k in range(s.shape[2])])
                total -= sum(p * math.log(q) for p, q in zip(pt, ps)) / s.shape[1]
            terms += 1
    return total / terms


def make_dino(**kw) -> DINO:
    torch.manual_seed(0)
    args = {"out_dim": OUT, "hidden_dim": 16, "bottleneck_dim": 8, "clip_grad": 0.0, "freeze_last_layer": 0}
    return DINO(SmallCNN(in_channels=3, width=8, feat_dim=32), **{**args, **kw})


def make_views(n_small: int = 0, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(B, 3, 16, 16, generator=g) for _ in range(2)]
            + [torch.randn(B, 3, 8, 8, generator=g) for _ in range(n_small)])



def sgd(method: DINO, lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=lr, momentum=0.9)


@pytest.mark.parametrize("n_views", [2, 5])
def test_dino_loss_matches_the_naive_reference(n_views):
    g = torch.Generator().manual_seed(n_views)
    s, t, c = torch.randn(n_views, 3, 6, generator=g), torch.randn(2, 3, 6, generator=g), torch.randn(1, 6, generator=g)
    got = dino_loss(s, t, c, 0.1, 0.04).item()
    assert got == pytest.approx(dino_loss_reference(s, t, c, 0.1, 0.04), rel=1e-5)


def test_dino_loss_skips_same_view_pairs():
    # Teacher crop 0 is one-hot on class 0, crop 1 on class 1 (a centre of 0 and a tiny temperature);
    # student crop 0 says class 1 and crop 1 says class 0, each with certainty: only the cross pairs
    # (teacher 0, student 1) and (teacher 1, student 0) are counted, and both are right, so the loss is ~0.
    big = 50.0
    s = torch.tensor([[[0.0, big]], [[big, 0.0]]])
    t = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    assert dino_loss(s, t, torch.zeros(1, 2), 0.1, 0.01).item() == pytest.approx(0.0, abs=1e-6)


def test_centre_update_is_exact():
    method = make_dino()
    with torch.no_grad():
        method.center.fill_(0.5)
    views = make_views(2)
    out = method(views, torch.arange(B))
    with torch.no_grad():  # the teacher's outputs for the two global crops (BN in train mode: same statistics)
        t = method.teacher_head(method.teacher_backbone(torch.cat(views[:2])))
    out["loss"].backward()
    state = TrainState(step=1)
    method.on_after_step(state)
    torch.testing.assert_close(method.center, 0.9 * 0.5 + 0.1 * t.mean(0, keepdim=True))
    assert "center" in method.state_dict()


def test_teacher_temperature_schedule():
    assert teacher_temperature(0, 0.04, 0.07, 30) == pytest.approx(0.04)
    assert teacher_temperature(15, 0.04, 0.07, 30) == pytest.approx(0.055)
    assert teacher_temperature(30, 0.04, 0.07, 30) == pytest.approx(0.07)
    assert teacher_temperature(80, 0.04, 0.07, 30) == pytest.approx(0.07)
    assert teacher_temperature(0, 0.04, 0.07, 0) == pytest.approx(0.07)  # no warm-up
    method = make_dino(warmup_teacher_temp_epochs=30)
    method.on_fit_start(FitInfo(num_samples=64, steps_per_epoch=10, total_steps=1000, epochs=100))
    method.on_after_step(TrainState(step=100, epoch=10, progress=0.1))  # epoch 10 of 100
    assert method.current_teacher_temp() == pytest.approx(0.04 + 0.03 / 3)


def test_no_gradient_reaches_the_teacher():
    method = make_dino()
    assert not any(p.requires_grad for p in method.teacher_backbone.parameters())
    # Even with requires_grad switched on, the teacher runs under no_grad: no graph, no gradient.
    for p in list(method.teacher_backbone.parameters()) + list(method.teacher_head.parameters()):
        p.requires_grad_(True)
    method(make_views(2), torch.arange(B))["loss"].backward()
    assert all(p.grad is None for p in method.teacher_backbone.parameters())
    assert all(p.grad is None for p in method.teacher_head.parameters())
    assert method.backbone.conv1[0].weight.grad is not None


def test_teacher_is_an_ema_of_the_student():
    method = make_dino(base_momentum=0.9)
    opt = sgd(method, lr=1.0)
    t0 = method.teacher_head.mlp[0].weight.clone()
    state = TrainState(progress=0.25)
    engine_step(method, opt, make_views(), state)
    m = cosine_momentum(0.9, 0.25)
    torch.testing.assert_close(method.teacher_head.mlp[0].weight, m * t0 + (1 - m) * method.head.mlp[0].weight)


def test_last_layer_frozen_in_epoch_zero():
    method = make_dino(freeze_last_layer=1)
    last = method.head.last_layer.parametrizations.weight.original1  # the direction v of the weight norm
    opt = sgd(method)
    v0 = last.detach().clone()
    engine_step(method, opt, make_views(2), TrainState(epoch=0))
    assert last.grad is None
    torch.testing.assert_close(last, v0, rtol=0, atol=0)
    engine_step(method, opt, make_views(2), TrainState(epoch=1))
    assert last.grad is not None and not torch.equal(last, v0)


def test_weight_norm_gain_frozen_at_one():
    method = make_dino(norm_last_layer=True)
    gain = method.head.last_layer.parametrizations.weight.original0
    assert not gain.requires_grad and torch.equal(gain, torch.ones_like(gain))
    w = method.head.last_layer.weight
    torch.testing.assert_close(w.norm(dim=1), torch.ones(OUT))
    assert make_dino(norm_last_layer=False).head.last_layer.parametrizations.weight.original0.requires_grad


def test_per_parameter_clipping():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.1, 0.2, 0.2])  # norms 5 and 0.3
    clip_per_parameter([a, b], 1.0)
    # Each gradient on its own: a is scaled by 1 / (5 + 1e-6), b (below the threshold) is untouched.
    torch.testing.assert_close(a.grad, torch.tensor([3.0, 4.0]) / (5 + 1e-6))
    torch.testing.assert_close(b.grad, torch.tensor([0.1, 0.2, 0.2]))


def test_clipping_in_on_after_backward():
    method = make_dino(clip_grad=1e-3)
    method(make_views(2), torch.arange(B))["loss"].backward()
    method.on_after_backward(TrainState(epoch=1))
    norms = torch.stack([p.grad.norm() for p in method.parameters() if p.grad is not None])
    assert len(norms) == sum(p.requires_grad for p in method.parameters())
    assert norms.max() <= 1e-3 * (1 + 1e-5) and norms.min() > 0


@pytest.mark.parametrize("n_small", [0, 4])
def test_yaml_builds_and_trains(n_small):
    torch.manual_seed(0)
    method = instantiate(method_config('dino'), backbone=SmallCNN(3, 8, 32), out_dim=OUT,
                         hidden_dim=16, bottleneck_dim=8)
    assert (method.clip_grad, method.freeze_last_layer, method.student_temp) == (3.0, 1, 0.1)
    assert (method.base_momentum, method.final_momentum) == (0.9995, 1.0)
    opt, state = sgd(method, lr=0.05), TrainState()
    method.on_fit_start(FitInfo(num_samples=16, steps_per_epoch=2, total_steps=4, epochs=2))
    calls = []
    method.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[-1]))
    for epoch in range(2):
        state.epoch = epoch
        method.on_epoch_start(state)
        for _ in range(2):
            state.progress = state.step / 4
            out = engine_step(method, opt, make_views(n_small, seed=state.step), state)
            assert torch.isfinite(out["loss"]) and out["z"].shape == (B, OUT)
    # The student's backbone: one call per crop size each step (the teacher has its own copy).
    assert calls == ([16, 8] if n_small else [16]) * 4


def test_bf16_autocast_keeps_the_logits_in_fp32():
    method = make_dino()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method(make_views(2), torch.arange(B))
    assert out["z"].dtype == torch.float32 and out["loss"].dtype == torch.float32
    out["loss"].backward()
    assert torch.isfinite(method.head.last_layer.parametrizations.weight.original1.grad).all()
