"""Gradient-spike detection: MoCo v3's instability signal (Chen, Xie & He, 2021, Fig. 4)."""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass


@dataclass
class Spike:
    step: int
    layer: str
    value: float
    median: float

    @property
    def ratio(self) -> float:
        return self.value / self.median if self.median > 0 else float("inf")


class SpikeDetector:
    """Flags values above ``factor`` x the running median of the previous ``window`` values.

    A median (not a mean) so that one spike does not raise the bar for the next; nothing is flagged
    until ``min_history`` values have been seen, since early training gradients are not yet typical.
    """

    def __init__(self, factor: float = 5.0, window: int = 100, min_history: int = 20) -> None:
        self.factor = factor
        self.history: deque[float] = deque(maxlen=window)
        self.min_history = min_history

    def median(self) -> float:
        return statistics.median(self.history) if self.history else 0.0

    def update(self, value: float) -> float | None:
        """Add a value; return the running median if it is a spike, else None."""
        spike = None
        if len(self.history) >= self.min_history:
            med = self.median()
            if value > self.factor * med:
                spike = med
        self.history.append(value)
        return spike
