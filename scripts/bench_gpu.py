"""The GPU benchmark, in one process (scripts/bench_gpu.sh runs it; see there for the device command).

On CIFAR-10-shaped data (50,000 synthetic 32x32 uint8 images, 10,000 more for testing), ResNet-18 with the
CIFAR stem, batch 512, bf16 autocast:
  * SimCLR, BYOL, SwAV (multi-crop 2x32 + 6x18) and DINO (the same crops): epoch time (50,000 images over the
    steady-state images/s of the real loop, scripts/bench_train.py) and peak GPU memory;
  * SimCLR with trainer.compile=true (compiled in an untimed window first);
  * sslrun over the lightly-style reference on the same GPU (scripts/bench_vs_reference.py);
  * the evaluation of a run: features of the 60,000 images, kNN (k=200) and the linear probe.
Each figure is printed and appended to BENCHMARKS.md with the device's name; a step that fails is reported
as failed and the rest still run (exit status 1).

Environment: BENCH_TOY=1 runs the same steps at toy sizes (CPU, seconds; the test suite does) and records
nothing unless BENCH_RECORD=<file> is set; BENCH_RECORD=<file> records there instead of BENCHMARKS.md;
BENCH_REFERENCE=0 leaves out the reference (which needs lightly, the [bench] extra); BENCH_SECONDS sets the
length of a timed window (default 15).
"""

from __future__ import annotations

import gc
import os
import statistics
import time
import traceback
from collections.abc import Callable

import torch
from bench_train import SslrunSetup, compose_config
from bench_vs_reference import Reference, alternate, machine, record_row

from sslrun.data.datasets import load_dataset
from sslrun.engine.device import resolve_device
from sslrun.eval.evaluate import evaluate
from sslrun.eval.features import extract_features

TOY = os.environ.get("BENCH_TOY") == "1"
DATA = (["dataset=synthetic", "dataset.num_train=256", "dataset.num_test=128"] if TOY else
        ["dataset=synthetic", "dataset.num_train=50000", "dataset.num_test=10000"])
MODEL = (["backbone=small_cnn", "backbone.width=8", "backbone.feat_dim=32", "trainer.batch_size=32",
          "trainer.log_every=1", "trainer.epochs=1", "eval.linear.epochs=2"] if TOY else
         ["backbone=resnet18", "trainer.batch_size=512"])
BASE = [*DATA, *MODEL, "trainer.precision=bf16"]
METHODS = ("simclr", "byol", "swav", "dino")
# Compiling takes about a minute per method on the GPU machine: one keeps the run within 8 minutes. Not at toy
# sizes: inductor's C++ compilation alone takes minutes on a small CPU.
COMPILED = () if TOY else ("simclr",)
# Multi-crop for DINO as for SwAV: its YAML picks the multicrop views (2 x 32 px + 6 x 18 px) already.
# A timed window's length; at toy sizes, unless given, one epoch (8 steps) instead: a loaded CPU can take
# seconds for one step, and a window needs two log intervals.
SECONDS = float(os.environ["BENCH_SECONDS"]) if "BENCH_SECONDS" in os.environ else (None if TOY else 15.0)
TARGETS = {"simclr epoch": "<= 2.0 s", "reference": ">= 8x", "evaluation": "<= 10 s"}


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def epoch_time(method: str, splits, compile_: bool = False) -> tuple[str, str]:
    """A method's epoch time and peak memory from the real loop's steady state."""
    setup = SslrunSetup.build(compose_config([*BASE, f"method={method}", f"trainer.compile={compile_}"]), splits)
    if compile_:
        setup.window(SECONDS and SECONDS / 3)  # untimed: the compilation
    cuda = setup.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(setup.device)
    rates = setup.window(SECONDS)
    if not rates:
        raise RuntimeError(f"a {SECONDS} s window ended before its second log interval")
    ips, n = statistics.median(rates), len(splits.pretrain)
    peak = f", peak {torch.cuda.max_memory_allocated(setup.device) / 2**30:.1f} GiB" if cuda else ""
    return (f"{method} epoch{' (trainer.compile=true)' if compile_ else ''}, {n:,} images",
            f"{n / ips:.2f} s ({ips:,.0f} images/s{peak})")


def reference_ratio(splits) -> tuple[str, str]:
    setup = SslrunSetup.build(compose_config([*BASE, "method=simclr"]), splits)
    workers = min(8, os.cpu_count() or 1)
    rates = alternate({"sslrun": setup.window, "reference": Reference(setup, workers).window}, SECONDS, 2)
    ips = {k: statistics.median([x for w in v for x in w]) for k, v in rates.items()}
    what = f"SimCLR, sslrun / lightly-style reference (per-image torchvision views in {workers} workers)"
    return what, (f"{ips['sslrun'] / ips['reference']:.2f}x ({ips['sslrun']:,.0f} vs {ips['reference']:,.0f} "
                  "images/s)")


def evaluation(splits) -> tuple[str, str]:
    """Features of every train and test image, then the run's probes (kNN k=200 and the linear probe)."""
    setup = SslrunSetup.build(compose_config([*BASE, "method=simclr"]), splits)
    setup.window(SECONDS and SECONDS / 3)  # a briefly trained backbone, in the state a run leaves it
    backbone, dev, cfg = setup.method.eval_backbone(), setup.device, setup.cfg

    def now() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter()

    t0 = now()
    for s in (splits.train, splits.test):
        extract_features(backbone, s.images, splits.mean, splits.std, dev, cfg.eval.batch_size, setup.autocast_dtype)
    t1 = now()
    results = evaluate(backbone, splits, cfg.eval, dev, setup.autocast_dtype)
    t2 = now()
    n = len(splits.train) + len(splits.test)
    what = f"evaluation, {n:,} images: features, kNN k={cfg.eval.knn.k}, linear probe {cfg.eval.linear.epochs} epochs"
    return what, (f"{t2 - t1:.2f} s (features {t1 - t0:.2f} s, kNN + linear {t2 - t1 - (t1 - t0):.2f} s; "
                  f"kNN top-1 {results.get('knn_top1', float('nan')):.3f})")


def main() -> int:
    record = "BENCH_RECORD" in os.environ or not TOY
    start = time.perf_counter()
    cfg = compose_config(BASE)
    splits = load_dataset(cfg.dataset)  # once: every step trains on the same images
    device = machine(resolve_device(cfg.trainer.device))
    print(f"{device}, torch {torch.__version__}{' (toy sizes)' if TOY else ''}: {len(splits.pretrain):,} "
          f"train and {len(splits.test):,} test images in {time.perf_counter() - start:.0f} s", flush=True)
    steps: list[tuple[str, Callable[[], tuple[str, str]]]] = [
        *((m, lambda m=m: epoch_time(m, splits)) for m in METHODS),
        *((f"{m} compiled", lambda m=m: epoch_time(m, splits, compile_=True)) for m in COMPILED),
        *((("reference", lambda: reference_ratio(splits)),) if os.environ.get("BENCH_REFERENCE", "1") == "1"
          else ()),
        ("evaluation", lambda: evaluation(splits)),
    ]
    rows, failed = [], False
    for key, fn in steps:
        t0 = time.perf_counter()
        try:
            what, figure = fn()
        except Exception as e:  # noqa: BLE001 - one failing step must not lose the others' figures
            traceback.print_exc()
            what, figure, failed = key, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", True
        _free()
        target = TARGETS.get("simclr epoch" if key == "simclr" else key, "")
        rows.append((what, figure, target))
        print(f"{what}: {figure}" + (f"  [target {target}]" if target else "") +
              f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"all steps in {time.perf_counter() - start:.0f} s")
    if record:
        for what, figure, target in rows:
            record_row("GPU benchmark, `scripts/bench_gpu.sh`", ["date", "device", "measurement", "figure",
                                                                 "target", "commit"], [device, what, figure, target])
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
