"""``sslrun-plot``: the curves of several runs on shared axes, in one PNG.

    sslrun-plot outputs/multirun/2026-01-01/12-00-00 -o simsiam.png --panels loss,std,knn
    sslrun-plot RUN_A RUN_B -o spikes.png --panels grad,knn

Arguments are run directories or directories holding runs (a Hydra multirun). Runs are found, read and
labelled by sslrun.report (as ``sslrun-report`` tabulates them): curves from the TensorBoard event files,
spike events from each run's metrics.json, or from its ``grad/spike_events`` text when the run did not
finish; a run is labelled by the overrides that set it apart. The panels are stacked over one step axis,
so a spike lines up with what follows it.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from rich.console import Console

from ..errors import SslrunError
from ..report.events import read_events
from ..report.runs import find_runs, labels


@dataclass
class Panel:
    title: str
    tags: tuple[str, ...]         # the first tag a run has is drawn, or all of them merged by step
    merge: bool = False
    ref: str | None = None        # a reference level drawn dotted (collapse std of a spread output)
    log: bool = False
    spikes: bool = False          # mark the run's spike events on its curve


def panels(grad_tag: str) -> dict[str, Panel]:
    return {
        "loss": Panel("training loss", ("train/loss",)),
        "std": Panel("collapse: std of l2-normalised projector output", ("collapse/std",), ref="collapse/std_ref"),
        "std_backbone": Panel("collapse: std of l2-normalised backbone features", ("collapse/std_backbone",),
                              ref="collapse/std_backbone_ref"),
        "rank": Panel("effective rank (RankMe) of backbone features", ("rank/rankme",)),
        "knn": Panel("kNN top-1, monitor subset", ("monitor/knn_top1_steps", "monitor/knn_top1"), merge=True),
        "grad": Panel(f"gradient magnitude ({grad_tag}); \u25bc = spike events", (grad_tag,), log=True,
                      spikes=True),
        "lr": Panel("learning rate", ("train/lr",)),
    }


@dataclass
class Run:
    path: Path
    label: str
    scalars: dict[str, tuple[np.ndarray, np.ndarray]]
    spikes: list[dict]


def load_run(path: Path, label: str) -> Run:
    """The run's curves and spike events, read by sslrun.report."""
    scalars, spikes = read_events(path)
    return Run(path, label, scalars, spikes)


def smooth(values: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard's debiased exponential moving average (0 = none)."""
    if weight <= 0 or len(values) == 0:
        return values
    out, last, norm = np.empty_like(values), 0.0, 0.0
    for i, v in enumerate(values):
        last = weight * last + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out[i] = last / norm
    return out


def _curve(run: Run, panel: Panel) -> tuple[np.ndarray, np.ndarray] | None:
    have = [t for t in panel.tags if t in run.scalars]
    if not have:
        return None
    if not panel.merge:
        return run.scalars[have[0]]
    by_step = {int(s): v for t in have for s, v in zip(*run.scalars[t])}  # both schedules can hit one step
    steps = np.array(sorted(by_step))
    return steps, np.array([by_step[s] for s in steps])


def _mark_spikes(ax, run: Run, steps: np.ndarray, values: np.ndarray, colour: str, grad_tag: str,
                 spike_layer: str | None) -> None:
    """A triangle at the top of the panel at every step with a spike event (of any layer, or of layers
    matching ``spike_layer``), and a cross on the curve where the curve is that layer's own
    (``grad/<layer>/linf``)."""
    hits = [s for s in run.spikes if spike_layer is None or spike_layer in s["layer"]]
    at = sorted({s["step"] for s in hits})
    if not at:
        return
    ax.plot(at, [0.97] * len(at), "v", color=colour, ms=6, transform=ax.get_xaxis_transform(), clip_on=False)
    own = sorted({s["step"] for s in hits if grad_tag == f"grad/{s['layer']}/linf"})
    if own and len(steps):
        i = np.minimum(np.searchsorted(steps, own), len(steps) - 1)  # the logged point at or after the spike
        ax.plot(steps[i], values[i], "x", color=colour, ms=7, mew=2)


def draw(runs: list[Run], names: list[str], grad_tag: str, spike_layer: str | None = None, smoothing: float = 0.0,
         title: str | None = None, spike_lines: bool = True, width: float = 8.0, panel_height: float = 2.4) -> Figure:
    table = panels(grad_tag)
    fig = Figure(figsize=(width, panel_height * len(names)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(len(names), 1, sharex=True, squeeze=False)[:, 0])
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for ax, name in zip(axes, names):
        panel = table[name]
        drawn = False
        for run, colour in zip(runs, colours):
            curve = _curve(run, panel)
            if curve is None:
                continue
            steps, values = curve
            marker = "o" if len(steps) < 30 else None  # a sparse curve (per-epoch kNN) shows its points
            ax.plot(steps, smooth(values, smoothing) if name == "loss" else values, color=colour, lw=1.2,
                    marker=marker, ms=3, label=run.label)
            drawn = True
            if panel.ref and panel.ref in run.scalars:
                ax.axhline(run.scalars[panel.ref][1][-1], color=colour, ls=":", lw=1)
            if panel.spikes:
                _mark_spikes(ax, run, steps, values, colour, grad_tag, spike_layer)
        if panel.log and drawn:
            ax.set_yscale("log")
        if not drawn:
            ax.text(0.5, 0.5, f"no run has {' or '.join(panel.tags)}", transform=ax.transAxes, ha="center")
        ax.set_title(panel.title, fontsize=9, loc="left")
        ax.grid(alpha=0.3)
    if spike_lines and "grad" in names:  # the spike steps across every panel: what follows a spike lines up
        for run, colour in zip(runs, colours):
            for step in sorted({s["step"] for s in run.spikes if spike_layer is None or spike_layer in s["layer"]}):
                for ax in axes:
                    ax.axvline(step, color=colour, alpha=0.2, lw=0.8)
    axes[-1].set_xlabel("step")
    handles, lbls = axes[0].get_legend_handles_labels()
    if not handles:
        for ax in axes:
            handles, lbls = ax.get_legend_handles_labels()
            if handles:
                break
    if handles:
        ncols = 1 if max(map(len, lbls)) > 40 else min(len(handles), 3)  # long labels: one per line
        fig.legend(handles, lbls, loc="outside lower center", ncols=ncols, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sslrun-plot", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", type=Path, help="run directories, or directories holding runs")
    ap.add_argument("-o", "--out", type=Path, default=Path("runs.png"), help="the PNG to write (default runs.png)")
    ap.add_argument("--panels", default="loss,std,knn,grad",
                    help=f"comma-separated, top to bottom, from: {', '.join(panels('').keys())}")
    ap.add_argument("--grad-tag", default="grad/linf/first_layer",
                    help="the gradient curve of the grad panel, e.g. grad/backbone.blocks.0/linf")
    ap.add_argument("--spike-layer", default=None, help="mark only spikes of layers whose name contains this")
    ap.add_argument("--labels", default=None, help="comma-separated run labels, in the order the runs are found")
    ap.add_argument("--smooth", type=float, default=0.0, help="EMA weight for the loss curve, as TensorBoard's")
    ap.add_argument("--no-spike-lines", action="store_true", help="no vertical lines at spike steps")
    ap.add_argument("--title", default=None)
    ap.add_argument("--dpi", type=int, default=120)
    args = ap.parse_args(argv)
    names = [p.strip() for p in args.panels.split(",") if p.strip()]
    unknown = [p for p in names if p not in panels(args.grad_tag)]
    if unknown or not names:
        ap.error(f"--panels {args.panels!r}: unknown {unknown}; use some of {', '.join(panels('').keys())}")
    try:
        found = find_runs(args.dirs, require_events=True)
    except SslrunError as e:
        Console(stderr=True, soft_wrap=True).print(f"[bold red]sslrun-plot error:[/] {e}", highlight=False)
        return 2
    given = args.labels.split(",") if args.labels else labels(found)
    if len(given) != len(found):
        ap.error(f"--labels has {len(given)} labels for {len(found)} runs: {', '.join(map(str, found))}")
    runs = [load_run(p, label) for p, label in zip(found, given)]
    fig = draw(runs, names, args.grad_tag, args.spike_layer, args.smooth, args.title, not args.no_spike_lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=args.dpi)
    print(f"{args.out}: {', '.join(names)} of {len(runs)} run(s): " + "; ".join(r.label for r in runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
