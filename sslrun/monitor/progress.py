"""The rich progress bar of pretraining: loss, lr, images/s, ETA."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def training_progress(console: Console | None = None) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=console,
    )


def stats_line(last: dict) -> str:
    """The bar's loss / lr / throughput text; before the first step's numbers exist, just "first step"."""
    if last["loss"] != last["loss"]:  # NaN: nothing measured yet
        return "first step..."
    return f"loss {last['loss']:.4f}  lr {last['lr']:.3g}  {last['ips']:.0f} img/s"
