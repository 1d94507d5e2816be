"""Readers of the datasets' on-disk formats, returning ``ImageSet``s.

Written here rather than taken from torchvision's dataset classes, which md5-check every file
(so they reject partial or test copies) and keep PIL images instead of one uint8 tensor.
Any unreadable or malformed file becomes an ``SslrunError`` that names it.
"""

from __future__ import annotations

import gzip
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from sslrun.data.image_set import ImageSet
from sslrun.errors import SslrunError

# The four MNIST / Fashion-MNIST files, each found with or without ".gz".
IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_STL10_SIZE = 96


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn any failure while parsing ``path`` into an SslrunError naming the file."""
    try:
        yield
    except SslrunError:
        raise
    except FileNotFoundError as e:
        raise SslrunError(
            f"{path} is missing: copy the complete dataset folder again, or delete {path.parent} "
            f"and rerun with dataset.download=true."
        ) from e
    except Exception as e:  # pickle, numpy, gzip and our own checks all mean the same: a bad file
        raise SslrunError(
            f"{path} could not be read ({type(e).__name__}: {e}); it is corrupt or not in the expected "
            f"format: replace it with a fresh copy (or delete {path.parent} and rerun with dataset.download=true)."
        ) from e


def _load_pickle(path: Path) -> dict:
    # latin1 is what the Python 2 pickles of CIFAR need for their numpy arrays and str keys.
    with _reading(path), open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
        if not isinstance(entry, dict):
            raise ValueError(f"expected a dict, got {type(entry).__name__}")
        return entry


def _cifar_batch(path: Path, label_key: str) -> ImageSet:
    entry = _load_pickle(path)
    with _reading(path):
        images = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)  # rows are CHW
        return ImageSet(torch.from_numpy(images), torch.as_tensor(entry[label_key]))


def _concat(sets: list[ImageSet]) -> ImageSet:
    return ImageSet(torch.cat([s.images for s in sets]), torch.cat([s.labels for s in sets]))


def read_cifar10(folder: Path) -> tuple[ImageSet, ImageSet, list[str]]:
    """Read ``cifar-10-batches-py``: (train = data_batch_1..5, test = test_batch, class names)."""
    train = _concat([_cifar_batch(folder / f"data_batch_{i}", "labels") for i in range(1, 6)])
    test = _cifar_batch(folder / "test_batch", "labels")
    meta = folder / "batches.meta"
    with _reading(meta):
        classes = list(_load_pickle(meta)["label_names"])
    return train, test, classes


def read_cifar100(folder: Path) -> tuple[ImageSet, ImageSet, list[str]]:
    """Read ``cifar-100-python`` with the 100 fine labels: (train, test, class names)."""
    train = _cifar_batch(folder / "train", "fine_labels")
    test = _cifar_batch(folder / "test", "fine_labels")
    meta = folder / "meta"
    with _reading(meta):
        classes = list(_load_pickle(meta)["fine_label_names"])
    return train, test, classes


def _stl10_count(path: Path) -> int:
    pixels = 3 * _STL10_SIZE * _STL10_SIZE
    with _reading(path):
        size = path.stat().st_size
        if size % pixels:
            raise ValueError(f"size {size} is not a multiple of one 3x96x96 image")
    return size // pixels


def _stl10_images_into(path: Path, out: np.ndarray) -> None:
    with _reading(path):
        stored = np.memmap(path, dtype=np.uint8, mode="r", shape=(len(out), 3, _STL10_SIZE, _STL10_SIZE))
        np.copyto(out, stored.transpose(0, 1, 3, 2))  # each channel is stored column-major


def _stl10_labels(path: Path, count: int) -> torch.Tensor:
    with _reading(path):
        labels = np.fromfile(path, dtype=np.uint8)
        if len(labels) != count or labels.min() < 1 or labels.max() > 10:
            raise ValueError(f"expected {count} labels in 1..10")
    return torch.from_numpy(labels.astype(np.int64) - 1)


def read_stl10(folder: Path) -> tuple[ImageSet, ImageSet, ImageSet, list[str]]:
    """Read ``stl10_binary``: (pretrain = unlabeled + train, train, test, class names).

    Unlabeled images get label -1. ``train`` is a view into ``pretrain``'s tensor, so the 5000
    labeled images are held once next to the 100000 unlabeled ones (2.8 GB).
    """
    n_unlabeled = _stl10_count(folder / "unlabeled_X.bin")
    n_train = _stl10_count(folder / "train_X.bin")
    n_test = _stl10_count(folder / "test_X.bin")
    pretrain_images = torch.empty((n_unlabeled + n_train, 3, _STL10_SIZE, _STL10_SIZE), dtype=torch.uint8)
    test_images = torch.empty((n_test, 3, _STL10_SIZE, _STL10_SIZE), dtype=torch.uint8)
    _stl10_images_into(folder / "unlabeled_X.bin", pretrain_images[:n_unlabeled].numpy())
    _stl10_images_into(folder / "train_X.bin", pretrain_images[n_unlabeled:].numpy())
    _stl10_images_into(folder / "test_X.bin", test_images.numpy())
    train_labels = _stl10_labels(folder / "train_y.bin", n_train)
    pretrain_labels = torch.cat([torch.full((n_unlabeled,), -1, dtype=torch.long), train_labels])
    names = folder / "class_names.txt"
    with _reading(names):
        classes = [line.strip() for line in names.read_text().splitlines() if line.strip()]
    return (
        ImageSet(pretrain_images, pretrain_labels),
        ImageSet(pretrain_images[n_unlabeled:], train_labels),
        ImageSet(test_images, _stl10_labels(folder / "test_y.bin", n_test)),
        classes,
    )


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file of unsigned bytes (``.gz`` or not): 2049 = labels [N], 2051 = images [N,H,W]."""
    with _reading(path):
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            raw = f.read()
        magic = int.from_bytes(raw[:4], "big")
        if magic not in (2049, 2051):
            raise ValueError(f"magic number {magic}, expected 2049 (labels) or 2051 (images)")
        ndim = magic & 0xFF
        shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
        data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        if data.size != int(np.prod(shape)):
            raise ValueError(f"{data.size} bytes of data for shape {shape}")
        return data.reshape(shape).copy()  # frombuffer is read-only; torch wants writable memory


def idx_file(folder: Path, stem: str) -> Path | None:
    """``folder/stem`` or ``folder/stem.gz``, whichever exists (torchvision keeps both)."""
    for path in (folder / stem, folder / f"{stem}.gz"):
        if path.is_file():
            return path
    return None


def read_mnist_folder(folder: Path) -> tuple[ImageSet, ImageSet]:
    """Read the four MNIST-style IDX files (``IDX_STEMS``, ``.gz`` or not): (train, test), 1 channel."""
    paths = {stem: idx_file(folder, stem) for stem in IDX_STEMS}
    for stem, path in paths.items():
        if path is None:
            raise SslrunError(
                f"{folder / stem}[.gz] is missing: copy all four IDX files ({', '.join(IDX_STEMS)}) into {folder}."
            )
    splits = []
    for split in ("train", "t10k"):
        image_path, label_path = paths[f"{split}-images-idx3-ubyte"], paths[f"{split}-labels-idx1-ubyte"]
        images, labels = read_idx(image_path), read_idx(label_path)
        with _reading(image_path):
            if images.ndim != 3 or labels.shape != (len(images),):
                raise ValueError(f"images {images.shape} do not match labels {labels.shape} in {label_path.name}")
        splits.append(ImageSet(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels)))
    return splits[0], splits[1]
