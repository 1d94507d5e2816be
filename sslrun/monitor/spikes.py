"""Gradient-spike detection: MoCo v3's instability signal (Chen, Xie & He, 2021, Fig. 4)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class Spike:
    """One spike event: a layer's gradient inf-norm at ``step`` was ``value``, the running median ``median``."""

    step: int
    layer: str
    value: float
    median: float

    @property
    def ratio(self) -> float:
        return self.value / self.median if self.median > 0 else float("inf")


class SpikeDetector:
    """Flags, per layer, values above ``factor`` x the running median of that layer's previous ``window`` values.

    A median (not a mean) so that one spike does not raise the bar for the next; nothing is flagged
    until ``min_history`` values have been seen, since early training gradients are not yet typical.
    The history is a ring buffer on the values' device: ``update`` costs no host sync, so ``on_spike=clip``
    can act on every step. With an even count the median is the lower middle value (torch's median).
    """

    def __init__(self, factor: float = 5.0, window: int = 100, min_history: int = 20) -> None:
        self.factor = factor
        self.window = window
        self.min_history = min(min_history, window)
        self.history: torch.Tensor | None = None  # [window, layers]; NaN = not filled yet
        self.seen = 0  # values added so far, known on the host without a sync

    def median(self) -> torch.Tensor:
        """The running median per layer (NaN before any value)."""
        if self.history is None:
            return torch.tensor([math.nan])
        return torch.nanmedian(self.history, dim=0).values

    @torch.no_grad()
    def update(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add one value per layer; return (is_spike [layers] bool, the running median it was judged against).

        The median is NaN while the history is shorter than ``min_history``; a layer whose median is 0
        (no gradient yet) never spikes.
        """
        values = values.detach().float().reshape(-1)
        if self.history is None or self.history.shape[1] != values.numel():
            self.history = torch.full((self.window, values.numel()), math.nan, device=values.device)
            self.seen = 0
        elif self.history.device != values.device:  # restored from a checkpoint, on the host
            self.history = self.history.to(values.device)
        if self.seen >= self.min_history:
            median = self.median()
            spike = (values > self.factor * median) & (median > 0)
        else:
            median = torch.full_like(values, math.nan)
            spike = torch.zeros_like(values, dtype=torch.bool)
        self.history[self.seen % self.window] = values
        self.seen += 1
        return spike, median

    def state_dict(self) -> dict:
        return {"history": None if self.history is None else self.history.cpu(), "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        history = state["history"]
        if history is not None and history.shape[0] != self.window:
            return  # another window size: start the history afresh rather than judge against a wrong one
        self.history = history
        self.seen = state["seen"]


def spike_events(steps: Sequence[int], layers: Sequence[str], values: torch.Tensor, medians: torch.Tensor,
                 flags: torch.Tensor) -> list[Spike]:
    """Spike events from per-step host tensors [steps, layers] of inf-norms, medians and 0/1 flags,
    in step order, then layer order."""
    return [Spike(steps[i], layers[j], values[i, j].item(), medians[i, j].item())
            for i, j in flags.nonzero().tolist()]
