"""Throughput of batched view generation (sslrun.data.augment.ViewGenerator).

    python scripts/bench_augment.py                      # the two standard cases, on cuda if present
    python scripts/bench_augment.py --device cpu --threads 1
    python scripts/bench_augment.py --recipe multicrop --batch 256 --size 32 --channels 3

Views/s counts every output view (a batch of 256 with 2 views = 512 views).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf" / "augmentation"
STANDARD_CASES = [(256, 3, 32), (512, 1, 28)]  # (batch, channels, size): CIFAR-like, MNIST-like


def bench(recipe: str, batch: int, channels: int, size: int, device: torch.device, iters: int) -> None:
    cfg = OmegaConf.create({"dataset": {"image_size": size, "channels": channels}})
    cfg.augmentation = OmegaConf.load(CONF / f"{recipe}.yaml")
    views = instantiate(cfg.augmentation, mean=[0.5] * channels, std=[0.25] * channels)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, 256, (batch, channels, size, size), dtype=torch.uint8, device=device, generator=gen)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    for i in range(iters + 3):  # 3 warm-up runs
        sync()
        start = time.perf_counter()
        out = views(x, gen)
        sync()
        if i >= 3:
            times.append(time.perf_counter() - start)
    median, best = statistics.median(times), min(times)
    n_views = len(out)
    print(
        f"{recipe:9s} {channels}x{size}x{size} batch {batch:4d}, {n_views} views: "
        f"{median * 1e3:7.2f} ms/batch  {batch / median:8.0f} images/s  {batch * n_views / median:8.0f} views/s"
        f"  (median of {iters}; best {batch * n_views / best:.0f} views/s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--recipe", default="simclr", help="a file name in conf/augmentation, without .yaml")
    parser.add_argument("--batch", type=int, help="with --size and --channels: one custom case")
    parser.add_argument("--size", type=int)
    parser.add_argument("--channels", type=int, choices=[1, 3])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    custom = (args.batch, args.channels, args.size)
    if any(v is not None for v in custom) and None in custom:
        parser.error("give --batch, --size and --channels together (or none for the standard cases)")
    cases = [custom] if args.batch is not None else STANDARD_CASES
    print(f"device {device}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}")
    for batch, channels, size in cases:
        bench(args.recipe, batch, channels, size, device, args.iters)


if __name__ == "__main__":
    main()
