"""Image-folder listing checks (issue 8: nothing silently counted or dropped), the ImageNet layouts, and the
decoded-image cache (read back only while every file is unchanged)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sslrun.data import folders
from sslrun.data.datasets import imagefolder, imagenet
from sslrun.errors import SslrunError


def png(path: Path, value: int, size: tuple[int, int] = (8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)
    return path


def two_classes(root: Path, suffix: str = "png") -> None:
    for i in range(2):
        png(root / "cat" / f"{i}.{suffix}", 10 + i)
        png(root / "dog" / f"{i}.{suffix}", 200 + i)


def load(root: Path, **kwargs: object):
    return imagefolder(str(root), str(root), image_size=8, num_workers=0, **{"cache_dir": None, **kwargs})


def test_an_empty_class_folder_is_an_error_naming_it(tmp_path: Path) -> None:
    two_classes(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SslrunError, match=r"no image files: empty/ \(empty\)"):
        load(tmp_path)
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(SslrunError, match=r"empty/ \(1 file\(s\), none an image, e.g. notes.txt\)"):
        load(tmp_path)


def test_skipped_files_are_warned_about_in_one_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    two_classes(tmp_path)
    (tmp_path / "cat" / "labels.csv").write_text("a,b")
    (tmp_path / "cat" / ".DS_Store").write_bytes(b"\0")  # hidden: skipped without a word
    png(tmp_path / "stray.png", 0)
    with caplog.at_level(logging.WARNING, logger="sslrun.data.folders"):
        splits = load(tmp_path)
    assert splits.classes == ["cat", "dog"] and splits.train.labels.tolist() == [0, 0, 1, 1]
    messages = [r.getMessage() for r in caplog.records]
    assert any("Skipped 1 file(s)" in m and "cat/labels.csv" in m for m in messages)
    assert any("Skipped 1 image(s) lying directly in" in m and "stray.png" in m for m in messages)
    assert not any(".DS_Store" in m for m in messages) and all("\n" not in m for m in messages)


def test_images_only_at_the_root_say_so(tmp_path: Path) -> None:
    png(tmp_path / "a.png", 0)
    (tmp_path / "sub").mkdir()
    with pytest.raises(SslrunError, match="1 images lie directly in .*: move them into class sub-folders"):
        load(tmp_path)


def test_upscaled_images_are_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    png(tmp_path / "a" / "small.png", 5, (4, 6))
    png(tmp_path / "a" / "big.png", 5, (16, 16))
    with caplog.at_level(logging.WARNING, logger="sslrun.data.folders"):
        imagefolder(str(tmp_path), str(tmp_path), image_size=8, num_workers=0, cache_dir=None)
    (message,) = {r.getMessage() for r in caplog.records}  # train and val: the same line
    assert "1 of 2 images under" in message and "smaller than dataset.image_size=8" in message
    assert "small.png (6x4)" in message


def test_a_validation_folder_may_lack_a_class(tmp_path: Path) -> None:
    two_classes(tmp_path / "train")
    png(tmp_path / "val" / "dog" / "0.png", 201)
    (tmp_path / "val" / "cat").mkdir()
    splits = imagefolder(str(tmp_path / "train"), str(tmp_path / "val"), image_size=8, num_workers=0, cache_dir=None)
    assert splits.num_classes == 2 and splits.test.labels.tolist() == [1]


def fake_imagenet(root: Path) -> None:
    for split in ("train", "val"):
        for k, wnid in enumerate(("n01", "n02", "n03")):
            png(root / split / wnid / f"{split}_{k}.JPEG", 50 * k)


def test_imagenet_layout_and_a_class_subset(tmp_path: Path) -> None:
    with pytest.raises(SslrunError, match=r"train and .*val missing.*valprep"):
        imagenet(str(tmp_path))
    fake_imagenet(tmp_path)
    splits = imagenet(str(tmp_path), image_size=8, classes=["n03", "n01"], num_workers=0, storage="memory",
                      mean=[0.5] * 3, std=[0.25] * 3)
    assert splits.classes == ["n01", "n03"] and splits.num_classes == 2  # labels follow the sorted wnids
    assert splits.train.images[:, 0, 0, 0].tolist() == [0, 100] and splits.test.labels.tolist() == [0, 1]
    assert splits.mean == (0.5,) * 3
    with pytest.raises(SslrunError, match="lacks the class folder.*n09"):
        imagenet(str(tmp_path), image_size=8, classes=["n01", "n09"], num_workers=0)


def test_the_cache_is_read_back_only_while_every_file_is_unchanged(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    data, cache = tmp_path / "data", tmp_path / "cache"
    two_classes(data, "ppm")  # uncompressed: a rewrite with other pixels keeps the file's size
    first = imagefolder(str(data), val_fraction=0.5, image_size=8, num_workers=0, cache_dir=str(cache))
    assert len(list(cache.glob("*.npy"))) == 1 and not list(cache.glob(".*tmp"))
    decoded = folders.decode_into_memory

    def fail(*args: object) -> None:
        raise AssertionError("decoded although the cache holds this folder")

    monkeypatch.setattr(folders, "decode_into_memory", fail)
    again = imagefolder(str(data), val_fraction=0.5, image_size=8, num_workers=0, cache_dir=str(cache))
    assert torch.equal(again.train.images, first.train.images) and torch.equal(again.test.images, first.test.images)
    # Rewrite one file with the same size and modification time: the key still changes (status-change time).
    path = data / "dog" / "1.ppm"
    st = path.stat()
    Image.new("RGB", (8, 8), (77, 77, 77)).save(path)
    assert path.stat().st_size == st.st_size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(AssertionError, match="decoded although"):
        imagefolder(str(data), val_fraction=0.5, image_size=8, num_workers=0, cache_dir=str(cache))
    monkeypatch.setattr(folders, "decode_into_memory", decoded)
    fresh = imagefolder(str(data), val_fraction=0.5, image_size=8, num_workers=0, cache_dir=str(cache))
    values = torch.cat([fresh.train.images, fresh.test.images])[:, 0, 0, 0].tolist()
    assert 77 in values and 201 not in values
    assert len(list(cache.glob("*.npy"))) == 1  # the stale cache was removed when the fresh one was written


def test_an_unwritable_or_corrupt_cache_costs_a_warning_not_the_run(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    two_classes(tmp_path / "data")
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING, logger="sslrun.data.folders"):
        splits = imagefolder(str(tmp_path / "data"), val_fraction=0.5, image_size=8, num_workers=0,
                             cache_dir=str(blocker / "cache"))
    assert len(splits.train) == 2 and "Could not write the decoded-image cache" in caplog.text
    cache = tmp_path / "cache"
    imagefolder(str(tmp_path / "data"), val_fraction=0.5, image_size=8, num_workers=0, cache_dir=str(cache))
    (npy,) = cache.glob("*.npy")
    np.save(npy, np.zeros((1, 2), np.uint8))  # wrong shape: ignored and decoded again
    again = imagefolder(str(tmp_path / "data"), val_fraction=0.5, image_size=8, num_workers=0, cache_dir=str(cache))
    assert again.train.images.float().mean() > 0
