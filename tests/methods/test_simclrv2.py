import math

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from runner import engine_step, method_config
from torch import nn

from sslrun.backbones.small_cnn import SmallCNN
from sslrun.errors import SslrunError
from sslrun.methods.base import TrainState
from sslrun.methods.losses import nt_xent
from sslrun.methods.simclrv2 import SimCLRv2


def build(**overrides):
    torch.manual_seed(0)
    cfg = method_config("simclrv2")
    return instantiate(cfg, backbone=SmallCNN(in_channels=3, width=8, feat_dim=32), proj_hidden_dim=48,
                       **overrides)


def views(n: int = 8, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 16, 16, generator=g) for _ in range(2)]


def nt_xent_reference(z1, z2, negatives, t):
    """-log exp(s(i, i')/T) / sum_{k != i} exp(s(i, k)/T), the sum over the other 2N-1 views and the K negatives."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    m, n = z.shape[0], z1.shape[0]
    total = 0.0
    for i in range(m):
        sims = [float(z[i] @ z[k]) / t for k in range(m) if k != i] + [float(z[i] @ q) / t for q in negatives]
        total -= float(z[i] @ z[(i + n) % m]) / t - math.log(sum(math.exp(s) for s in sims))
    return total / m


def test_nt_xent_with_memory_negatives_matches_formula():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    negatives = F.normalize(torch.randn(6, 5, generator=g), dim=1)
    assert nt_xent(z1, z2, 0.1, negatives).item() == pytest.approx(nt_xent_reference(z1, z2, negatives, 0.1), rel=1e-5)
    # Hand-computed: one image, identical views, one negative orthogonal to them, T = 1: -log(e / (e + 1)).
    z = torch.tensor([[1.0, 0.0]])
    assert nt_xent(z, z, 1.0, torch.tensor([[0.0, 1.0]])).item() == pytest.approx(math.log(1 + 1 / math.e), rel=1e-6)


def test_the_paper_defaults_and_a_three_layer_projector():
    cfg = method_config("simclrv2")
    assert (cfg.temperature, cfg.proj_layers, cfg.proj_output_dim) == (0.1, 3, 128)
    method = build()
    linears = [m for m in method.projector if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(32, 48), (48, 48), (48, 128)]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in method.projector) == 2


def test_finetune_backbone_is_the_backbone_and_the_first_projector_layer():
    method = build().eval()
    x = views()[0]
    net = method.finetune_backbone()
    assert net.feat_dim == 48
    first = method.projector[2](method.projector[1](method.projector[0](method.backbone(x))))
    torch.testing.assert_close(net(x), first)
    assert (net(x) >= 0).all()  # after the ReLU
    # It shares the method's modules: fine-tuning reads the trained weights, not a copy made at build time.
    assert net[0] is method.backbone and net[1] is method.projector[0]


def test_a_one_layer_projector_is_refused():
    with pytest.raises(SslrunError, match="proj_layers"):
        SimCLRv2(SmallCNN(in_channels=3, width=8, feat_dim=32), 0.1, 48, 128, 1, 0, 0.99)


def test_queue_off_is_simclr_with_a_deeper_head():
    method = build(queue_length=0)
    assert method.queue is None and not hasattr(method, "memory_backbone")
    v = views()
    out = method(v, torch.arange(8))
    z = method.projector(method.backbone(torch.cat(v)))
    assert out["loss"].item() == pytest.approx(nt_xent(z[:8], z[8:], 0.1).item(), rel=1e-5)


def test_queue_path_queues_the_memory_network_outputs_as_negatives():
    method = build(queue_length=32, queue_momentum=0.9)
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    state = TrainState()
    v1 = views(seed=1)
    x1 = torch.cat(v1)
    with torch.no_grad():
        expected_keys = F.normalize(method.memory_projector(method.memory_backbone(x1)), dim=1)
    assert int(method.queue.filled) == 0
    engine_step(method, opt, v1, state)
    # After the step the queue holds the memory network's l2-normalised outputs of both views (2N rows).
    assert int(method.queue.filled) == 16
    torch.testing.assert_close(method.queue.get(), expected_keys)
    # The memory network moved towards the online one, by EMA only (it gets no gradient).
    assert all(not p.requires_grad for p in method.memory_backbone.parameters())
    # The next step's loss is NT-Xent with those rows as extra negatives.
    v2 = views(seed=2)
    queued = method.queue.get().clone()
    out = method(v2, torch.arange(8))
    z = method.projector(method.backbone(torch.cat(v2)))
    assert out["loss"].item() == pytest.approx(nt_xent(z[:8], z[8:], 0.1, queued).item(), rel=1e-5)
    assert out["loss"].item() > nt_xent(z[:8], z[8:], 0.1).item()  # more negatives, larger loss
    method.on_after_step(state)
    assert int(method.queue.filled) == 32


def test_steps_on_synthetic_views():
    method = build()
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    state, v = TrainState(), views()
    losses = [engine_step(method, opt, v, state)["loss"].item() for _ in range(3)]
    assert all(math.isfinite(x) for x in losses)


def test_a_queue_shorter_than_a_steps_keys_is_refused_before_training():
    build(queue_length=32).check_setup([16, 16], 16)  # 2 x 16 rows per step fit
    with pytest.raises(SslrunError, match="queue_length"):
        build(queue_length=32).check_setup([16, 16], 17)
    build(queue_length=0).check_setup([16, 16], 256)
