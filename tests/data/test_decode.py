"""Decoding keeps what each file means: small real files of every Pillow mode, written with Pillow, decoded
and checked against the pixels they stand for (issue 8: 16-bit PNGs used to load as white images)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
from PIL import Image

from sslrun.data.datasets import imagefolder
from sslrun.data.decode import BACKGROUND, UndecodableImage, decode_file, decode_pixels, resize_center_crop

SIXTEEN = np.array([[0, 257 * 100], [65535, 40000]], dtype=np.uint16)
SIXTEEN_AS_8 = [[0, 100], [255, 156]]  # round(v * 255 / 65535); 40000 -> 155.6


def save(path: Path, image: Image.Image, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def grey(x: torch.Tensor) -> list:
    assert x.shape[0] == 1
    return x[0].tolist()


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    path = save(tmp_path / "a.png", Image.fromarray(SIXTEEN))
    assert Image.open(path).mode == "I;16"
    assert grey(decode_pixels(path, 1)) == SIXTEEN_AS_8
    assert decode_pixels(path, 3).tolist() == [SIXTEEN_AS_8] * 3


def png16(path: Path, pixels: np.ndarray, colour_type: int) -> Path:
    """A 16-bit PNG written byte by byte (Pillow cannot write 16-bit colour): colour type 2 = RGB, 6 = RGBA."""
    h, w = pixels.shape[:2]
    rows = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


def test_16bit_colour_pngs_keep_their_levels(tmp_path: Path) -> None:
    rgb = np.array([[[65535, 0x8080, 0x00FF], [0x4000, 0xC000, 0x2000]]], dtype=np.uint16)
    x = decode_pixels(png16(tmp_path / "rgb.png", rgb, 2), 3)
    assert (x.permute(1, 2, 0).int() - torch.from_numpy(rgb.astype(np.int64) / 257).round().int()).abs().max() <= 1
    rgba = np.array([[[65535, 0, 0, 0], [0, 0, 65535, 65535]]], dtype=np.uint16)  # transparent red, opaque blue
    x = decode_pixels(png16(tmp_path / "rgba.png", rgba, 6), 3)
    assert x[:, 0].T.tolist() == [[BACKGROUND] * 3, [0, 0, 255]]


def test_big_endian_16bit_and_32bit_integer_tiffs(tmp_path: Path) -> None:
    big = save(tmp_path / "b.tif", Image.fromarray(SIXTEEN.astype(">u2")))
    assert Image.open(big).mode == "I;16B"
    assert grey(decode_pixels(big, 1)) == SIXTEEN_AS_8
    wide = save(tmp_path / "i.tif", Image.fromarray(SIXTEEN.astype(np.int32)))
    assert Image.open(wide).mode == "I"
    assert grey(decode_pixels(wide, 1)) == SIXTEEN_AS_8
    negative = save(tmp_path / "n.tif", Image.fromarray(np.array([[-5, 70000]], dtype=np.int32)))
    with pytest.raises(UndecodableImage, match=r"32-bit integer pixels in \[-5, 70000\]"):
        decode_pixels(negative, 1)


def test_float_image_in_unit_range_is_scaled_and_others_refused(tmp_path: Path) -> None:
    unit = save(tmp_path / "f.tif", Image.fromarray(np.array([[0.0, 0.25], [0.5, 1.0]], dtype=np.float32)))
    assert Image.open(unit).mode == "F"
    assert grey(decode_pixels(unit, 1)) == [[0, 64], [128, 255]]  # rint(63.75), rint(127.5) (half to even)
    wide = save(tmp_path / "g.tif", Image.fromarray(np.array([[0.0, 200.0]], dtype=np.float32)))
    with pytest.raises(UndecodableImage, match=r"floating-point pixels in \[0.0, 200.0\] are not in \[0, 1\]"):
        decode_pixels(wide, 1)


def composite(colour: int, alpha: int) -> int:
    return round(colour * alpha / 255 + BACKGROUND * (1 - alpha / 255))


def test_transparency_is_composited_over_the_background(tmp_path: Path) -> None:
    rgba = np.array([[[255, 0, 0, 0], [255, 0, 0, 128], [0, 0, 255, 255]]], dtype=np.uint8)
    x = decode_pixels(save(tmp_path / "rgba.png", Image.fromarray(rgba, "RGBA")), 3)
    assert x[:, 0, 0].tolist() == [BACKGROUND] * 3  # fully transparent: the background, not the hidden red
    assert x[:, 0, 1].tolist() == [composite(255, 128), composite(0, 128), composite(0, 128)]
    assert x[:, 0, 2].tolist() == [0, 0, 255]
    la = np.array([[[0, 0], [100, 255]]], dtype=np.uint8)
    assert grey(decode_pixels(save(tmp_path / "la.png", Image.fromarray(la, "LA")), 1)) == [[BACKGROUND, 100]]


def test_palette_with_a_transparent_entry(tmp_path: Path) -> None:
    image = Image.fromarray(np.array([[0, 1, 2]], dtype=np.uint8), "P")
    image.putpalette([255, 0, 0, 0, 0, 255, 0, 200, 0])  # entry 0 red (transparent), 1 blue, 2 green
    path = save(tmp_path / "p.png", image, transparency=0)
    assert Image.open(path).mode == "P" and "transparency" in Image.open(path).info
    assert decode_pixels(path, 3)[:, 0].T.tolist() == [[BACKGROUND] * 3, [0, 0, 255], [0, 200, 0]]
    opaque = Image.fromarray(np.array([[1, 2]], dtype=np.uint8), "P")
    opaque.putpalette([255, 0, 0, 0, 0, 255, 0, 200, 0])
    assert decode_pixels(save(tmp_path / "q.gif", opaque), 3)[:, 0].T.tolist() == [[0, 0, 255], [0, 200, 0]]


@pytest.mark.parametrize("fmt", ["TIFF", "JPEG"])  # Pillow's path and torchvision's libjpeg path
def test_cmyk_becomes_rgb(tmp_path: Path, fmt: str) -> None:
    pixels = np.array([[[0, 255, 255, 0], [0, 0, 0, 255], [0, 0, 0, 0]]], dtype=np.uint8)  # red, black, white
    path = save(tmp_path / f"c.{fmt.lower()}", Image.fromarray(pixels, "CMYK"), format=fmt, quality=100)
    x = decode_pixels(path, 3).int()
    expected = torch.tensor([[255, 0, 0], [0, 0, 0], [255, 255, 255]]).T
    assert (x[:, 0] - expected).abs().max() <= (0 if fmt == "TIFF" else 3)  # JPEG is lossy


def test_one_bit_image_is_black_and_white(tmp_path: Path) -> None:
    path = save(tmp_path / "b.png", Image.fromarray(np.array([[True, False]])))
    assert Image.open(path).mode == "1"
    assert grey(decode_pixels(path, 1)) == [[255, 0]]


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_exif_orientation_is_applied(tmp_path: Path, suffix: str) -> None:
    # Stored 4 high x 8 wide, left half red, right half blue; orientation 6 = shown rotated 90 degrees clockwise.
    stored = np.zeros((4, 8, 3), np.uint8)
    stored[:, :4, 0] = 255
    stored[:, 4:, 2] = 255
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6
    path = save(tmp_path / f"o.{suffix}", image, exif=exif.tobytes(), quality=100, subsampling=0)
    shown = torch.from_numpy(np.rot90(stored, k=-1).copy()).permute(2, 0, 1)  # 8 high x 4 wide, red on top
    x = decode_pixels(path, 3)
    assert x.shape == (3, 8, 4)
    assert (x.int() - shown.int()).abs().max() <= (0 if suffix == "png" else 8)


def test_colour_to_grey_uses_luma_and_grey_to_colour_repeats(tmp_path: Path) -> None:
    colour = save(tmp_path / "c.png", Image.new("RGB", (2, 2), (200, 100, 50)))
    assert grey(decode_pixels(colour, 1)) == [[124, 124]] * 2  # 0.299*200 + 0.587*100 + 0.114*50 = 124.2
    gray = save(tmp_path / "g.png", Image.new("L", (2, 2), 77))
    assert (decode_pixels(gray, 3) == 77).all() and decode_pixels(gray, 3).shape == (3, 2, 2)


def test_unsupported_mode_and_truncated_file_are_refused(tmp_path: Path) -> None:
    lab = save(tmp_path / "l.tif", Image.new("LAB", (2, 2)))
    with pytest.raises(UndecodableImage, match="mode LAB"):
        decode_pixels(lab, 3)
    full = save(tmp_path / "t.jpg", Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)))
    (tmp_path / "cut.jpg").write_bytes(full.read_bytes()[:300])
    with pytest.raises(UndecodableImage, match="(?i)truncated"):
        decode_pixels(tmp_path / "cut.jpg", 3)


def test_decode_file_resizes_the_shorter_side_and_reports_the_stored_size(tmp_path: Path) -> None:
    path = save(tmp_path / "w.png", Image.new("RGB", (30, 10), (1, 2, 3)))
    x, stored = decode_file(path, 3, 5)
    assert x.shape == (3, 5, 5) and stored == (10, 30) and x[:, 0, 0].tolist() == [1, 2, 3]


def test_resize_center_crop_is_torchvisions_resize_then_center_crop() -> None:
    x = torch.randint(0, 256, (2, 3, 40, 61), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for size in (20, 33, 64):
        expected = T.Compose([T.Resize(size, antialias=True), T.CenterCrop(size)])(x)
        assert torch.equal(resize_center_crop(x, size), expected)
    assert torch.equal(resize_center_crop(x[..., :40], 40), x[..., :40])  # already square at the size: as is


def test_a_folder_of_16bit_pngs_keeps_its_contrast(tmp_path: Path) -> None:
    """The issue's case: before, every pixel above 255 became 255 and the classes were indistinguishable."""
    for name, level in (("dark", 10000), ("light", 50000)):
        for i in range(2):
            save(tmp_path / name / f"{i}.png", Image.fromarray(np.full((6, 6), level + i, np.uint16)))
    splits = imagefolder(str(tmp_path), str(tmp_path), image_size=6, channels=1, num_workers=0, cache_dir=None)
    assert splits.train.labels.tolist() == [0, 0, 1, 1]
    assert splits.train.images[:, 0, 0, 0].tolist() == [39, 39, 195, 195]  # 10000 * 255/65535 = 38.9
