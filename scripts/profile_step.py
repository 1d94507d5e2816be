"""Where a training step's time goes: the real loop under torch.profiler, split into its phases.

Runs ``Pretrainer.fit`` (after an untimed warm-up window) with each phase wrapped in a profiler label:
views (the batched ViewGenerator), forward (the method), backward, optimizer (its step), monitors
(gradient norms, spike detection, the buffered per-step row and its log-interval flush) and method hooks
(EMA, queues). ``other`` is the rest of the step: the batch gather, the lr schedule, the loop itself.
Prints milliseconds per step for each, the busiest operators, and with --record appends a row to
BENCHMARKS.md. The profiler's own overhead is in every figure.

    python scripts/profile_step.py experiment=fmnist_simclr dataset=synthetic dataset.image_size=28 dataset.channels=1
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_train import SslrunSetup, compose_config
from bench_vs_reference import machine, record_row
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.tensorboard import SummaryWriter

PHASES = ("views", "forward", "backward", "optimizer", "monitors", "method hooks")


def _label(obj: object, attr: str, name: str) -> None:
    """Wrap ``obj.attr`` so that each call is one ``name`` range in the profile (on a class: every instance's)."""
    fn: Callable = getattr(obj, attr)

    def labelled(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)

    setattr(obj, attr, labelled)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for sslrun")
    ap.add_argument("--seconds", type=float, default=30.0,
                    help="length of the profiled window; 0: trainer.epochs epochs instead")
    ap.add_argument("--record", action="store_true", help="append a row to BENCHMARKS.md")
    args = ap.parse_args()

    setup = SslrunSetup.build(compose_config(args.overrides))
    setup.window(args.seconds / 3)  # untimed warm-up
    backward = torch.Tensor.backward
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if setup.device.type == "cuda" else [])
    with tempfile.TemporaryDirectory() as tmp, SummaryWriter(tmp) as writer:
        trainer = setup.pretrainer(args.seconds, Path(tmp), writer)
        _label(setup.augment, "forward", "views")
        _label(trainer.model, "forward", "forward")
        for named in trainer.optimizers.values():  # the main optimizer and a method's named ones
            _label(named.optimizer, "step", "optimizer")
        for hook in ("after_backward", "after_step", "end_epoch"):
            _label(trainer.monitor, hook, "monitors")
        for hook in ("on_after_backward", "on_after_step"):
            _label(setup.method, hook, "method hooks")
        _label(torch.Tensor, "backward", "backward")  # the class attribute: loss.backward() is looked up there
        try:
            with profile(activities=activities) as prof:
                start = time.perf_counter()
                trainer.fit()
                wall = time.perf_counter() - start
        finally:
            torch.Tensor.backward = backward
    steps = trainer.state.step
    events = {e.key: e for e in prof.key_averages()}
    ms = {p: events[p].cpu_time_total / 1e3 / steps if p in events else 0.0 for p in PHASES}
    step_ms = wall * 1e3 / steps
    ms["other"] = step_ms - sum(ms.values())
    dev, what = machine(setup.device), " ".join(args.overrides) or "defaults"
    print(f"{what}: {steps} steps in {wall:.1f} s on {dev}, {step_ms:.1f} ms per step "
          f"({setup.cfg.trainer.batch_size * steps / wall:.0f} images/s under the profiler)")
    for name, value in ms.items():
        print(f"  {name:>12s} {value:9.1f} ms  {100 * value / step_ms:5.1f} %")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    if args.record:
        record_row("Where a step's time goes, `python scripts/profile_step.py <overrides>`",
                   ["date", "device", "config", "ms per step", *(f"{p} ms (%)" for p in (*PHASES, "other")),
                    "commit"],
                   [dev, f"`{what}`", f"{step_ms:.1f}",
                    *(f"{v:.1f} ({100 * v / step_ms:.0f} %)" for v in ms.values())])


if __name__ == "__main__":
    main()
