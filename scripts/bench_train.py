"""Training throughput of the real pretraining loop (views, forward, backward, step, monitors).

Runs ``Pretrainer.fit`` for a wall-clock budget and prints steady-state images/s: the median of the
per-log-interval figures the run writes to TensorBoard (``perf/imgs_per_s``), the first interval of the
window left out (compilation, allocator and cuDNN warm-up). With --record it appends a row to
BENCHMARKS.md; with --json it prints one JSON line (what scripts/bench_gpu.sh collects).

    python scripts/bench_train.py backbone=resnet18 dataset=synthetic trainer.batch_size=128 --seconds 60

scripts/bench_vs_reference.py runs the same windows alternately with a reference pipeline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from sslrun.data.datasets import load_dataset
from sslrun.data.image_set import DatasetSplits
from sslrun.engine.device import resolve_device, resolve_precision
from sslrun.engine.trainer import Pretrainer

ROOT = Path(__file__).resolve().parent.parent
# A timed window trains only: no kNN monitor, no figures, no checkpoint but the one fit() ends with.
BENCH_OVERRIDES = ["trainer.epochs=100000", "trainer.checkpoint_every=100000", "trainer.resume=never",
                   "monitor.knn_every=0", "monitor.knn_every_steps=0", "monitor.figures.enabled=false"]


def compose_config(overrides: list[str]) -> DictConfig:
    """The config ``sslrun <overrides>`` would run, over the timed-window settings above (which it may override:
    ``trainer.epochs=1`` makes an untimed window one epoch long)."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[*BENCH_OVERRIDES, *overrides])


@dataclass
class SslrunSetup:
    """One sslrun model and its data, built once and trained window after window."""

    cfg: DictConfig
    device: torch.device
    autocast_dtype: torch.dtype | None
    splits: DatasetSplits
    method: torch.nn.Module
    augment: torch.nn.Module

    @classmethod
    def build(cls, cfg: DictConfig, splits: DatasetSplits | None = None) -> SslrunSetup:
        """Data (``splits``, when given, instead of loading ``cfg.dataset`` again), model and views of ``cfg``."""
        torch.manual_seed(cfg.trainer.seed)
        device = resolve_device(cfg.trainer.device)
        splits = splits or load_dataset(cfg.dataset)
        method = instantiate(cfg.method, backbone=instantiate(cfg.backbone))
        augment = instantiate(cfg.augmentation, mean=splits.mean, std=splits.std)
        return cls(cfg, device, resolve_precision(cfg.trainer.precision, device), splits, method, augment)

    def pretrainer(self, seconds: float | None, run_dir: Path, writer: SummaryWriter) -> Pretrainer:
        """A fresh ``Pretrainer`` (fresh optimizer state) over the same model, for ``seconds`` of training
        (None: ``trainer.epochs``)."""
        cfg = OmegaConf.merge(self.cfg, {"trainer": {"max_minutes": seconds / 60 if seconds else None}})
        return Pretrainer(self.method, self.augment, self.splits, cfg, self.device, self.autocast_dtype, run_dir,
                          writer, Console(quiet=True))

    def window(self, seconds: float | None) -> list[float]:
        """Train ``seconds`` of wall-clock (None: ``trainer.epochs``) with the real loop; the images/s of each log
        interval but the first (the window's set-up, its first interval and its closing checkpoint are left out)."""
        with tempfile.TemporaryDirectory() as tmp:
            with SummaryWriter(tmp) as writer:
                self.pretrainer(seconds, Path(tmp), writer).fit()
            events = EventAccumulator(tmp, size_guidance={"scalars": 0})
            events.Reload()
            return [e.value for e in events.Scalars("perf/imgs_per_s")][1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for sslrun")
    ap.add_argument("--seconds", type=float, default=60.0,
                    help="wall-clock budget of the timed run; 0: trainer.epochs epochs instead")
    ap.add_argument("--record", action="store_true", help="append a row to BENCHMARKS.md")
    ap.add_argument("--json", action="store_true", help="print one JSON line with the figures")
    args = ap.parse_args()
    from bench_vs_reference import machine, record_row  # (it imports this module; scripts/ is on sys.path)

    setup = SslrunSetup.build(compose_config(args.overrides))
    if setup.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(setup.device)
    rates = setup.window(args.seconds or None)
    if not rates:
        raise SystemExit(f"--seconds {args.seconds} ended before a second log interval: give more seconds or a "
                         "smaller trainer.log_every.")
    ips = statistics.median(rates)
    n = len(setup.splits.pretrain)
    peak_gib = torch.cuda.max_memory_allocated(setup.device) / 2**30 if setup.device.type == "cuda" else None
    dev = machine(setup.device)
    what = " ".join(args.overrides) or "defaults"
    if args.json:
        print(json.dumps({"config": what, "device": dev, "imgs_per_s": ips, "epoch_s": n / ips, "images": n,
                          "intervals": len(rates), "peak_gib": peak_gib, "torch": torch.__version__}))
    else:
        print(f"{what}: {ips:.1f} images/s steady state (median of {len(rates)} intervals), an epoch of {n} "
              f"images in {n / ips:.2f} s" + (f", peak {peak_gib:.2f} GiB" if peak_gib else "") +
              f", on {dev}, torch {torch.__version__}")
    if args.record:
        record_row("Training throughput, `python scripts/bench_train.py <overrides> --seconds N`",
                   ["date", "device", "config", "images/s", "commit"],
                   [dev, f"`{what}`", f"{ips:.1f}"])


if __name__ == "__main__":
    main()
