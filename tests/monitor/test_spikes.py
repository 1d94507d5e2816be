import math

import pytest
import torch

from sslrun.monitor.spikes import Spike, SpikeDetector, spike_events


def run_detector(det: SpikeDetector, series: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed a [steps, layers] series one step at a time; return the stacked flags and medians."""
    out = [det.update(row) for row in series]
    return torch.stack([f for f, _ in out]), torch.stack([m for _, m in out])


def test_detects_exactly_the_injected_spikes():
    g = torch.Generator().manual_seed(0)
    series = 1.0 + 0.1 * torch.randn(500, 1, generator=g)
    injected = {60, 61, 200, 333, 499}
    for s in injected:
        series[s] = 12.0
    flags, _ = run_detector(SpikeDetector(factor=5.0, window=100, min_history=20), series)
    assert set(flags[:, 0].nonzero()[:, 0].tolist()) == injected


def test_no_spikes_before_history_and_median_is_robust():
    det = SpikeDetector(factor=3.0, window=10, min_history=5)
    flags, medians = run_detector(det, torch.tensor([[1.0], [100.0], [1.0], [1.0], [1.0]]))
    assert not flags.any() and medians.isnan().all()  # too little history to judge
    flag, median = det.update(torch.tensor([10.0]))
    assert flag.item() and median.item() == 1.0  # the earlier 100 does not move the median


def test_per_layer_events_none_missed_none_invented():
    g = torch.Generator().manual_seed(1)
    steps, layers = 400, 4
    scale = torch.tensor([1.0, 0.01, 50.0, 0.0])  # layers of very different magnitude; the last is frozen (0)
    series = scale * (1.0 + 0.1 * torch.randn(steps, layers, generator=g)).abs()
    injected = {(50, 0), (51, 0), (120, 1), (120, 2), (300, 2), (399, 1)}
    for s, j in injected:
        series[s, j] = scale[j] * 20
    det = SpikeDetector(factor=5.0, window=50, min_history=20)
    flags, medians = run_detector(det, series)
    names = ["backbone.conv1", "backbone.blocks.0", "projector", "backbone.frozen"]
    step_ids = list(range(1000, 1000 + steps))  # event steps come from the given step numbers
    events = spike_events(step_ids, names, series, medians, flags.float())
    assert {(e.step - 1000, names.index(e.layer)) for e in events} == injected
    e = next(e for e in events if e.step == 1120 and e.layer == "projector")
    assert e.value == pytest.approx(1000.0) and e.ratio == pytest.approx(20.0, rel=0.2)
    assert [(e.step, e.layer) for e in events] == sorted((e.step, e.layer) for e in events)  # step order


def test_resume_continues_the_same_history(tmp_path):
    g = torch.Generator().manual_seed(2)
    series = 1.0 + 0.1 * torch.randn(100, 3, generator=g)
    series[80, 1] = 9.0
    whole = SpikeDetector(window=30, min_history=10)
    expected, _ = run_detector(whole, series)
    first = SpikeDetector(window=30, min_history=10)
    run_detector(first, series[:60])
    torch.save(first.state_dict(), tmp_path / "s.pt")
    second = SpikeDetector(window=30, min_history=10)
    second.load_state_dict(torch.load(tmp_path / "s.pt"))
    rest, _ = run_detector(second, series[60:])
    assert torch.equal(rest, expected[60:]) and rest[20, 1]


def test_spike_ratio():
    assert Spike(3, "x", 10.0, 2.0).ratio == 5.0
    assert math.isinf(Spike(3, "x", 10.0, 0.0).ratio)
