"""Image folders (``root/<class>/**/<image>``): the checked listing of files and labels, and decoding it
into one uint8 tensor in parallel worker processes, with an optional cache of the decoded tensor.

Every file is decoded by :func:`sslrun.data.decode.decode_file`; the streaming path (``stream.py``) reads
the same listing, so the two storages give the same pixels and labels.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
from torch.utils.data import DataLoader, Dataset

from sslrun.data.decode import DECODE_VERSION, UndecodableImage, decode_file
from sslrun.data.image_set import ImageSet
from sslrun.errors import SslrunError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff", ".webp")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FolderListing:
    """The image files of a folder and their labels (indices into ``classes``), in a fixed order."""

    root: Path
    files: list[str]  # paths as strings: a million Path objects cost seconds to build and sort
    labels: torch.Tensor  # [N] int64
    classes: list[str]


def _example(paths: list[str], root: Path) -> str:
    shown = ", ".join(os.path.relpath(p, root) for p in paths[:3])
    return shown + (", ..." if len(paths) > 3 else "")


def _walk(folder: Path) -> tuple[list[str], list[str]]:
    """(image files, other files) under ``folder`` at any depth, sorted, hidden ones left out. os.walk over
    strings: pathlib's rglob and Path sorting took 3 s for CIFAR-10's 50,000 files, this 0.3 s."""
    images, other = [], []
    for top, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            if not name.startswith("."):
                (images if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS else other).append(
                    os.path.join(top, name))
    images.sort()
    other.sort()
    return images, other


def list_image_folder(root: Path, classes: list[str] | None = None, *, select: bool = False,
                      require_images: bool = True) -> FolderListing:
    """List ``root/<class>/**/<image>``: files sorted per class, classes in the order of ``classes``.

    Args:
        root: the folder holding one sub-folder per class.
        classes: the class names; None = the sorted sub-folder names. A validation folder passes the train
            folder's classes, so that the same name gets the same label.
        select: read only the sub-folders named in ``classes`` and ignore the others (ImageNet-100 out of an
            ImageNet folder); without it a sub-folder outside ``classes`` is an error.
        require_images: every class must have at least one image (a train folder); a validation folder may
            lack classes.

    Raises:
        SslrunError: no images; a class folder with no image files (it would be a class index that no image
            carries); a selected class folder missing; a folder outside ``classes``.

    Files without an image extension (``IMAGE_EXTENSIONS``) and images directly in ``root`` are skipped
    with a one-line warning; hidden files (``.DS_Store``) silently.
    """
    root = root.absolute()  # absolute file paths: the cache key hashes them as they are
    folders = {d.name: d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")}
    if classes is None:
        classes = sorted(folders)
    if select:
        missing = [c for c in classes if c not in folders]
        if missing:
            raise SslrunError(f"{root} lacks the class folder(s) {', '.join(missing[:5])}"
                              f"{' ...' if len(missing) > 5 else ''} that the dataset's class list names: check "
                              "dataset.root (the folder holding train/ and val/) and that the copy is complete.")
        folders = {c: folders[c] for c in classes}
    unknown = sorted(set(folders) - set(classes))
    if unknown:
        raise SslrunError(f"{root} has class folders that the train folder lacks: {', '.join(unknown)}; "
                          "the two must use the same class names.")
    files: list[str] = []
    labels: list[int] = []
    empty: list[str] = []
    skipped: list[str] = []
    for label, name in enumerate(classes):
        if name not in folders:
            continue
        found, other = _walk(folders[name])
        if not found:
            empty.append(f"{name}/" + (f" ({len(other)} file(s), none an image, e.g. {Path(other[0]).name})"
                                       if other else " (empty)"))
        skipped += other
        files += found
        labels += [label] * len(found)
    loose = sorted(str(p) for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        hint = f" ({len(loose)} images lie directly in {root}: move them into class sub-folders)" if loose else ""
        raise SslrunError(f"No images found in {root}{hint}: expected one sub-folder per class holding image "
                          f"files ({', '.join(IMAGE_EXTENSIONS)}), e.g. {root}/cat/0001.png.")
    if empty and require_images:
        raise SslrunError(
            f"{root} has class folder(s) with no image files: {'; '.join(empty[:5])}. Each sub-folder is a class, "
            "and a class no image carries would still count in the labels and the probes: remove the folder or "
            f"put its images in it (image extensions: {', '.join(IMAGE_EXTENSIONS)}).")
    if skipped:
        log.warning("Skipped %d file(s) under %s without an image extension, e.g. %s", len(skipped), root,
                    _example(sorted(skipped), root))
    if loose:
        log.warning("Skipped %d image(s) lying directly in %s, outside any class folder, e.g. %s", len(loose), root,
                    _example(loose, root))
    return FolderListing(root, files, torch.tensor(labels, dtype=torch.long), list(classes))


class DecodedFiles(Dataset):
    """Item ``i``: (uint8 [channels, size, size], error message or "", stored height, stored width).

    A file that cannot be decoded gives zeros and its reason, reported by the caller from the main process
    (an exception raised in a loader worker arrives wrapped in a worker traceback)."""

    def __init__(self, files: list[str], channels: int, size: int) -> None:
        self.files, self.channels, self.size = files, channels, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, int, int]:
        try:
            x, (h, w) = decode_file(self.files[i], self.channels, self.size)
            return x, "", h, w
        except UndecodableImage as e:
            return torch.zeros(self.channels, self.size, self.size, dtype=torch.uint8), str(e), 0, 0


def check_decoded(files: list[str], root: Path, errors: list[str], heights: torch.Tensor, widths: torch.Tensor,
                  size: int) -> None:
    """Refuse undecodable files (naming them and why); warn in one line about images upscaled to ``size``."""
    bad = [i for i, e in enumerate(errors) if e]
    if bad:
        shown = "; ".join(f"{files[i]}: {errors[i]}" for i in bad[:3])
        raise SslrunError(f"{len(bad)} image file(s) under {root} could not be decoded: {shown}"
                          f"{' ...' if len(bad) > 3 else ''}. Delete or replace them (or convert them to 8-bit "
                          "RGB or grey PNG/JPEG).")
    small = (torch.minimum(heights, widths) < size).nonzero().flatten().tolist()
    if small:
        i = small[0]
        log.warning("%d of %d images under %s are smaller than dataset.image_size=%d and were upscaled, e.g. %s "
                    "(%dx%d)", len(small), len(files), root, size, files[i], heights[i], widths[i])


def decode_into_memory(listing: FolderListing, channels: int, size: int, num_workers: int) -> ImageSet:
    """Decode every listed file into one uint8 [N, channels, size, size] tensor, in ``num_workers`` processes."""
    n = len(listing.files)
    images = torch.empty((n, channels, size, size), dtype=torch.uint8)
    heights, widths = torch.empty(n, dtype=torch.long), torch.empty(n, dtype=torch.long)
    errors: list[str] = []
    start = 0
    loader = DataLoader(DecodedFiles(listing.files, channels, size), batch_size=256, num_workers=num_workers)
    for batch, batch_errors, h, w in loader:
        stop = start + len(batch)
        images[start:stop], heights[start:stop], widths[start:stop] = batch, h, w
        errors += batch_errors
        start = stop
    check_decoded(listing.files, listing.root, errors, heights, widths, size)
    return ImageSet(images, listing.labels)


def cache_key(listing: FolderListing, channels: int, size: int) -> str:
    """A digest of everything the decoded tensor depends on: each file's absolute path, inode, size, modification
    and status-change times (ns; the status-change time moves on every write, and no tool can set it back, so a
    file rewritten with its old size and mtime still changes the key), the labels, the output shape and the
    decoders' versions."""
    digest = hashlib.sha256()
    digest.update(f"{DECODE_VERSION} {torchvision.__version__} {PIL.__version__} {channels} {size}\n".encode())
    digest.update(" ".join(listing.classes).encode())
    for path, label in zip(listing.files, listing.labels.tolist()):
        st = os.stat(path)
        digest.update(f"\n{path}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{label}".encode())
    return digest.hexdigest()[:32]


def read_image_folder(listing: FolderListing, channels: int, size: int, num_workers: int,
                      cache_dir: str | None) -> ImageSet:
    """The listing decoded into memory; with ``cache_dir``, the decoded tensor is read from / written to
    ``cache_dir/imagefolder-<folder>-<cache_key>.npy`` (written atomically, so a killed run never leaves a
    partial file). Writing it removes the folder's older caches at the same size, which can never be read again."""
    if cache_dir is None:
        return decode_into_memory(listing, channels, size, num_workers)
    folder = Path(cache_dir).expanduser()
    which = hashlib.sha256(f"{listing.root} {channels} {size}".encode()).hexdigest()[:12]
    path = folder / f"imagefolder-{which}-{cache_key(listing, channels, size)}.npy"
    if path.is_file():
        try:
            cached = np.load(path)
            if cached.shape == (len(listing.files), channels, size, size) and cached.dtype == np.uint8:
                return ImageSet(torch.from_numpy(cached), listing.labels)
        except (OSError, ValueError) as e:
            log.warning("Ignoring the unreadable cache file %s (%s); decoding again", path, e)
    decoded = decode_into_memory(listing, channels, size, num_workers)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.save(f, decoded.images.numpy())
        os.replace(tmp, path)
        for stale in folder.glob(f"imagefolder-{which}-*.npy"):
            if stale != path:
                stale.unlink(missing_ok=True)
        log.info("Cached the decoded images of %s in %s (%.0f MB; dataset.cache_dir=null turns this off)",
                 listing.root, path, path.stat().st_size / 1e6)
    except OSError as e:  # a read-only or full cache location costs speed next time, never this run
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        log.warning("Could not write the decoded-image cache %s (%s); set dataset.cache_dir to a writable "
                    "folder, or to null for no cache", path, e)
    return decoded
