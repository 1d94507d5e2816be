
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from runner import method_config

from sslrun.backbones.small_cnn import SmallCNN
from sslrun.methods.base import TrainState
from sslrun.methods.byol import BYOL, byol_loss
from sslrun.methods.momentum import cosine_momentum


def views(n: int = 8, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 16, 16, generator=g) for _ in range(2)]


def small_byol(**kw) -> BYOL:
    torch.manual_seed(0)
    return BYOL(SmallCNN(in_channels=3, width=8, feat_dim=32), proj_hidden_dim=32, proj_output_dim=16,
                pred_hidden_dim=32, **kw)


def test_byol_loss_hand_values():
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert byol_loss(e1, 3 * e1).item() == pytest.approx(0.0, abs=1e-6)   # same direction: 0
    assert byol_loss(e1, e2).item() == pytest.approx(2.0, abs=1e-6)       # orthogonal: 2
    assert byol_loss(e1, -e1).item() == pytest.approx(4.0, abs=1e-6)      # opposite: 4
    # Batch mean of the pairs: (0 + 2) / 2.
    assert byol_loss(torch.cat([e1, e1]), torch.cat([e1, e2])).item() == pytest.approx(1.0, abs=1e-6)


def test_byol_loss_is_the_normalised_mse():
    g = torch.Generator().manual_seed(0)
    p, z = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    mse = ((F.normalize(p, dim=1) - F.normalize(z, dim=1)) ** 2).sum(1).mean()
    assert byol_loss(p, z).item() == pytest.approx(mse.item(), rel=1e-5)


def test_byol_loss_stops_the_gradient_at_the_target():
    p = torch.randn(3, 4, requires_grad=True)
    z = torch.randn(3, 4, requires_grad=True)
    byol_loss(p, z).backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    assert z.grad is None


def test_forward_is_the_symmetrised_loss_and_no_gradient_reaches_the_target():
    method = small_byol()
    batch = views(8)
    state = {k: v.clone() for k, v in method.state_dict().items()}
    out = method(batch, torch.arange(8))
    out["loss"].backward()
    for module in (method.target_backbone, method.target_projector):
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())
    assert all(p.grad is not None for p in method.predictor.parameters())
    method.load_state_dict(state)  # the same forward by hand, from the same BN statistics
    with torch.no_grad():
        x = torch.cat(batch)
        p = method.predictor(method.projector(method.backbone(x)))
        t = method.target_projector(method.target_backbone(x))
    expected = byol_loss(p[:8], t[8:]) + byol_loss(p[8:], t[:8])
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_target_follows_the_cosine_ema():
    method = small_byol(base_momentum=0.9)
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    target = [p for m in (method.target_backbone, method.target_projector) for p in m.parameters()]
    online = [p for m in (method.backbone, method.projector) for p in m.parameters()]
    before = [p.clone() for p in target]
    method(views(8), torch.arange(8))["loss"].backward()
    opt.step()
    progress = 0.3
    method.on_after_step(TrainState(step=1, progress=progress))
    m = cosine_momentum(0.9, progress)
    assert 0.9 < m < 1.0
    for t_new, t_old, o in zip(target, before, online):
        torch.testing.assert_close(t_new, m * t_old + (1 - m) * o)
    assert method.target_momentum(0.0) == pytest.approx(0.9) and method.target_momentum(1.0) == pytest.approx(1.0)


def test_yaml_builds_and_trains():
    torch.manual_seed(0)
    method = instantiate(method_config('byol'), backbone=SmallCNN(3, 8, 32), proj_hidden_dim=64,
                         pred_hidden_dim=64)
    assert method.base_momentum == 0.99 and method.final_momentum == 1.0
    opt = torch.optim.SGD(method.param_groups()[0]["params"], lr=0.05, momentum=0.9)
    for s in range(3):
        out = method(views(16, seed=s), torch.arange(16))
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        method.on_after_backward(TrainState(step=s, progress=s / 3))
        opt.step()
        method.on_after_step(TrainState(step=s + 1, progress=s / 3))
        assert torch.isfinite(out["loss"]) and 0 <= out["loss"].item() <= 8
        assert out["z"].shape == (16, 256)
