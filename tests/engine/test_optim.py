import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from sslrun.engine.lars import LARS
from sslrun.engine.optim import build_optimizer, effective_lr, lr_factor, set_lr


def cfg(**over):
    base = {"_target_": "torch.optim.SGD", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "scale_lr": True,
                "warmup_epochs": 0, "warmup_start_factor": 0.0, "min_lr_factor": 0.0, "exclude_bias_norm": True}
    return OmegaConf.create({**base, **over})


def test_lr_scaling_rule():
    assert effective_lr(cfg(), 512) == pytest.approx(0.2)
    assert effective_lr(cfg(scale_lr=False), 512) == pytest.approx(0.1)


def test_warmup_then_cosine():
    assert lr_factor(0.0, 0.1, 0.0) == 0.0
    assert lr_factor(0.05, 0.1, 0.0) == pytest.approx(0.5)
    assert lr_factor(0.1, 0.1, 0.0) == pytest.approx(1.0)
    assert lr_factor(0.55, 0.1, 0.0) == pytest.approx(0.5)  # half-way through the cosine
    assert lr_factor(1.0, 0.1, 0.01) == pytest.approx(0.01)


def test_no_decay_on_bias_and_norm_and_fixed_lr_groups():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    groups = [{"params": list(model[:2].parameters())}, {"params": list(model[2].parameters()), "fixed_lr": True}]
    opt = build_optimizer(cfg(), groups, 256)
    by_shape = {(p.ndim, g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    assert by_shape == {(2, 5e-4), (1, 0.0)}
    set_lr(opt, 0.25)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(0.1 if g["fixed_lr"] else 0.025)


def test_lars_step_matches_trust_ratio_by_hand():
    w = nn.Parameter(torch.tensor([3.0, 4.0]))  # ||w|| = 5
    w.grad = torch.tensor([0.0, 1.0])
    opt = LARS([w], lr=1.0, momentum=0.0, weight_decay=0.0, eta=0.1)
    opt.step()
    # trust = eta * ||w|| / ||g|| = 0.1 * 5 / 1 = 0.5 -> w - lr * 0.5 * g
    torch.testing.assert_close(w.detach(), torch.tensor([3.0, 3.5]))


def test_lars_excluded_group_is_plain_sgd():
    b = nn.Parameter(torch.tensor([1.0]))
    b.grad = torch.tensor([2.0])
    LARS([{"params": [b], "lars_exclude": True}], lr=0.1, momentum=0.0, weight_decay=1.0, eta=0.1).step()
    assert b.item() == pytest.approx(1.0 - 0.2)
    assert not math.isnan(b.item())
