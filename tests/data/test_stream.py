"""dataset.storage=stream against the in-memory path on a small folder: the same images, the same batches
(indices and pixels) for a seed, rank shards that partition each batch, and the same kNN (issue 9)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sslrun.data.batches import TensorBatches, make_batches
from sslrun.data.datasets import imagefolder, load_dataset
from sslrun.data.decode import device_decodable
from sslrun.data.stream import ImageFiles, StreamBatches
from sslrun.errors import SslrunError
from sslrun.eval.features import extract_features
from sslrun.eval.knn import knn_predict, topk_accuracy

COLOURS = [(220, 40, 40), (40, 200, 60), (50, 60, 210)]
SIZE = 8


def write_split(root: Path, per_class: int, seed: int) -> None:
    """Three colour classes with pixel noise, JPEG and PNG, of different sizes (resized + cropped to SIZE)."""
    rng = np.random.default_rng(seed)
    for c, colour in enumerate(COLOURS):
        for i in range(per_class):
            h, w = 8 + 2 * (i % 3), 8 + 3 * (i % 2)
            pixels = np.clip(np.array(colour) + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
            path = root / f"class{c}" / f"{i}.{'jpg' if i % 2 else 'png'}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    write_split(root / "train", 8, 0)
    write_split(root / "val", 4, 1)
    return root


def both(folder: Path, **kwargs: object):
    args = dict(train_dir=str(folder / "train"), val_dir=str(folder / "val"), image_size=SIZE, num_workers=0,
                cache_dir=None, **kwargs)
    return imagefolder(storage="memory", **args), imagefolder(storage="stream", **args)


def test_streamed_splits_hold_files_that_decode_to_the_in_memory_images(folder: Path) -> None:
    memory, stream = both(folder)
    assert isinstance(stream.train.images, ImageFiles) and isinstance(memory.train.images, torch.Tensor)
    for m, s in ((memory.train, stream.train), (memory.test, stream.test)):
        assert s.images.shape == m.images.shape and s.images.dtype == torch.uint8 and len(s) == len(m)
        assert torch.equal(s.images.to("cpu"), m.images) and torch.equal(s.labels, m.labels)
    assert stream.mean == memory.mean and stream.std == memory.std and stream.classes == memory.classes
    index = torch.tensor([5, 0, 17])
    subset = stream.train.subset(index)
    assert isinstance(subset.images, ImageFiles) and len(subset) == 3  # a subset is not decoded
    assert torch.equal(subset.images.to("cpu"), memory.train.images[index])
    assert torch.equal(stream.train.images[3], memory.train.images[3])
    assert torch.equal(stream.train.images[index.view(1, 3)], memory.train.images[index.view(1, 3)])
    assert torch.equal(stream.train.images[4:9].to("cpu"), memory.train.images[4:9])


def batches(source, epoch: int, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(source.epoch(epoch, start))


def test_stream_batches_equal_tensor_batches_for_a_seed(folder: Path) -> None:
    memory, stream = both(folder)
    cfg = {"num_workers": 1, "prefetch": 2, "device_decode": False}  # one real worker process
    cpu = torch.device("cpu")
    tensor_batches = make_batches(memory.pretrain, cfg, 5, cpu, seed=3)
    stream_batches = make_batches(stream.pretrain, cfg, 5, cpu, seed=3)
    assert isinstance(tensor_batches, TensorBatches) and isinstance(stream_batches, StreamBatches)
    assert len(stream_batches) == len(tensor_batches) == 24 // 5
    next(iter(stream_batches.epoch(0)))  # an epoch left after one batch (a time budget) must not disturb the next
    for epoch, start in ((0, 0), (1, 0), (1, 2)):
        expected, got = batches(tensor_batches, epoch, start), batches(stream_batches, epoch, start)
        assert len(got) == len(expected) == 4 - start
        for (x, i), (y, j) in zip(expected, got):
            assert y.dtype == torch.uint8 and y.shape == (5, 3, SIZE, SIZE) and y.device == cpu
            assert torch.equal(i, j) and torch.equal(x, y)
    assert not torch.equal(batches(tensor_batches, 0)[0][1], batches(tensor_batches, 1)[0][1])


@pytest.mark.parametrize("streamed", [False, True])
def test_ranks_take_disjoint_slices_that_cover_each_batch(folder: Path, streamed: bool) -> None:
    memory, stream = both(folder)
    split = stream.pretrain if streamed else memory.pretrain
    cfg, cpu = {"num_workers": 0, "prefetch": 2, "device_decode": False}, torch.device("cpu")
    whole = batches(make_batches(split, cfg, 6, cpu, seed=1), 2)
    shards = [batches(make_batches(split, cfg, 6, cpu, seed=1, rank=r, world_size=2), 2) for r in range(2)]
    for (x, i), (x0, i0), (x1, i1) in zip(whole, *shards):
        assert len(i0) == len(i1) == 3 and not set(i0.tolist()) & set(i1.tolist())
        assert torch.equal(torch.cat([i0, i1]), i) and torch.equal(torch.cat([x0, x1]), x)


def test_knn_is_the_same_on_streamed_and_in_memory_splits(folder: Path) -> None:
    memory, stream = both(folder)
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                   torch.nn.Flatten())
    accuracy = []
    for splits in (memory, stream):
        bank, queries = (extract_features(backbone, s.images, splits.mean, splits.std, torch.device("cpu"), 5)
                         for s in (splits.train, splits.test))
        scores = knn_predict(bank, splits.train.labels, queries, splits.num_classes, k=5, temperature=0.1)
        accuracy.append(topk_accuracy(scores, splits.test.labels, ks=(1,))[1])
    assert accuracy[0] == accuracy[1] > 0.6  # chance: 1/3


def test_a_file_that_fails_to_decode_mid_stream_stops_the_run_naming_it(tmp_path: Path) -> None:
    write_split(tmp_path, 2, 0)
    (tmp_path / "class1" / "bad.png").write_bytes(b"not a png")
    splits = imagefolder(str(tmp_path), val_fraction=0.4, image_size=SIZE, num_workers=0, storage="stream",
                         mean=[0.5] * 3, std=[0.5] * 3)  # given statistics: loading decodes nothing
    for device_decode in (False, True):
        source = make_batches(splits.pretrain, {"num_workers": 0, "prefetch": 2, "device_decode": device_decode},
                              len(splits.pretrain), torch.device("cpu"), seed=0)
        with pytest.raises(SslrunError, match=r"class1/bad.png could not be decoded \(UnidentifiedImageError"):
            batches(source, 0)


def test_decoding_on_the_device_gives_the_cpu_path_s_batches(folder: Path) -> None:
    """The batched device-decode path, run with device cpu (libjpeg where a GPU would use nvjpeg): JPEGs go to
    one batched decode_jpeg call and are resized there, PNGs are decoded by the workers; pixels equal."""
    memory, stream = both(folder)
    cpu = torch.device("cpu")
    expected = batches(make_batches(memory.pretrain, {}, 6, cpu, seed=2), 0)
    source = make_batches(stream.pretrain, {"num_workers": 0, "prefetch": 2, "device_decode": True}, 6, cpu, seed=2)
    for (x, i), (y, j) in zip(expected, batches(source, 0), strict=True):
        assert torch.equal(i, j) and torch.equal(x, y)


def test_only_plain_jpegs_go_to_the_device_decoder(tmp_path: Path) -> None:
    rgb = Image.new("RGB", (4, 4), (10, 20, 30))
    rgb.save(tmp_path / "plain.jpg")
    rgb.save(tmp_path / "plain.png")
    Image.new("CMYK", (4, 4)).save(tmp_path / "cmyk.jpg")
    exif = rgb.getexif()
    exif[0x0112] = 6
    rgb.save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    exif[0x0112] = 1
    rgb.save(tmp_path / "upright.jpg", exif=exif.tobytes())
    assert {p.name for p in tmp_path.iterdir() if device_decodable(p) is not None} == {"plain.jpg", "upright.jpg"}
    assert torch.equal(device_decodable(tmp_path / "plain.jpg"), torch.frombuffer(
        bytearray((tmp_path / "plain.jpg").read_bytes()), dtype=torch.uint8))


def test_limits_keep_a_streamed_split_lazy(folder: Path) -> None:
    cfg = {"_target_": "sslrun.data.datasets.imagefolder", "name": "imagefolder", "train_dir": str(folder / "train"),
           "val_dir": str(folder / "val"), "image_size": SIZE, "num_workers": 0, "storage": "stream", "prefetch": 2,
           "cache_dir": None, "limit_train": 10, "limit_test": 5}
    splits = load_dataset(cfg)
    assert isinstance(splits.train.images, ImageFiles) and (len(splits.train), len(splits.test)) == (10, 5)
    assert splits.pretrain is splits.train
    with pytest.raises(SslrunError, match="dataset.storage=disk is not one of memory, stream"):
        load_dataset({**cfg, "storage": "disk"})
