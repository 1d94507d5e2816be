"""Write an image-caption set (open_clip's CSV layout) from a labelled dataset, for offline CLIP checks.

Each image gets a caption made from its class name and a caption template drawn at random (by --seed), and
a ``label`` column with the class name, so that the kNN/linear probes and zero-shot classification run too.
This is a small-scale check of the CLIP machinery, not CLIP's data: the captions say nothing but the class.
The templates differ from the zero-shot prompts (eval.zero_shot.templates), which share only the class name.

    python scripts/make_imagetext.py fashion_mnist data/fmnist_captions           # 60000 + 10000 PNGs
    python scripts/make_imagetext.py cifar10 data/cifar_captions --source /work/data/cifar10_jpeg
    sslrun method=clip dataset=imagetext dataset.train_file=data/fmnist_captions/train.csv \\
        dataset.test_file=data/fmnist_captions/test.csv dataset.image_size=28 dataset.channels=1

Fashion-MNIST (IDX files; default: Debian's /usr/share/datasets/fashion-mnist) is written as PNG files under
``<out>/images/``; CIFAR-10 as JPEG class folders (``<source>/{train,test}/<class>/*.jpg``) is listed in place.
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
from pathlib import Path

from PIL import Image

from sslrun.data.datasets import DEBIAN_FASHION_MNIST, FASHION_MNIST_CLASSES
from sslrun.data.folders import list_image_folder
from sslrun.data.formats import read_mnist_folder

CAPTION_TEMPLATES = (
    "{} on a plain background",
    "product shot of a {}",
    "my new {}",
    "an image showing a {}",
    "this {} is for sale",
    "a close-up of a {}",
    "a picture of one {}",
    "{}, seen from the front",
    "look at this {}!",
    "catalogue image: {}",
)


def _write(rows: list[tuple[str, str]], out_csv: Path, rng: random.Random) -> None:
    """``rows`` of (image path, class name) -> CSV with filepath, title (the caption) and label columns."""
    with open(out_csv, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "title", "label"])
        for path, name in rows:
            writer.writerow([path, rng.choice(CAPTION_TEMPLATES).format(name), name])


def fashion_mnist(source: Path, out: Path, limit: dict[str, int | None], rng: random.Random) -> None:
    splits = dict(zip(("train", "test"), read_mnist_folder(source)))
    for split, images in splits.items():
        folder = out / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        count = min(len(images), limit[split] or len(images))
        rows = []
        for i in range(count):
            name = f"images/{split}/{i:05d}.png"
            Image.fromarray(images.images[i, 0].numpy(), "L").save(out / name)
            rows.append((name, FASHION_MNIST_CLASSES[int(images.labels[i])]))
        _write(rows, out / f"{split}.csv", rng)
        print(f"{out / f'{split}.csv'}: {count} pairs")


def cifar10(source: Path, out: Path, limit: dict[str, int | None], rng: random.Random) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        listing = list_image_folder(source / split)
        order = list(range(len(listing.files)))
        rng.shuffle(order)  # a limited set still holds every class
        order = order[:limit[split]] if limit[split] else order
        rows = [(str(listing.files[i].absolute()), listing.classes[int(listing.labels[i])]) for i in sorted(order)]
        _write(rows, out / f"{split}.csv", rng)
        print(f"{out / f'{split}.csv'}: {len(rows)} pairs")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=("fashion_mnist", "cifar10"))
    parser.add_argument("out", type=Path, help="folder for train.csv, test.csv (and the PNGs)")
    parser.add_argument("--source", type=Path, help="the IDX folder, or the CIFAR-10 JPEG folder with train/ and test/")
    parser.add_argument("--limit-train", type=int, help="at most this many train pairs")
    parser.add_argument("--limit-test", type=int, help="at most this many test pairs")
    parser.add_argument("--seed", type=int, default=0, help="draws the caption templates")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    limit = {"train": args.limit_train, "test": args.limit_test}
    if args.dataset == "fashion_mnist":
        fashion_mnist(args.source or DEBIAN_FASHION_MNIST, args.out, limit, rng)
    else:
        if args.source is None:
            parser.error("cifar10 needs --source, the folder holding train/<class>/*.jpg and test/<class>/*.jpg")
        cifar10(args.source, args.out, limit, rng)
    return 0


if __name__ == "__main__":
    sys.exit(main())
