"""One image file -> uint8 ``[C, S, S]`` pixels that mean what the file means, for every mode Pillow reads.

The in-memory and the streaming image-folder paths both decode through :func:`decode_file`, so the two
give the same pixels. JPEGs go through ``torchvision.io.decode_jpeg`` (libjpeg-turbo: 3-4x faster than
Pillow on small files, the same pixels, CMYK and EXIF orientation included); every other file through
Pillow, with each mode mapped to 8 bits by what its values mean instead of Pillow's ``convert``, which
clips 16-bit grey to 255 (a folder of 16-bit PNGs became white images):

===============================  ===========================================================================
mode                             becomes
===============================  ===========================================================================
``L``, ``RGB``                   as stored
``1``                            0 / 255
``I;16``, ``I;16B``/``L``/``N``  ``round(v * 255 / 65535)``: 16-bit grey scaled, not clipped
``I`` (32-bit integer)           the same, when every value is in [0, 65535]; otherwise refused
``F`` (32-bit float)             ``round(v * 255)`` when every value is in [0, 1]; otherwise refused
``LA``, ``RGBA``, ``PA``, ``P``  composited over white (:data:`BACKGROUND`), as a browser shows them
with transparency
``P`` (palette)                  the palette's colours
``CMYK``                         RGB by Pillow's (and libjpeg's) formula ``(255 - C)(255 - K) / 255``;
                                 an embedded ICC profile is not applied
``YCbCr``, ``HSV``, ``RGBX``     RGB
anything else (``LAB``, ...)     refused, naming the mode
===============================  ===========================================================================

EXIF orientation is applied first (``ImageOps.exif_transpose``; ``apply_exif_orientation`` for JPEGs), so a
phone photo stored sideways is seen upright. 16-bit RGB(A) PNGs are read by Pillow as 8-bit RGB(A) (the high
byte), which keeps their meaning. Colour images become grey (``channels=1``) by ITU-R 601 luma, grey images
become colour by repeating the channel. The image is then resized (shorter side to ``size``, bilinear with
antialiasing) and center-cropped, as torchvision's ``Resize(size)`` + ``CenterCrop(size)``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_jpeg

DECODE_VERSION = 1  # part of the decoded-image cache key: bump it when what a file decodes to changes
BACKGROUND = 255  # transparent pixels are shown on white, as browsers and image viewers show them
_JPEG_MAGIC = b"\xff\xd8\xff"
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
_AS_RGB = ("CMYK", "YCbCr", "HSV", "RGBX", "P")  # Pillow's conversion to RGB keeps what these mean


class UndecodableImage(ValueError):
    """A file that cannot be turned into pixels that keep its meaning; the message says why."""


def _scale_16bit(values: np.ndarray) -> np.ndarray:
    """Integers in [0, 65535] -> uint8 ``round(v * 255 / 65535)`` (exact integer rounding)."""
    return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _composite(pixels: np.ndarray) -> np.ndarray:
    """[H, W, C+1] uint8 with straight (not premultiplied) alpha last -> [H, W, C] over :data:`BACKGROUND`."""
    alpha = pixels[..., -1:].astype(np.float32) / 255
    colour = pixels[..., :-1].astype(np.float32)
    return np.rint(colour * alpha + BACKGROUND * (1 - alpha)).astype(np.uint8)


def pil_pixels(image: Image.Image) -> np.ndarray:
    """A Pillow image -> uint8 [H, W] (grey) or [H, W, 3] (colour) with the meaning of its mode (table above).

    Raises:
        UndecodableImage: a mode or value range with no faithful 8-bit form (``F`` outside [0, 1],
            ``I`` outside [0, 65535], ``LAB``...).
    """
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode in ("L", "RGB"):
        return np.asarray(image)
    if mode == "1":
        return np.asarray(image.convert("L"))
    if mode in _SIXTEEN_BIT or mode == "I":
        values = np.asarray(image)
        if mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
            raise UndecodableImage(
                f"32-bit integer pixels in [{values.min()}, {values.max()}] have no known 8-bit meaning; "
                "save it as an 8- or 16-bit image")
        return _scale_16bit(values)
    if mode == "F":
        values = np.asarray(image)
        if values.size and not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
            raise UndecodableImage(
                f"floating-point pixels in [{np.nanmin(values)}, {np.nanmax(values)}] are not in [0, 1]; "
                "save it as an 8- or 16-bit image, or scale it to [0, 1]")
        return np.rint(values * 255).astype(np.uint8)
    if mode in ("LA", "La"):
        return _composite(np.asarray(image.convert("LA")))[..., 0]
    if mode in ("RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in image.info):
        return _composite(np.asarray(image.convert("RGBA")))
    if mode in _AS_RGB:
        return np.asarray(image.convert("RGB"))
    raise UndecodableImage(f"Pillow mode {mode} has no supported conversion to grey or RGB; convert it to RGB")


def _to_channels(pixels: np.ndarray, channels: int) -> torch.Tensor:
    """uint8 [H, W] or [H, W, 3] -> [channels, H, W]: luma for colour -> grey, repeated grey for grey -> colour."""
    if pixels.ndim == 3 and channels == 1:
        pixels = np.asarray(Image.fromarray(pixels, "RGB").convert("L"))  # ITU-R 601, as libjpeg's GRAY
    x = torch.from_numpy(np.array(pixels))  # a writable copy: Pillow's arrays are read-only
    x = x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1)
    return x.expand(channels, -1, -1).contiguous() if x.shape[0] != channels else x


def _read(path: str | Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise UndecodableImage(f"it could not be read ({e})") from e


def _as_tensor(raw: bytes) -> torch.Tensor:
    """Encoded bytes as the uint8 [n] tensor torchvision's decoders take (a writable copy)."""
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def decode_pixels(path: str | Path, channels: int) -> torch.Tensor:
    """The file's pixels as uint8 [channels, H, W] at their stored size (channels 1 = grey, 3 = RGB).

    Raises:
        UndecodableImage: the file is not an image either decoder reads, or it has no faithful 8-bit form.
    """
    raw = _read(path)
    if raw.startswith(_JPEG_MAGIC):
        try:
            mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
            return decode_jpeg(_as_tensor(raw), mode=mode, apply_exif_orientation=True)
        except RuntimeError:
            pass  # a JPEG variant libjpeg-turbo refuses (e.g. arithmetic coding): Pillow may read it
    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
            return _to_channels(pil_pixels(image), channels)
    except UndecodableImage:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UndecodableImage(f"{type(e).__name__}: {e}") from e


def device_decodable(path: str | Path) -> torch.Tensor | None:
    """The file's bytes (uint8 [n]) when a batched decoder on the GPU (nvjpeg, ``decode_jpeg(list,
    device="cuda")``) gives the image :func:`decode_pixels` would: a JPEG of 1 or 3 components without an EXIF
    rotation (nvjpeg applies none, and converts CMYK its own way). None for every other file.

    Raises:
        UndecodableImage: the file cannot be read, or its header cannot be parsed.
    """
    raw = _read(path)
    if not raw.startswith(_JPEG_MAGIC):
        return None
    try:
        with Image.open(io.BytesIO(raw)) as image:  # parses the header only
            plain = image.mode in ("L", "RGB") and image.getexif().get(0x0112, 1) == 1
    except (OSError, SyntaxError) as e:
        raise UndecodableImage(f"{type(e).__name__}: {e}") from e
    return _as_tensor(raw) if plain else None


def resize_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [C, H, W] (or [N, C, H, W]) -> [..., size, size]: the shorter side resized to ``size``
    (bilinear, antialiased; the longer side truncated as torchvision's ``Resize(size)``), then center-cropped."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    if min(h, w) != size:
        short, long = (h, w) if h <= w else (w, h)
        long = int(size * long / short)
        x = TF.resize(x, [size, long] if h <= w else [long, size], antialias=True)
    return TF.center_crop(x, [size, size])


def decode_file(path: str | Path, channels: int, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """``path`` decoded (:func:`decode_pixels`) and fitted to uint8 [channels, size, size]; also the
    stored (height, width), so that callers can tell the user about upscaled images."""
    x = decode_pixels(path, channels)
    return resize_center_crop(x, size), (x.shape[-2], x.shape[-1])
