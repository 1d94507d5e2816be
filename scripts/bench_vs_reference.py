"""sslrun's training pipeline against a reference built the way lightly's CIFAR-10 benchmark is, side by side.

One process trains the same backbone, batch, precision and views two ways, in short windows that alternate
(A B, then B A, ...) so that a host whose speed drifts, or that other jobs share, slows both alike:

  sslrun     the real loop (``Pretrainer.fit``, scripts/bench_train.py): the dataset resident as one uint8
             tensor (on the GPU when it fits), all views of a batch made by the batched ViewGenerator on the
             device, the method, the engine's step, its gradient and collapse monitors.
  reference  lightly's loss and heads (NTXentLoss + SimCLRProjectionHead, SwaVLoss + SwaVProjectionHead +
             SwaVPrototypes), lightly's torchvision transforms run per image in DataLoader workers
             (SimCLRTransform / SwaVTransform with the workload's crop and colour settings), one backbone call
             per view, as lightly's benchmarks/ and docs/.../cifar10_benchmark.py do. A plain PyTorch loop, not
             a Lightning Trainer, and images already decoded in memory rather than read from PNG files, and
             pinned host memory on CUDA: every difference favours the reference.

Each pipeline's figure is its steady state: the median images/s of its log intervals (``trainer.log_every``
steps each), the first interval of every window left out (workers starting, compilation, warm-up). The
ratio is sslrun over the reference; its spread is the range of the per-round ratios.

    python scripts/bench_vs_reference.py --workload resnet18 --record
    python scripts/bench_vs_reference.py --workload cnn28 --variant trainer.precision=bf16   # sslrun vs sslrun
    python scripts/bench_vs_reference.py --workload swav dataset.num_train=50000 trainer.batch_size=512

--variant compares sslrun with itself plus the given overrides instead of with the reference (precision,
compile). Extra positional arguments are Hydra overrides applied to both sides.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_train import SslrunSetup, compose_config
from omegaconf import DictConfig
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sslrun.data.augment import ViewRecipe
from sslrun.engine.device import cpu_has_bf16_units
from sslrun.engine.optim import effective_lr
from sslrun.errors import SslrunError
from sslrun.run import device_name

ROOT = Path(__file__).resolve().parent.parent
# name -> (Hydra overrides, what it is). Synthetic images of the workload's shape: both pipelines' costs
# depend on the shape, not the content, and no files are needed (a lent GPU machine has no datasets).
WORKLOADS = {
    "cnn28": (["dataset=synthetic", "dataset.image_size=28", "dataset.channels=1", "backbone=small_cnn",
               "backbone.width=16", "method=simclr", "method.proj_hidden_dim=512"],
              "small CNN (width 16), SimCLR, 28-px grayscale: the Fashion-MNIST experiment's model"),
    "cnn32": (["dataset=synthetic", "backbone=small_cnn", "method=simclr", "method.proj_hidden_dim=512"],
              "small CNN (width 32), SimCLR, 32-px RGB"),
    "resnet18": (["dataset=synthetic", "backbone=resnet18", "method=simclr"],
                 "ResNet-18 (CIFAR stem), SimCLR, 32-px RGB"),
    "swav": (["dataset=synthetic", "backbone=resnet18", "method=swav"],
             "ResNet-18 (CIFAR stem), SwAV multi-crop 2x32 + 6x18 px, 32-px RGB"),
}
REFERENCE_METHODS = ("simclr", "swav")


# ----------------------------------------------------------------------------- recording


def machine(device: torch.device) -> str:
    """The device's name; for a CPU also its model and whether it has AMX, which decides bf16's speed."""
    name = device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if device.type != "cpu" or not cpuinfo.exists():
        return name
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("model name")), "unknown model")
    return f"{name}, {model}, {'AMX' if cpu_has_bf16_units() else 'no AMX'}"


def commit() -> str:
    """The checkout's short commit, marked when sslrun/, conf/ or scripts/ differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], check=False, cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + (" + local changes" if git("status", "--porcelain", "--", "sslrun", "conf", "scripts") else "")


def record_row(heading: str, columns: list[str], cells: list[str]) -> None:
    """Add the row ``date | *cells | commit`` to the table under ``### heading`` in BENCHMARKS.md, or in the
    file the environment variable BENCH_RECORD names.

    ``columns`` names every column, date first and commit last. A missing section is started at the end
    of the file; an existing one gets the row after its table's last row.
    """
    path = Path(os.environ.get("BENCH_RECORD", ROOT / "BENCHMARKS.md"))
    row = "| " + " | ".join([str(datetime.date.today()), *cells, commit()]) + " |"
    lines = path.read_text().splitlines() if path.exists() else ["# Benchmarks"]
    title = f"### {heading}"
    if title in lines:
        at = lines.index(title) + 1
        while at < len(lines) and not lines[at].startswith("|"):
            at += 1
        while at < len(lines) and lines[at].startswith("|"):
            at += 1
        lines.insert(at, row)
    else:
        lines += ["", title, "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns), row]
    path.write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- the reference pipeline


class DecodedImages(Dataset):
    """uint8 images [N,C,H,W] handed to a per-image transform as PIL images, with their index (as
    torchvision's CIFAR10 and LightlyDataset do, minus the file decode)."""

    def __init__(self, images: torch.Tensor, transform: Callable) -> None:
        arrays = images.permute(0, 2, 3, 1).contiguous().numpy()
        self.arrays = arrays[..., 0] if arrays.shape[-1] == 1 else arrays  # grayscale as mode "L"
        self.transform = transform

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, i: int) -> tuple[list[torch.Tensor], int]:
        return self.transform(Image.fromarray(self.arrays[i])), i


def lightly_transform(recipes: list[ViewRecipe], size: int, mean, std) -> Callable:
    """lightly's per-image view transform with the settings of sslrun's view recipes.

    Raises:
        SslrunError: for a recipe lightly's transforms cannot express (a non-default aspect range,
            solarisation, colour settings that differ between recipes).
    """
    from lightly.transforms import SimCLRTransform, SwaVTransform

    first = recipes[0]
    colour = ("hflip", "jitter_p", "brightness", "contrast", "saturation", "hue", "grayscale_p", "blur_p",
              "blur_sigma")
    for r in recipes:
        if r.solarize_p or abs(r.ratio[0] - 3 / 4) > 1e-6 or abs(r.ratio[1] - 4 / 3) > 1e-6 or \
                any(getattr(r, k) != getattr(first, k) for k in colour):
            raise SslrunError(f"The reference pipeline cannot express the view recipe {r}: lightly's SimCLR and "
                              "SwAV transforms take aspect ratios [3/4, 4/3], no solarisation, and one colour "
                              "recipe for all crops. Pick a workload with the simclr or multicrop augmentation.")
    common = {"hf_prob": first.hflip, "cj_prob": first.jitter_p, "cj_strength": 1.0, "cj_bright": first.brightness,
              "cj_contrast": first.contrast, "cj_sat": first.saturation, "cj_hue": first.hue,
              "random_gray_scale": first.grayscale_p, "gaussian_blur": first.blur_p, "sigmas": first.blur_sigma,
              "normalize": {"mean": list(mean), "std": list(std)}}
    if len(recipes) == 1 and first.count == 2 and first.scale[1] == 1.0:  # lightly's SimCLR benchmark
        return SimCLRTransform(input_size=first.out_size(size), min_scale=first.scale[0], **common)
    return SwaVTransform(crop_sizes=tuple(r.out_size(size) for r in recipes),
                         crop_counts=tuple(r.count for r in recipes),
                         crop_min_scales=tuple(r.scale[0] for r in recipes),
                         crop_max_scales=tuple(r.scale[1] for r in recipes), **common)


class LightlySimCLR(nn.Module):
    """lightly's SimCLR: projection head and NT-Xent loss, one backbone call per view."""

    def __init__(self, backbone: nn.Module, m: DictConfig) -> None:
        super().__init__()
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead

        self.backbone = backbone
        self.projection_head = SimCLRProjectionHead(backbone.feat_dim, m.proj_hidden_dim, m.proj_output_dim,
                                                    num_layers=m.get("proj_layers", 2))
        self.criterion = NTXentLoss(temperature=m.temperature)

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        z0, z1 = (self.projection_head(self.backbone(v).flatten(1)) for v in views[:2])
        return self.criterion(z0, z1)


class LightlySwaV(nn.Module):
    """lightly's SwAV (benchmarks/imagenet/resnet50/swav.py without its queue and online classifier)."""

    def __init__(self, backbone: nn.Module, m: DictConfig, num_large: int) -> None:
        super().__init__()
        from lightly.loss import SwaVLoss
        from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes

        self.backbone, self.num_large = backbone, num_large
        self.projection_head = SwaVProjectionHead(backbone.feat_dim, m.proj_hidden_dim, m.proj_output_dim)
        self.prototypes = SwaVPrototypes(m.proj_output_dim, m.num_prototypes)
        self.criterion = SwaVLoss(temperature=m.temperature, sinkhorn_iterations=m.sinkhorn_iters,
                                  sinkhorn_epsilon=m.sinkhorn_epsilon)

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        self.prototypes.normalize()
        logits = [self.prototypes(F.normalize(self.projection_head(self.backbone(v).flatten(1)), dim=1))
                  for v in views]
        return self.criterion(logits[:self.num_large], logits[self.num_large:])


class Reference:
    """The lightly-style pipeline over the same images, backbone architecture, batch and precision."""

    def __init__(self, setup: SslrunSetup, workers: int) -> None:
        from hydra.utils import instantiate
        from lightly.utils.lars import LARS

        cfg, self.setup = setup.cfg, setup
        method = cfg.method._target_.rsplit(".", 1)[-1].lower()
        if method not in REFERENCE_METHODS:
            raise SslrunError(f"The reference pipeline has lightly's {' and '.join(REFERENCE_METHODS)} only, not "
                              f"{method}; compare other methods with --variant.")
        recipes = setup.augment.recipes
        backbone = instantiate(cfg.backbone)
        self.model = (LightlySimCLR(backbone, cfg.method) if method == "simclr"
                      else LightlySwaV(backbone, cfg.method, recipes[0].count)).to(setup.device)
        lr = effective_lr(cfg.optimizer, cfg.trainer.batch_size)
        opt = LARS if cfg.optimizer._target_.endswith("LARS") else torch.optim.SGD
        self.optimizer = opt(self.model.parameters(), lr=lr, momentum=cfg.optimizer.momentum,
                             weight_decay=cfg.optimizer.weight_decay)
        splits = setup.splits
        data = DecodedImages(splits.pretrain.images, lightly_transform(recipes, splits.image_size, splits.mean,
                                                                        splits.std))
        self.loader = DataLoader(data, batch_size=cfg.trainer.batch_size, shuffle=True, drop_last=True,
                                 num_workers=workers, pin_memory=setup.device.type == "cuda")
        self.batches: Iterator | None = None

    def _next(self) -> list[torch.Tensor]:
        try:
            views, _ = next(self.batches)
        except StopIteration:  # an epoch ended: the next one starts
            self.batches = iter(self.loader)
            views, _ = next(self.batches)
        return [v.to(self.setup.device, non_blocking=True) for v in views]

    def window(self, seconds: float | None) -> list[float]:
        """Train ``seconds`` of wall-clock and at least two log intervals (None: ``trainer.epochs`` epochs); the
        images/s of each interval but the first. The workers start with the window and stop with it, so they
        take no CPU from the other pipeline's window."""
        s = self.setup
        every, batch = s.cfg.trainer.log_every, s.cfg.trainer.batch_size
        autocast = torch.autocast(s.device.type, dtype=s.autocast_dtype or torch.float32,
                                  enabled=s.autocast_dtype is not None)
        self.model.train()
        self.batches = iter(self.loader)
        rates, start = [], time.perf_counter()
        mark, steps = start, s.cfg.trainer.epochs * len(self.loader)
        while True:
            for _ in range(every):
                views = self._next()
                with autocast:
                    loss = self.model(views)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
            if s.device.type == "cuda":
                torch.cuda.synchronize(s.device)
            now = time.perf_counter()
            rates.append(every * batch / (now - mark))
            mark = now
            done = now - start >= seconds if seconds else len(rates) * every >= steps
            if done and len(rates) >= 2:  # at least one interval after the first
                break
        self.batches = None
        return rates[1:]


# ----------------------------------------------------------------------------- side by side


def alternate(windows: dict[str, Callable[[float | None], list[float]]], seconds: float | None, rounds: int) -> dict:
    """Per pipeline, the per-round interval rates, running the pipelines' windows in alternating order after
    one untimed half-length window each. ``seconds`` None: windows of ``trainer.epochs`` epochs."""
    names = list(windows)
    for name in names:  # untimed: first-call costs (compilation, lazy initialisation) stay out of the rounds
        windows[name](seconds and seconds / 2)
    rates: dict[str, list[list[float]]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            got = windows[name](seconds)
            if not got:
                raise RuntimeError(f"A {seconds} s window of {name} ended before its second log interval: give "
                                   "more --seconds or a smaller trainer.log_every.")
            rates[name].append(got)
            print(f"  round {r + 1}/{rounds}  {name:>9s}: {statistics.median(got):9.1f} images/s "
                  f"({len(got)} intervals)", flush=True)
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for both sides, after the workload's")
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="resnet18")
    ap.add_argument("--variant", nargs="+", metavar="OVERRIDE",
                    help="compare sslrun with sslrun plus these overrides, instead of with the reference")
    ap.add_argument("--seconds", type=float, default=20.0,
                    help="length of one window; 0: trainer.epochs epochs instead (give trainer.epochs=N)")
    ap.add_argument("--rounds", type=int, default=3, help="windows per pipeline")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                    help="the reference's DataLoader workers (lightly's benchmark: 8; default: min(8, CPUs))")
    ap.add_argument("--record", action="store_true", help="append a row to BENCHMARKS.md")
    args = ap.parse_args()

    overrides, what = WORKLOADS[args.workload]
    base = SslrunSetup.build(compose_config([*overrides, *args.overrides]))
    if args.variant:
        other = SslrunSetup.build(compose_config([*overrides, *args.overrides, *args.variant]))
        names, windows = ("sslrun", "variant"), {"sslrun": base.window, "variant": other.window}
    else:
        names, windows = ("sslrun", "reference"), {"sslrun": base.window,
                                                   "reference": Reference(base, args.workers).window}
    dev, t = machine(base.device), base.cfg.trainer
    precision = {None: "fp32", torch.bfloat16: "bf16"}.get(base.autocast_dtype, str(base.autocast_dtype))
    print(f"{args.workload}: {what}; batch {t.batch_size}, {precision}, {base.augment.num_views} views, "
          f"{len(base.splits.pretrain)} images, on {dev}, torch {torch.__version__}"
          + ("" if args.variant else f"; reference with {args.workers} DataLoader workers"), flush=True)
    try:
        rates = alternate(windows, args.seconds or None, args.rounds)
    except RuntimeError as e:
        raise SystemExit(str(e)) from e
    ips = {n: statistics.median([x for w in rates[n] for x in w]) for n in names}
    per_round = [statistics.median(a) / statistics.median(b) for a, b in zip(rates[names[0]], rates[names[1]])]
    ratio = ips[names[0]] / ips[names[1]]
    if args.variant:
        label = " ".join(args.variant)
        print(f"sslrun {ips['sslrun']:.1f} images/s, with {label} {ips['variant']:.1f} images/s: "
              f"{1 / ratio:.2f}x (rounds {min(1 / r for r in per_round):.2f}-{max(1 / r for r in per_round):.2f})")
    else:
        print(f"sslrun {ips['sslrun']:.1f} images/s, reference {ips['reference']:.1f} images/s: sslrun "
              f"{ratio:.2f}x the reference (rounds {min(per_round):.2f}-{max(per_round):.2f}) on {dev}")
    if args.record:
        command = "`python scripts/bench_vs_reference.py " + " ".join(a for a in sys.argv[1:] if a != "--record") + "`"
        if args.variant:
            record_row("sslrun against itself with one change, `scripts/bench_vs_reference.py --variant`",
                       ["date", "device", "workload", "command", "sslrun images/s", "variant images/s",
                        "variant / sslrun (rounds)", "commit"],
                       [dev, f"{args.workload}, batch {t.batch_size}, {precision}", command, f"{ips['sslrun']:.1f}",
                        f"{ips['variant']:.1f}",
                        f"{1 / ratio:.2f} ({min(1 / r for r in per_round):.2f}-{max(1 / r for r in per_round):.2f})"])
        else:
            record_row("sslrun against the lightly-style reference, `scripts/bench_vs_reference.py`",
                       ["date", "device", "workload", "command", "sslrun images/s", "reference images/s",
                        "sslrun / reference (rounds)", "commit"],
                       [dev, f"{args.workload}, batch {t.batch_size}, {precision}", command, f"{ips['sslrun']:.1f}",
                        f"{ips['reference']:.1f}", f"{ratio:.2f} ({min(per_round):.2f}-{max(per_round):.2f})"])


if __name__ == "__main__":
    main()
