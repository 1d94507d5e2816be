"""Image folders larger than memory (``dataset.storage=stream``): files are decoded when they are used.

:class:`ImageFiles` stands where an in-memory ``ImageSet`` holds its uint8 tensor: it has the tensor's
``shape``, ``dtype`` and ``len``; slicing and subsets stay lazy, and ``images[i:i + b].to(device)`` decodes
that batch on ``num_workers`` threads. So evaluation, the kNN monitor, k-means and the figures, which read
the images batch by batch, take a streamed split unchanged, holding one batch at a time.

:class:`StreamBatches` is ``TensorBatches`` for files: the same ``epoch_permutation``, rank slicing and
mid-epoch ``start``, so for one seed it yields the same dataset indices and, since both decode through
``decode.decode_file``, the same pixels as the in-memory path. Batches are decoded in DataLoader worker
processes, ``prefetch`` batches ahead per worker, into pinned memory on CUDA.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.io import ImageReadMode, decode_jpeg

from sslrun.data.batches import epoch_permutation, rank_batches
from sslrun.data.decode import UndecodableImage, decode_file, decode_pixels, device_decodable, resize_center_crop
from sslrun.data.folders import DecodedFiles
from sslrun.errors import SslrunError


def _undecodable(path: str, why: str) -> SslrunError:
    return SslrunError(f"The image file {path} could not be decoded ({why}); with dataset.storage=stream files are "
                       "first read when used, so this shows only now. Delete or replace it (or convert it to 8-bit "
                       "RGB or grey PNG/JPEG), then rerun: the run resumes from its last checkpoint.")


class ImageFiles:
    """The uint8 images [N, channels, size, size] of ``files``, decoded when they are read.

    Indexing follows the tensor it stands for, but stays lazy where a tensor would make a copy of many rows:
    an int gives the decoded image [C, size, size]; a slice, a 1-D index tensor / list or a boolean mask gives
    the ``ImageFiles`` of those files (a shard, a subset: nothing decoded); an index tensor of 2 or more
    dimensions (a few retrieval neighbours) gives decoded images [*index.shape, C, size, size].
    ``.to(device)`` (or ``decode()``) decodes every file, on ``num_workers`` threads, into one tensor: what a
    consumer does with one batch, ``images[i:i + b].to(device)``.

    Args:
        files: the image files, in dataset order.
        channels: 1 (grey) or 3 (RGB).
        size: the stored side in px; each file is resized (shorter side) and center-cropped to it.
        num_workers: threads that decode a batch.
    """

    dtype = torch.uint8
    device = torch.device("cpu")

    def __init__(self, files: Sequence[str], channels: int, size: int, num_workers: int,
                 pool: ThreadPoolExecutor | None = None) -> None:
        self.files, self.channels, self.size, self.num_workers = list(files), channels, size, num_workers
        self._pool = pool or ThreadPoolExecutor(max(1, num_workers), thread_name_prefix="sslrun-decode")

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.files), self.channels, self.size, self.size))

    def dim(self) -> int:
        return 4

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return f"ImageFiles({len(self)} files, {self.channels}x{self.size}x{self.size})"

    def _decode_one(self, path: str) -> torch.Tensor:
        try:
            return decode_file(path, self.channels, self.size)[0]
        except UndecodableImage as e:
            raise _undecodable(path, str(e)) from e

    def __getitem__(self, index: int | slice | torch.Tensor | Sequence[int]) -> torch.Tensor | ImageFiles:
        if isinstance(index, int):
            return self._decode_one(self.files[index])
        if isinstance(index, slice):
            return ImageFiles(self.files[index], self.channels, self.size, self.num_workers, self._pool)
        index = torch.as_tensor(index)
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        view = ImageFiles([self.files[i] for i in index.flatten().tolist()], self.channels, self.size,
                          self.num_workers, self._pool)
        return view if index.dim() == 1 else view.decode().view(*index.shape, *self.shape[1:])

    def decode(self) -> torch.Tensor:
        """Every file decoded, in order: uint8 [N, channels, size, size]."""
        if not self.files:
            return torch.empty(self.shape, dtype=torch.uint8)
        return torch.stack(list(self._pool.map(self._decode_one, self.files)))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> torch.Tensor:
        """The decoded images on ``device`` (see ``decode``)."""
        return self.decode().to(device, non_blocking=non_blocking)


def batches_of(images: torch.Tensor | ImageFiles, batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive uint8 batches ``images[i:i + batch_size]`` of a tensor, or decoded from ``ImageFiles``, where
    the next batch is decoded while the caller uses this one (evaluation's feature extraction)."""
    starts = range(0, len(images), batch_size)
    if isinstance(images, torch.Tensor):
        yield from (images[i:i + batch_size] for i in starts)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="sslrun-ahead") as ahead:
        pending = None
        for i in starts:
            batch = pending.result() if pending else images[i:i + batch_size].decode()
            following = images[i + batch_size:i + 2 * batch_size]
            pending = ahead.submit(following.decode) if len(following) else None
            yield batch


class _EpochBatches(Sampler[list[int]]):
    """The batch sampler of a persistent DataLoader: each epoch sets the index lists it yields."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _DeviceDecodeItems(Dataset):
    """Item ``i`` for decoding on the device: (JPEG bytes that nvjpeg decodes like the CPU path, or None;
    else the CPU-decoded image [C, size, size], or None; the error message, or "")."""

    def __init__(self, images: ImageFiles) -> None:
        self.files, self.channels, self.size = images.files, images.channels, images.size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, torch.Tensor | None, str]:
        try:
            data = device_decodable(self.files[i])
            if data is not None:
                return data, None, ""
            return None, decode_file(self.files[i], self.channels, self.size)[0], ""
        except UndecodableImage as e:
            return None, None, str(e)


def _as_list(items: list) -> list:
    return items


class StreamBatches:
    """Shuffled batches (last partial batch dropped) decoded from ``images``' files, with ``TensorBatches``'
    interface and order: ``epoch(epoch, start)`` yields this rank's (uint8 [batch_size // world_size, C, S, S]
    on ``device``, dataset indices [b] on ``device``).

    Args:
        images: the streamed split's files.
        batch_size: the global batch; rank ``r`` of ``world_size`` takes rows ``[r*b, (r+1)*b)`` of each.
        device: where batches are delivered (copied from pinned memory, asynchronously, on CUDA).
        seed: with the epoch, fixes the permutation (``epoch_permutation``).
        num_workers: decoding processes (0: decode in this process).
        prefetch: batches each worker decodes ahead.
        device_decode: the workers only read the files, and JPEGs are decoded on ``device`` in one batched
            call (nvjpeg on CUDA: ``torchvision.io.decode_jpeg(list, device="cuda")``) and resized there;
            other files (PNG, CMYK, EXIF-rotated) are still decoded by the workers. It pays where the CPU
            cores per GPU cannot decode as fast as the GPU trains (a 500x375 JPEG took 1.45 CPU ms to decode
            and resize to 224 px: ~700 per second per core). Pixels may differ from the CPU path by the
            decoders' rounding. Only
            the CPU form of this path (``device`` cpu: the same code, libjpeg instead of nvjpeg) is tested
            here; the CUDA form has not run on a GPU yet.
    """

    def __init__(self, images: ImageFiles, batch_size: int, device: torch.device, seed: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 2, prefetch: int = 2, device_decode: bool = False) -> None:
        if batch_size % world_size:
            raise ValueError(f"global batch {batch_size} does not split over {world_size} processes")
        self.images, self.batch_size, self.device, self.seed = images, batch_size, device, seed
        self.rank, self.world_size = rank, world_size
        self.device_decode = device_decode
        self._sampler = _EpochBatches()
        workers = num_workers > 0
        items = (_DeviceDecodeItems(images) if device_decode
                 else DecodedFiles(images.files, images.channels, images.size))
        self._loader = DataLoader(items, batch_sampler=self._sampler, num_workers=num_workers,
                                  collate_fn=_as_list if device_decode else None,
                                  pin_memory=device.type == "cuda" and not device_decode,
                                  persistent_workers=workers, prefetch_factor=prefetch if workers else None)

    def __len__(self) -> int:
        return len(self.images) // self.batch_size

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's batches of ``epoch``, from batch ``start`` on (a resume mid-epoch skips the rest)."""
        perm = epoch_permutation(len(self.images), self.seed, epoch)
        index = list(rank_batches(perm, self.batch_size, self.rank, self.world_size, start))
        self._sampler.batches = [idx.tolist() for idx in index]
        pin = self.device.type == "cuda"
        for idx, loaded in zip(index, self._loader):
            if self.device_decode:
                batch = self._decode_on_device(loaded, idx)
            else:
                batch, errors, _, _ = loaded
                bad = next((i for i, e in enumerate(errors) if e), None)
                if bad is not None:
                    raise _undecodable(self.images.files[idx[bad]], errors[bad])
            yield batch.to(self.device, non_blocking=pin), idx.to(self.device, non_blocking=pin)

    def _decode_on_device(self, items: list[tuple], idx: torch.Tensor) -> torch.Tensor:
        """One batch from ``_DeviceDecodeItems``: the JPEG bytes decoded in one batched call on the device,
        each resized and center-cropped there; the images the workers decoded copied in."""
        c, s = self.images.channels, self.images.size
        out = torch.empty((len(items), c, s, s), dtype=torch.uint8, device=self.device)
        raw = []
        for k, (data, image, error) in enumerate(items):
            if error:
                raise _undecodable(self.images.files[idx[k]], error)
            if data is None:
                out[k] = image.to(self.device)
            else:
                raw.append((k, data))
        if raw:
            mode = ImageReadMode.GRAY if c == 1 else ImageReadMode.RGB
            try:
                decoded = decode_jpeg([data for _, data in raw], mode=mode, device=self.device)
            except RuntimeError:  # one file the batched decoder refuses fails them all: decode each on the CPU
                decoded = [self._decode_pixels(self.images.files[idx[k]]).to(self.device) for k, _ in raw]
            for (k, _), x in zip(raw, decoded):
                out[k] = resize_center_crop(x, s)
        return out

    def _decode_pixels(self, path: str) -> torch.Tensor:
        try:
            return decode_pixels(path, self.images.channels)
        except UndecodableImage as e:
            raise _undecodable(path, str(e)) from e
