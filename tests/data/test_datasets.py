"""Dataset configs, ``load_dataset``, limits, the synthetic and image-folder builders, and their errors."""

from __future__ import annotations

import inspect
import socket
import time
import urllib.error
from pathlib import Path

import hydra.utils
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from sslrun.data import datasets
from sslrun.data.datasets import (
    DEBIAN_FASHION_MNIST,
    imagefolder,
    load_dataset,
    synthetic,
)
from sslrun.data.image_set import DatasetSplits, ImageSet
from sslrun.errors import SslrunError

CONF = Path(__file__).resolve().parents[2] / "conf" / "dataset"
GENERIC_KEYS = {"_target_", "name", "limit_train", "limit_test", "prefetch", "device_decode", "mean", "std"}


def dataset_config(option: str, **overrides: object) -> dict:
    return {**OmegaConf.to_container(OmegaConf.load(CONF / f"{option}.yaml")), **overrides}


OPTIONS = ["cifar10", "cifar100", "stl10", "fashion_mnist", "mnist", "imagefolder", "imagenet", "imagenet100",
           "synthetic"]


@pytest.mark.parametrize("option", OPTIONS)
def test_every_config_names_its_builder_and_only_its_arguments(option: str) -> None:
    cfg = dataset_config(option)
    builder = hydra.utils.get_method(cfg["_target_"])
    assert cfg["name"] == option and option.startswith(builder.__name__)  # imagenet100 is imagenet's subset
    assert {"image_size", "channels", "limit_train", "limit_test"} <= cfg.keys()
    assert cfg["limit_train"] is None and cfg["limit_test"] is None
    assert {"mean", "std"} <= cfg.keys()  # every dataset takes them (null: its own statistics)
    inspect.signature(builder).bind(**{k: v for k, v in cfg.items() if k not in GENERIC_KEYS})


def nearest_class_mean_accuracy(splits: DatasetSplits) -> float:
    train = splits.train.images.flatten(1).float()
    means = torch.stack([train[splits.train.labels == c].mean(0) for c in range(splits.num_classes)])
    predicted = torch.cdist(splits.test.images.flatten(1).float(), means).argmin(1)
    return (predicted == splits.test.labels).float().mean().item()


def test_synthetic_is_deterministic_and_learnable() -> None:
    splits = synthetic(num_train=500, num_test=200, num_classes=5, image_size=16, channels=3, seed=1)
    again = synthetic(num_train=500, num_test=200, num_classes=5, image_size=16, channels=3, seed=1)
    other = synthetic(num_train=500, num_test=200, num_classes=5, image_size=16, channels=3, seed=2)

    assert splits.train.images.dtype == torch.uint8 and splits.train.images.shape == (500, 3, 16, 16)
    assert splits.test.images.shape == (200, 3, 16, 16) and splits.pretrain is splits.train
    assert splits.train.labels.bincount().tolist() == [100] * 5
    assert torch.equal(splits.train.images, again.train.images) and torch.equal(splits.test.labels, again.test.labels)
    assert not torch.equal(splits.train.images, other.train.images)
    assert nearest_class_mean_accuracy(splits) > 0.6  # chance is 0.2
    pixels = splits.train.images.double().div(255)
    assert splits.mean == pytest.approx(pixels.mean((0, 2, 3)).tolist())
    assert splits.std == pytest.approx(pixels.std((0, 2, 3)).tolist(), rel=1e-3)


def test_load_dataset_builds_the_synthetic_config() -> None:
    splits = load_dataset(OmegaConf.load(CONF / "synthetic.yaml"))
    assert (splits.name, len(splits.train), len(splits.test)) == ("synthetic", 2048, 512)
    assert (splits.image_size, splits.channels) == (32, 3)


def test_limits_keep_the_same_subset_of_train_and_test() -> None:
    cfg = dataset_config("synthetic", num_train=300, num_test=100, image_size=8, limit_train=50, limit_test=20)
    full = load_dataset(dataset_config("synthetic", num_train=300, num_test=100, image_size=8))
    limited, again = load_dataset(cfg), load_dataset(cfg)

    assert (len(limited.train), len(limited.test)) == (50, 20) and limited.pretrain is limited.train
    assert torch.equal(limited.train.images, again.train.images) and torch.equal(limited.test.labels, again.test.labels)
    for part, whole in ((limited.train, full.train), (limited.test, full.test)):  # each kept image is an original
        distances = torch.cdist(part.images.flatten(1).float(), whole.images.flatten(1).float())
        assert (distances.min(1).values == 0).all()
    assert not torch.equal(limited.train.images, full.train.images[:50])  # random, not the first 50


def test_mean_and_std_replace_the_datasets_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Any dataset can be normalised with given statistics (the KD tutorial's ImageNet mean/std on CIFAR-10): a
    builder without mean/std keys gets them replaced, a folder builder is given them and measures nothing."""
    cfg = dataset_config("synthetic", num_train=20, num_test=10, image_size=8)
    own = load_dataset(cfg)
    given = load_dataset({**cfg, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]})
    assert own.mean != (0.485, 0.456, 0.406)
    assert (given.mean, given.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert torch.equal(given.train.images, own.train.images)  # the images themselves are untouched

    write_image_folder(tmp_path / "train")
    monkeypatch.setattr(datasets, "channel_stats", lambda *a, **k: pytest.fail("measured despite given mean/std"))
    folder = dataset_config("imagefolder", train_dir=str(tmp_path / "train"), image_size=8, val_fraction=0.25,
                            num_workers=0, cache_dir=None, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    assert load_dataset(folder).std == (0.25, 0.25, 0.25)


@pytest.mark.parametrize(("mean", "std", "message"), [
    ([0.5, 0.5, 0.5], None, "must be given together"),
    ([0.5], [0.2], r"dataset.mean=\[0.5\] must be 3 number"),
    ([0.5, 0.5, 0.5], [0.2, 0.0, 0.2], "dataset.std=.* and above 0"),
    (["a", "b", "c"], [0.2, 0.2, 0.2], "dataset.mean=.* must be 3 number"),
])
def test_bad_mean_or_std_is_a_user_error(mean: object, std: object, message: str) -> None:
    with pytest.raises(SslrunError, match=message):
        load_dataset(dataset_config("synthetic", num_train=20, num_test=10, image_size=8, mean=mean, std=std))


def separate_pretrain() -> DatasetSplits:
    """Like STL-10: pretrain holds unlabeled images besides train."""
    train = ImageSet(torch.zeros(10, 1, 4, 4, dtype=torch.uint8), torch.arange(10))
    pretrain = ImageSet(torch.zeros(30, 1, 4, 4, dtype=torch.uint8), torch.full((30,), -1))
    return DatasetSplits("stl_like", pretrain, train, train, 10, (0.5,), (0.2,))


def test_limit_train_leaves_a_separate_pretrain_split_whole() -> None:
    splits = load_dataset({"_target_": f"{__name__}.separate_pretrain", "limit_train": 4, "limit_test": None})
    assert (len(splits.pretrain), len(splits.train), len(splits.test)) == (30, 4, 10)


@pytest.mark.parametrize("limit", [0, -5, "100", 2.5])
def test_bad_limit_is_a_user_error(limit: object) -> None:
    with pytest.raises(SslrunError, match="dataset.limit_test"):
        load_dataset(dataset_config("synthetic", num_train=20, num_test=10, limit_test=limit))


def test_missing_cifar_without_download_names_the_folder_and_the_offline_option(tmp_path: Path) -> None:
    with pytest.raises(SslrunError) as error:
        load_dataset(dataset_config("cifar10", root=str(tmp_path), download=False))
    message = str(error.value)
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "dataset.root=" in message and "dataset=fashion_mnist" in message
    assert "apt-get install dataset-fashion-mnist" in message


def test_failed_download_is_a_quick_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    timeouts = []

    def no_network(url: str, *args: object, **kwargs: object) -> None:
        timeouts.append(socket.getdefaulttimeout())
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(datasets, "download_and_extract_archive", no_network)
    before = socket.getdefaulttimeout()
    start = time.monotonic()
    with pytest.raises(SslrunError, match=r"CIFAR-100 was not found.*downloading https://www.cs.toronto.edu.*failed"):
        load_dataset(dataset_config("cifar100", root=str(tmp_path)))
    assert time.monotonic() - start < 5
    assert timeouts and timeouts[0] is not None and socket.getdefaulttimeout() == before


def test_fixed_size_dataset_rejects_other_image_size(tmp_path: Path) -> None:
    with pytest.raises(SslrunError, match="dataset.image_size=64"):
        load_dataset(dataset_config("cifar10", root=str(tmp_path), download=False, image_size=64))


def write_png(path: Path, pixels: torch.Tensor) -> None:
    """``pixels``: uint8 [H, W, 3]."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.numpy()).save(path)


def solid(color: tuple[int, int, int], height: int = 20, width: int = 20) -> torch.Tensor:
    return torch.tensor(color, dtype=torch.uint8).expand(height, width, 3).clone()


def write_image_folder(root: Path) -> None:
    """cat: 4 red images, dog: 6 blue images, of different sizes; green numbers them 0..9."""
    for i in range(4):
        write_png(root / "cat" / f"{i}.png", solid((255, i, 0), 20 + i, 30))
    for i in range(6):
        write_png(root / "dog" / "nested" / f"{i}.png", solid((0, 4 + i, 255), 40, 12 + i))


def held_out(splits: DatasetSplits) -> list[int]:
    return splits.test.images[:, 1, 0, 0].tolist()


def test_imagefolder_splits_off_a_stratified_seeded_validation_set(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "train")
    train_dir = str(tmp_path / "train")
    cfg = dataset_config("imagefolder", train_dir=train_dir, image_size=8, val_fraction=0.25, num_workers=0,
                         cache_dir=None)

    splits = load_dataset(cfg)

    assert splits.classes == ["cat", "dog"] and splits.num_classes == 2 and splits.pretrain is splits.train
    assert splits.train.images.dtype == torch.uint8 and splits.train.images.shape == (7, 3, 8, 8)
    assert splits.test.labels.tolist() == [0, 1, 1] and splits.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert (splits.train.images[0, 0] == 255).all() and (splits.train.images[-1, 2] == 255).all()
    assert sorted(held_out(splits) + splits.train.images[:, 1, 0, 0].tolist()) == list(range(10))
    assert (splits.mean[0], splits.mean[2]) == pytest.approx((3 / 7, 4 / 7))
    assert held_out(load_dataset(cfg)) == held_out(splits)
    other_seeds = [load_dataset({**cfg, "seed": seed}) for seed in range(1, 6)]
    assert any(held_out(s) != held_out(splits) for s in other_seeds)  # random, not a fixed slice
    assert all(s.test.labels.tolist() == [0, 1, 1] for s in other_seeds)


def test_imagefolder_resizes_the_shorter_side_then_crops_the_center(tmp_path: Path) -> None:
    # 16 x 32: left half red, right half blue. Resized to 8 x 16, the centered 8 x 8 crop is half and half.
    pixels = torch.cat([solid((255, 0, 0), 16, 16), solid((0, 0, 255), 16, 16)], dim=1)
    write_png(tmp_path / "train" / "a" / "wide.png", pixels)
    write_png(tmp_path / "val" / "a" / "wide.png", pixels)

    splits = imagefolder(str(tmp_path / "train"), val_dir=str(tmp_path / "val"), image_size=8, num_workers=2)

    image = splits.test.images[0]
    assert image.shape == (3, 8, 8)
    assert image[:, :, 0].tolist() == [[255] * 8, [0] * 8, [0] * 8]
    assert image[:, :, 7].tolist() == [[0] * 8, [0] * 8, [255] * 8]
    assert image[0, :, :3].float().mean() > 200 and image[2, :, 5:].float().mean() > 200


def test_imagefolder_grayscale_and_val_dir_with_the_train_classes(tmp_path: Path) -> None:
    write_png(tmp_path / "train" / "a" / "0.png", solid((200, 200, 200)))
    write_png(tmp_path / "train" / "b" / "0.png", solid((10, 10, 10)))
    write_png(tmp_path / "val" / "b" / "0.png", solid((10, 10, 10)))

    splits = imagefolder(str(tmp_path / "train"), str(tmp_path / "val"), image_size=4, channels=1, num_workers=0)

    assert splits.train.images.shape == (2, 1, 4, 4) and splits.test.images.shape == (1, 1, 4, 4)
    assert splits.test.labels.tolist() == [1] and (splits.test.images == 10).all()


def test_imagefolder_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(SslrunError, match="dataset.train_dir must be set"):
        load_dataset(dataset_config("imagefolder"))
    with pytest.raises(SslrunError, match="dataset.train_dir=.*is not a directory"):
        imagefolder(str(tmp_path / "absent"))
    write_png(tmp_path / "train" / "a" / "0.png", solid((1, 2, 3)))
    (tmp_path / "train" / "a" / "1.png").write_bytes(b"not a png")
    with pytest.raises(SslrunError, match=r"could not be decoded: .*1\.png: UnidentifiedImageError"):
        imagefolder(str(tmp_path / "train"), num_workers=0)
    write_png(tmp_path / "val" / "zebra" / "0.png", solid((1, 2, 3)))
    (tmp_path / "train" / "a" / "1.png").unlink()
    with pytest.raises(SslrunError, match="class folders that the train folder lacks: zebra"):
        imagefolder(str(tmp_path / "train"), val_dir=str(tmp_path / "val"), num_workers=0)


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_from_debian() -> None:
    splits = load_dataset(OmegaConf.load(CONF / "fashion_mnist.yaml"))
    assert (len(splits.train), len(splits.test)) == (60000, 10000)
    assert splits.train.images.shape[1:] == (1, 28, 28) and splits.train.images.dtype == torch.uint8
    assert splits.train.labels.bincount().tolist() == [6000] * 10
    assert splits.train.images.double().mean().item() / 255 == pytest.approx(0.2860, abs=1e-3)
