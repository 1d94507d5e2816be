"""The readers of the real on-disk formats, on tiny files written here in those formats."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd

from sslrun.data import datasets
from sslrun.data.datasets import cifar10, cifar100, fashion_mnist, mnist, stl10
from sslrun.data.formats import read_idx
from sslrun.errors import SslrunError

RNG = np.random.default_rng(0)


def random_images(count: int, channels: int, size: int) -> np.ndarray:
    return RNG.integers(0, 256, (count, channels, size, size), dtype=np.uint8)


def write_pickle(path: Path, entry: dict) -> None:
    path.write_bytes(pickle.dumps(entry, protocol=2))


def write_cifar10(root: Path, per_batch: int = 2, num_test: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """cifar-10-batches-py with 5 x ``per_batch`` train images; returns all (train, test) images [N,3,32,32]."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train = random_images(5 * per_batch, 3, 32)
    for i in range(5):
        rows = train[i * per_batch : (i + 1) * per_batch].reshape(per_batch, 3072)
        write_pickle(folder / f"data_batch_{i + 1}", {"data": rows, "labels": [(i + j) % 10 for j in range(per_batch)]})
    test = random_images(num_test, 3, 32)
    write_pickle(folder / "test_batch", {"data": test.reshape(num_test, 3072), "labels": list(range(num_test))})
    write_pickle(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)], "num_vis": 3072})
    return train, test


def test_cifar10_rows_are_chw_and_batches_concatenate_in_order(tmp_path: Path) -> None:
    train, test = write_cifar10(tmp_path)
    rows = train[2:4].reshape(2, 3072).copy()
    rows[1, 1 * 1024 + 5 * 32 + 7] = 255  # image 3: channel 1, row 5, column 7 in CIFAR's row layout
    rows[1, 1 * 1024 + 7 * 32 + 5] = 0
    write_pickle(tmp_path / "cifar-10-batches-py/data_batch_2", {"data": rows, "labels": [1, 2]})

    splits = cifar10(root=str(tmp_path), download=False)

    assert splits.train.images.dtype == torch.uint8 and splits.train.images.shape == (10, 3, 32, 32)
    assert splits.train.images[3, 1, 5, 7] == 255 and splits.train.images[3, 1, 7, 5] == 0
    unchanged = [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert torch.equal(splits.train.images[unchanged], torch.from_numpy(train[unchanged]))
    assert splits.train.labels.tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5]
    assert torch.equal(splits.test.images, torch.from_numpy(test)) and splits.test.labels.tolist() == [0, 1, 2]
    assert splits.pretrain is splits.train
    assert (splits.name, splits.num_classes, splits.classes[2]) == ("cifar10", 10, "c2")
    assert splits.mean == (0.4914, 0.4822, 0.4465) and splits.std == (0.2470, 0.2435, 0.2616)


def test_cifar100_uses_fine_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train, test = random_images(4, 3, 32), random_images(2, 3, 32)
    fine, coarse = [99, 5, 0, 42], [1, 2, 3, 4]
    write_pickle(folder / "train", {"data": train.reshape(4, 3072), "fine_labels": fine, "coarse_labels": coarse})
    write_pickle(folder / "test", {"data": test.reshape(2, 3072), "fine_labels": [7, 8], "coarse_labels": [0, 0]})
    write_pickle(folder / "meta", {"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": ["x"] * 20})

    splits = cifar100(root=str(tmp_path), download=False)

    assert torch.equal(splits.train.images, torch.from_numpy(train))
    assert torch.equal(splits.test.images, torch.from_numpy(test))
    assert splits.train.labels.tolist() == [99, 5, 0, 42] and splits.test.labels.tolist() == [7, 8]
    assert (splits.num_classes, len(splits.classes), splits.classes[99]) == (100, 100, "f99")


def write_stl10_images(path: Path, images: np.ndarray) -> None:
    path.write_bytes(np.ascontiguousarray(images.transpose(0, 1, 3, 2)).tobytes())  # column-major per channel


def test_stl10_transposes_column_major_images_and_pretrains_on_unlabeled_plus_train(tmp_path: Path) -> None:
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    unlabeled, train, test = random_images(3, 3, 96), random_images(2, 3, 96), random_images(2, 3, 96)
    write_stl10_images(folder / "unlabeled_X.bin", unlabeled)
    write_stl10_images(folder / "test_X.bin", test)
    (folder / "train_y.bin").write_bytes(bytes([1, 10]))
    (folder / "test_y.bin").write_bytes(bytes([3, 4]))
    (folder / "class_names.txt").write_text("\n".join(f"name{i}" for i in range(10)) + "\n")
    # Written by hand at the raw offset: image 1, channel 2, stored column 10 (= image column), row 3.
    raw = bytearray(np.ascontiguousarray(train.transpose(0, 1, 3, 2)).tobytes())
    raw[1 * 27648 + 2 * 9216 + 10 * 96 + 3] = 255
    raw[1 * 27648 + 2 * 9216 + 3 * 96 + 10] = 0
    (folder / "train_X.bin").write_bytes(bytes(raw))

    splits = stl10(root=str(tmp_path), download=False)

    assert splits.train.images[1, 2, 3, 10] == 255 and splits.train.images[1, 2, 10, 3] == 0
    train[1, 2, 3, 10], train[1, 2, 10, 3] = 255, 0
    assert torch.equal(splits.train.images, torch.from_numpy(train))
    assert torch.equal(splits.test.images, torch.from_numpy(test))
    assert splits.train.labels.tolist() == [0, 9] and splits.test.labels.tolist() == [2, 3]
    assert splits.pretrain.images.shape == (5, 3, 96, 96)
    assert torch.equal(splits.pretrain.images, torch.from_numpy(np.concatenate([unlabeled, train])))
    assert splits.pretrain.labels.tolist() == [-1, -1, -1, 0, 9]
    assert (splits.classes[0], splits.image_size, splits.channels) == ("name0", 96, 3)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def write_mnist_folder(folder: Path, suffix: str) -> tuple[np.ndarray, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    train, test = RNG.integers(0, 256, (5, 28, 28), dtype=np.uint8), RNG.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    write_idx(folder / f"train-images-idx3-ubyte{suffix}", train)
    write_idx(folder / f"train-labels-idx1-ubyte{suffix}", np.array([9, 8, 7, 6, 5]))
    write_idx(folder / f"t10k-images-idx3-ubyte{suffix}", test)
    write_idx(folder / f"t10k-labels-idx1-ubyte{suffix}", np.array([0, 1, 2]))
    return train, test


def test_idx_gz_files_load_as_one_channel_images(tmp_path: Path) -> None:
    train, test = write_mnist_folder(tmp_path, ".gz")
    assert read_idx(tmp_path / "train-images-idx3-ubyte.gz").shape == (5, 28, 28)

    splits = mnist(root=str(tmp_path), download=False)

    assert splits.train.images.dtype == torch.uint8 and splits.train.images.shape == (5, 1, 28, 28)
    assert torch.equal(splits.train.images[:, 0], torch.from_numpy(train))
    assert torch.equal(splits.test.images[:, 0], torch.from_numpy(test))
    assert splits.train.labels.tolist() == [9, 8, 7, 6, 5] and splits.test.labels.tolist() == [0, 1, 2]
    assert splits.mean == (0.1307,) and splits.std == (0.3081,)


def test_fashion_mnist_finds_uncompressed_files_in_torchvision_layout(tmp_path: Path) -> None:
    train, _ = write_mnist_folder(tmp_path / "FashionMNIST" / "raw", "")

    splits = fashion_mnist(root=str(tmp_path), download=False)

    assert torch.equal(splits.train.images[:, 0], torch.from_numpy(train))
    assert splits.classes[9] == "Ankle boot" and splits.mean == (0.2860,)


def test_idx_with_wrong_magic_number_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(struct.pack(">IIII", 2052, 1, 28, 28) + bytes(784))
    with pytest.raises(SslrunError, match="train-images-idx3-ubyte.*magic number 2052"):
        read_idx(path)


def test_truncated_idx_names_the_file(tmp_path: Path) -> None:
    write_mnist_folder(tmp_path, ".gz")
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(SslrunError, match="t10k-images-idx3-ubyte.gz"):
        mnist(root=str(tmp_path), download=False)


def test_corrupt_cifar_pickle_names_the_file(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_4"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(SslrunError, match=r"data_batch_4 could not be read.*fresh copy"):
        cifar10(root=str(tmp_path), download=False)


def test_missing_cifar_file_names_the_file(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(SslrunError, match="test_batch is missing"):
        cifar10(root=str(tmp_path), download=False)


def test_stl10_file_of_wrong_size_names_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    (folder / "unlabeled_X.bin").write_bytes(bytes(1000))
    with pytest.raises(SslrunError, match="unlabeled_X.bin could not be read"):
        stl10(root=str(tmp_path), download=False)


def test_download_sources_match_torchvision() -> None:
    assert (datasets.CIFAR10_ARCHIVE.url, datasets.CIFAR10_ARCHIVE.md5) == (tvd.CIFAR10.url, tvd.CIFAR10.tgz_md5)
    assert (datasets.CIFAR100_ARCHIVE.url, datasets.CIFAR100_ARCHIVE.md5) == (tvd.CIFAR100.url, tvd.CIFAR100.tgz_md5)
    assert (datasets.STL10_ARCHIVE.url, datasets.STL10_ARCHIVE.md5) == (tvd.STL10.url, tvd.STL10.tgz_md5)
    assert datasets.CIFAR10_ARCHIVE.folder == tvd.CIFAR10.base_folder
    assert datasets.CIFAR100_ARCHIVE.folder == tvd.CIFAR100.base_folder
    assert datasets.STL10_ARCHIVE.folder == tvd.STL10.base_folder
    assert datasets.FASHION_MNIST_FILES.md5s == dict(tvd.FashionMNIST.resources)
    assert datasets.FASHION_MNIST_FILES.mirrors == tuple(tvd.FashionMNIST.mirrors)
    assert datasets.MNIST_FILES.md5s == dict(tvd.MNIST.resources)
    assert datasets.MNIST_FILES.mirrors == tuple(tvd.MNIST.mirrors)
