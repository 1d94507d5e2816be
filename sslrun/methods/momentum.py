"""Momentum (EMA) teachers: MoCo's key encoder, BYOL's target, DINO's teacher, PCL's momentum encoder."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen deep copy of ``module`` to be updated only by :func:`ema_update`."""
    teacher = copy.deepcopy(module)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- m * teacher + (1 - m) * student, for parameters; buffers (BN statistics) are copied."""
    t_params, s_params = list(teacher.parameters()), list(student.parameters())
    torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)
    for tb, sb in zip(teacher.buffers(), student.buffers()):
        tb.copy_(sb)


def cosine_momentum(base: float, progress: float, final: float = 1.0) -> float:
    """BYOL's schedule: m = final - (final - base) * (cos(pi * progress) + 1) / 2, from base to final."""
    return final - (final - base) * (math.cos(math.pi * min(1.0, progress)) + 1) / 2
