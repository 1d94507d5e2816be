import math

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from runner import method_config
from torch import nn

from sslrun.backbones.small_cnn import SmallCNN
from sslrun.backbones.vit import vit_tiny
from sslrun.methods.base import TrainState
from sslrun.methods.mocov3 import MoCoV3, mocov3_loss


def views(n: int = 8, seed: int = 0, size: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, size, size, generator=g) for _ in range(2)]


def small_mocov3(backbone: nn.Module | None = None, **kw) -> MoCoV3:
    torch.manual_seed(0)
    return MoCoV3(backbone or SmallCNN(in_channels=3, width=8, feat_dim=32), proj_hidden_dim=32,
                  proj_output_dim=16, pred_hidden_dim=32, **kw)


def mocov3_reference(q: torch.Tensor, k: torch.Tensor, t: float) -> float:
    """2t * mean_i -log(exp(q_i.k_i/t) / sum_j exp(q_i.k_j/t)) on l2-normalised rows, with loops."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    total = 0.0
    for i in range(len(q)):
        logits = [float(q[i] @ k[j]) / t for j in range(len(k))]
        total += -(logits[i] - math.log(sum(math.exp(v) for v in logits)))
    return 2 * t * total / len(q)


@pytest.mark.parametrize("t", [0.2, 1.0])
def test_loss_is_2t_times_cross_entropy(t):
    g = torch.Generator().manual_seed(0)
    q, k = 3 * torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    assert mocov3_loss(q, k, t).item() == pytest.approx(mocov3_reference(q, k, t), rel=1e-5)


def test_loss_hand_computed():
    # Orthogonal pairs with keys equal to queries: each row is [1, 0] / t, CE = log(1 + e^(-1/t)).
    q = torch.eye(2)
    assert mocov3_loss(q, q.clone(), 0.5).item() == pytest.approx(2 * 0.5 * math.log(1 + math.exp(-2)), abs=1e-6)


def test_heads_end_in_bn_without_affine():
    method = small_mocov3()
    linears = [m for m in method.projector if isinstance(m, nn.Linear)]
    assert len(linears) == 3 and len([m for m in method.predictor if isinstance(m, nn.Linear)]) == 2
    for head in (method.projector, method.predictor):
        assert isinstance(head[-1], nn.BatchNorm1d) and not head[-1].affine


def test_forward_is_symmetric_and_no_gradient_reaches_the_momentum_encoder():
    method = small_mocov3()
    batch = views(8)
    state = {k: v.clone() for k, v in method.state_dict().items()}
    out = method(batch, torch.arange(8))
    out["loss"].backward()
    for module in (method.target_backbone, method.target_projector):
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())
    assert all(p.grad is not None for p in method.backbone.parameters())
    method.load_state_dict(state)
    with torch.no_grad():
        x = torch.cat(batch)
        q = method.predictor(method.projector(method.backbone(x)))
        k = method.target_projector(method.target_backbone(x))
    expected = mocov3_reference(q[:8], k[8:], 0.2) + mocov3_reference(q[8:], k[:8], 0.2)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)


def test_momentum_schedule_endpoints_and_ema():
    method = small_mocov3(base_momentum=0.99)
    assert method.target_momentum(0.0) == pytest.approx(0.99)
    assert method.target_momentum(0.5) == pytest.approx(0.995)
    assert method.target_momentum(1.0) == pytest.approx(1.0)
    target = [p for m in (method.target_backbone, method.target_projector) for p in m.parameters()]
    online = [p for m in (method.backbone, method.projector) for p in m.parameters()]
    with torch.no_grad():
        for p in online:
            p.add_(1.0)
    before = [p.clone() for p in target]
    method.on_after_step(TrainState(step=10, progress=1.0))  # m = 1: the target no longer moves
    for t_new, t_old in zip(target, before):
        torch.testing.assert_close(t_new, t_old)
    method.on_after_step(TrainState(step=1, progress=0.0))  # m = 0.99
    for t_new, t_old, o in zip(target, before, online):
        torch.testing.assert_close(t_new, 0.99 * t_old + 0.01 * o)


@pytest.mark.parametrize("frozen", [False, True])
def test_yaml_trains_a_vit(frozen):
    torch.manual_seed(0)
    backbone = vit_tiny(image_size=16, patch_size=4, depth=1, frozen_patch_embed=frozen)
    method = instantiate(method_config('mocov3'), backbone=backbone, proj_hidden_dim=64,
                         pred_hidden_dim=64)
    assert method.temperature == 0.2 and method.base_momentum == 0.99
    opt = torch.optim.AdamW(method.param_groups()[0]["params"], lr=1e-3)
    patch = backbone.patch_embed.weight.clone()
    for s in range(2):
        out = method(views(8, seed=s), torch.arange(8))
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        method.on_after_backward(TrainState(step=s, progress=s / 2))
        opt.step()
        method.on_after_step(TrainState(step=s + 1, progress=s / 2))
        assert torch.isfinite(out["loss"]) and out["z"].shape == (8, 256)
    assert torch.equal(backbone.patch_embed.weight, patch) == frozen
