"""Training throughput of the real pretraining loop (views, forward, backward, step, monitors).

Prints steady-state images/s (the median of the per-interval figures after the first interval) for a
config given as Hydra overrides, and with --record appends a row to BENCHMARKS.md.

    python scripts/bench_train.py backbone=resnet18 dataset=synthetic trainer.batch_size=128 --seconds 60
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from rich.console import Console
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from sslrun.data.datasets import load_dataset
from sslrun.engine.device import resolve_device, resolve_precision
from sslrun.engine.trainer import Pretrainer
from sslrun.run import device_name

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--seconds", type=float, default=60.0, help="wall-clock budget of the timed run")
    ap.add_argument("--record", action="store_true", help="append a row to BENCHMARKS.md")
    args = ap.parse_args()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*args.overrides, "trainer.epochs=1000", "monitor.knn_every=0",
                                           f"trainer.max_minutes={args.seconds / 60}", "trainer.checkpoint_every=1000"])
    torch.manual_seed(0)
    device = resolve_device(cfg.trainer.device)
    splits = load_dataset(cfg.dataset)
    backbone = instantiate(cfg.backbone)
    method = instantiate(cfg.method, backbone=backbone)
    augment = instantiate(cfg.augmentation, mean=splits.mean, std=splits.std)
    with tempfile.TemporaryDirectory() as tmp:
        with SummaryWriter(tmp) as writer:
            trainer = Pretrainer(method, augment, splits, cfg, device, resolve_precision(cfg.trainer.precision, device),
                                 Path(tmp), writer, Console(quiet=True))
            result = trainer.fit()
        acc = EventAccumulator(tmp)
        acc.Reload()
        per_interval = [e.value for e in acc.Scalars("perf/imgs_per_s")][1:]
    ips = statistics.median(per_interval) if per_interval else result.imgs_per_s
    dev = device_name(device)
    what = " ".join(args.overrides) or "defaults"
    print(f"{what}: {ips:.1f} images/s steady state ({result.imgs_per_s:.1f} over the whole run, "
          f"{result.steps} steps in {result.seconds:.0f} s) on {dev}, torch {torch.__version__}")
    if args.record:
        with open(ROOT / "BENCHMARKS.md", "a") as f:
            f.write(f"| {datetime.date.today()} | {dev} | `{what}` | {ips:.1f} |\n")


if __name__ == "__main__":
    main()
