"""A run's TensorBoard events: every scalar curve, and the spike events written as text."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from .runs import METRICS

SPIKE_TEXT = re.compile(r"step (\d+): (\S+) inf-norm ([-+0-9.eE]+|inf|nan)")


def _accumulator(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, TENSORS, EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={SCALARS: 0, TENSORS: 0})  # 0 = keep every point
    acc.Reload()
    return acc


def _scalars(acc) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        out[tag] = (np.array([e.step for e in events]), np.array([e.value for e in events], dtype=float))
    return out


def _text_spikes(acc) -> list[dict]:
    tag = next((t for t in acc.Tags().get("tensors", []) if t.startswith("grad/spike_events")), None)
    if tag is None:  # torch's add_text stores the text under <tag>/text_summary
        return []
    from tensorboard.util import tensor_util

    out = []
    for event in acc.Tensors(tag):
        for text in np.atleast_1d(tensor_util.make_ndarray(event.tensor_proto)).ravel():
            for step, layer, value in SPIKE_TEXT.findall(text.decode() if isinstance(text, bytes) else str(text)):
                out.append({"step": int(step), "layer": layer, "value": float(value)})
    return out


def read_events(run: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[dict]]:
    """Every scalar curve of ``run`` as ``{tag: (steps, values)}``, and its gradient-spike events.

    Spike events (``{step, layer, value[, median]}``) come from metrics.json when the run finished,
    otherwise from its ``grad/spike_events`` text entries.
    """
    acc = _accumulator(Path(run))
    metrics = Path(run) / METRICS
    spikes = json.loads(metrics.read_text()).get("spikes", []) if metrics.is_file() else _text_spikes(acc)
    return _scalars(acc), spikes


def last_values(run: Path, tags: tuple[str, ...]) -> dict[str, float]:
    """The last logged value of each of ``tags`` (NaN where the run never logged it)."""
    scalars, _ = read_events(run) if any(Path(run).glob("events.out.tfevents.*")) else ({}, [])
    return {t: float(scalars[t][1][-1]) if t in scalars and len(scalars[t][1]) else float("nan") for t in tags}
