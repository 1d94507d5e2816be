"""Image-folder data paths, measured: loading a folder into memory, and streaming it (issues 9 and 13).

    python scripts/bench_data.py load  <dataset overrides>          # one load: seconds, CPU seconds, peak memory
    python scripts/bench_data.py stream <dataset overrides> --seconds 20 --rounds 3 --train-seconds 60

``load`` runs ``load_dataset`` once in this process and prints wall seconds, CPU seconds (this process and its
decoding workers) and the peak memory of the process tree (the sum of its processes' PSS, sampled from /proc
every 0.1 s: pages shared with the forked workers count once).

``stream`` alternates timed windows of the two storages (``dataset.storage=memory`` and ``stream``) in one
process, so that a noisy host affects both alike: data only (images delivered per second, and CPU milliseconds
per image of the process and its decoding workers, which a busy host does not change), and training (SimCLR +
small CNN through ``Pretrainer.fit``, the engine's loop, fed by ``batches.make_batches``).

    python scripts/bench_data.py stream dataset=imagefolder dataset.train_dir=/work/data/cifar10_jpeg/train \\
        dataset.val_dir=/work/data/cifar10_jpeg/test dataset.image_size=32
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    found, stack = [], [pid]
    while stack:
        p = stack.pop()
        found.append(p)
        stack += children.get(p, [])
    return found


def _tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid`` and its living descendants (persistent loader workers
    included, which ``getrusage`` counts only once they have exited)."""
    ticks = 0
    for p in _descendants(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return ticks / os.sysconf("SC_CLK_TCK")


def _tree_pss(pid: int) -> int:
    """Bytes of memory of ``pid`` and all its descendants: the sum of their proportional set sizes (PSS, from
    /proc/<pid>/smaps_rollup), in which a page shared by k processes (torch's libraries in the loader's
    forked workers) counts 1/k in each, so the sum is what the tree really holds."""
    total = 0
    for p in _descendants(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            pass
    return total * 1024


class PeakMemory:
    """The peak of ``_tree_pss`` of this process while the ``with`` block runs."""

    def __enter__(self) -> PeakMemory:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, _tree_pss(os.getpid()))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (the loader's workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def load(overrides: list[str]) -> None:
    from sslrun.data.datasets import load_dataset

    cfg = compose(overrides).dataset
    t, cpu = time.perf_counter(), _cpu_seconds()
    with PeakMemory() as memory:
        splits = load_dataset(cfg)
    print(f"loaded {len(splits.train)} train + {len(splits.test)} test images "
          f"{tuple(splits.train.images.shape[1:])} in {time.perf_counter() - t:.1f} s wall, "
          f"{_cpu_seconds() - cpu:.1f} CPU s, peak {memory.peak / 2**20:.0f} MiB (process tree PSS)", flush=True)


def _data_window(batches, seconds: float) -> tuple[float, float]:
    """(images per second, CPU milliseconds per image of this process and its workers) delivered by ``batches``
    (epochs restarted as needed) in ``seconds``. The CPU cost does not depend on what else the host runs."""
    n, epoch, t, cpu = 0, 0, time.perf_counter(), _tree_cpu(os.getpid())
    while time.perf_counter() - t < seconds:
        for x, _ in batches.epoch(epoch):
            n += x.shape[0]
            if time.perf_counter() - t >= seconds:
                break
        epoch += 1
    return n / (time.perf_counter() - t), 1000 * (_tree_cpu(os.getpid()) - cpu) / n


def _train_window(setup, batches, seconds: float) -> float:
    """Median images/s of the engine's loop fed by ``batches``, its first log interval left out."""
    from rich.console import Console
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from sslrun.engine.trainer import Pretrainer

    cfg = OmegaConf.merge(setup["cfg"], {"trainer": {"max_minutes": seconds / 60}})
    with tempfile.TemporaryDirectory() as tmp, SummaryWriter(tmp) as writer:
        trainer = Pretrainer(setup["method"], setup["augment"], setup["splits"], cfg, torch.device("cpu"), None,
                             Path(tmp), writer, Console(quiet=True))
        trainer.batches = batches  # the source under test; both have TensorBatches' interface and length
        trainer.fit()
        events = EventAccumulator(tmp, size_guidance={"scalars": 0})
        events.Reload()
        rates = [e.value for e in events.Scalars("perf/imgs_per_s")][1:]
    return statistics.median(rates) if rates else float("nan")


def stream(overrides: list[str], seconds: float, rounds: int, train_seconds: float) -> None:
    from hydra.utils import instantiate

    from sslrun.data.batches import make_batches
    from sslrun.data.datasets import load_dataset

    bench = ["method=simclr", "backbone=small_cnn", "trainer.epochs=100000", "trainer.checkpoint_every=100000",
             "trainer.resume=never", "monitor.knn_every=0", "monitor.knn_every_steps=0",
             "monitor.figures.enabled=false", "trainer.log_every=5"]
    cfg = compose([*overrides, *bench])
    batch = cfg.trainer.batch_size
    cpu = torch.device("cpu")
    sources = {}
    for storage in ("memory", "stream"):
        dcfg = OmegaConf.merge(cfg.dataset, {"storage": storage})
        t = time.perf_counter()
        splits = load_dataset(dcfg)
        print(f"{storage}: loaded in {time.perf_counter() - t:.1f} s", flush=True)
        sources[storage] = (splits, make_batches(splits.pretrain, dcfg, batch, cpu, cfg.trainer.seed))
    torch.manual_seed(0)
    splits = sources["memory"][0]
    setup = {"cfg": cfg, "splits": splits, "method": instantiate(cfg.method, backbone=instantiate(cfg.backbone)),
             "augment": instantiate(cfg.augmentation, mean=splits.mean, std=splits.std)}
    data: dict[str, list[float]] = {"memory": [], "stream": []}
    cost: dict[str, list[float]] = {"memory": [], "stream": []}
    train: dict[str, list[float]] = {"memory": [], "stream": []}
    for r in range(rounds):
        for storage, (_, batches) in sources.items():
            rate, ms = _data_window(batches, seconds)
            data[storage].append(rate)
            cost[storage].append(ms)
            if train_seconds:
                train[storage].append(_train_window(setup, batches, train_seconds))
            print(f"round {r}: {storage}: data {rate:,.0f} images/s, {ms:.3f} CPU ms/image"
                  + (f", training {train[storage][-1]:,.0f} images/s" if train_seconds else ""), flush=True)
    for storage, rates in data.items():
        print(f"{storage}: data median {statistics.median(rates):,.0f} images/s, "
              f"{statistics.median(cost[storage]):.3f} CPU ms/image"
              + (f", training median {statistics.median(train[storage]):,.0f} images/s" if train_seconds else "")
              + f" (batch {batch}, {torch.get_num_threads()} threads, {cfg.dataset.num_workers} decoding workers)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["load", "stream"])
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for sslrun")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of one timed window (stream)")
    ap.add_argument("--rounds", type=int, default=3, help="windows per storage, alternating (stream)")
    ap.add_argument("--train-seconds", type=float, default=60.0,
                    help="length of one timed training window (stream); 0: data windows only")
    args = ap.parse_args()
    if args.mode == "load":
        load(args.overrides)
    else:
        stream(args.overrides, args.seconds, args.rounds, args.train_seconds)


if __name__ == "__main__":
    main()
