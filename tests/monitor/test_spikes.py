import math

import torch

from sslrun.monitor.collapse import collapse_std
from sslrun.monitor.spikes import SpikeDetector


def test_detects_exactly_the_injected_spikes():
    g = torch.Generator().manual_seed(0)
    series = (1.0 + 0.1 * torch.randn(500, generator=g)).tolist()
    injected = {60, 61, 200, 333, 499}
    for s in injected:
        series[s] = 12.0
    det = SpikeDetector(factor=5.0, window=100, min_history=20)
    found = {i for i, v in enumerate(series) if det.update(v) is not None}
    assert found == injected


def test_no_spikes_before_history_and_median_is_robust():
    det = SpikeDetector(factor=3.0, window=10, min_history=5)
    assert [det.update(v) for v in [1, 100, 1, 1, 1]] == [None] * 5  # too little history to judge
    assert det.update(10.0) is not None
    assert det.median() == 1.0  # the earlier 100 does not move the median


def test_collapse_std_extremes():
    assert collapse_std(torch.ones(64, 16)).item() == 0.0  # a constant output: collapsed
    z = torch.randn(20000, 16, generator=torch.Generator().manual_seed(0))
    assert abs(collapse_std(z).item() - 1 / math.sqrt(16)) < 0.01  # spread over the sphere: 1/sqrt(d)
