import math

import pytest
import torch
from torch import nn

from sslrun.methods.momentum import cosine_momentum, ema_update, momentum_copy
from sslrun.methods.queue import FeatureQueue


def test_ema_update_exact():
    student = nn.Linear(2, 1)
    teacher = momentum_copy(student)
    with torch.no_grad():
        teacher.weight.fill_(1.0)
        teacher.bias.fill_(0.0)
        student.weight.copy_(torch.tensor([[3.0, -1.0]]))
        student.bias.fill_(2.0)
    ema_update(teacher, student, 0.9)
    torch.testing.assert_close(teacher.weight, torch.tensor([[0.9 + 0.3, 0.9 - 0.1]]))
    torch.testing.assert_close(teacher.bias, torch.tensor([0.2]))
    assert not any(p.requires_grad for p in teacher.parameters())


def test_ema_copies_buffers():
    student = nn.BatchNorm1d(3)
    teacher = momentum_copy(student)
    student.running_mean.fill_(5.0)
    ema_update(teacher, student, 0.99)
    torch.testing.assert_close(teacher.running_mean, torch.full((3,), 5.0))


def test_cosine_momentum_schedule():
    assert cosine_momentum(0.996, 0.0) == pytest.approx(0.996)
    assert cosine_momentum(0.996, 1.0) == pytest.approx(1.0)
    assert cosine_momentum(0.996, 0.5) == pytest.approx(1 - 0.004 * (math.cos(math.pi / 2) + 1) / 2)


def test_queue_is_fifo():
    q = FeatureQueue(5, 1)
    q.push(torch.tensor([[1.0], [2.0], [3.0]]))
    assert q.get().flatten().tolist() == [1.0, 2.0, 3.0]
    q.push(torch.tensor([[4.0], [5.0], [6.0]]))  # 6 overwrites the oldest (1)
    assert q.get().flatten().tolist() == [6.0, 2.0, 3.0, 4.0, 5.0]
    assert int(q.ptr) == 1
    q.push(torch.tensor([[7.0]]))
    assert q.get().flatten().tolist() == [6.0, 7.0, 3.0, 4.0, 5.0]
