"""Image-caption pairs (``dataset=imagetext``) for CLIP: a CSV or JSONL listing read into the uint8 store.

The listing follows open_clip's layout (``training/data.py``, ``CsvDataset``): one row per image with the image
path in a ``filepath`` column and its caption in ``title``, tab-separated by default there; here the column
names, the separator and JSON Lines keys are ``dataset.*`` keys. An optional ``label`` column (a class name per
image) gives the kNN and linear probes, and zero-shot classification, their classes.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from sslrun.data.datasets import channel_stats, stratified_split
from sslrun.data.folders import FolderListing, decode_into_memory
from sslrun.data.image_set import DatasetSplits, ImageSet
from sslrun.errors import SslrunError

FORMATS = ("auto", "csv", "jsonl")


@dataclass
class CaptionedImageSet(ImageSet):
    """An ``ImageSet`` whose image ``i`` has the caption ``captions[i]``; subsets keep the pairs aligned."""

    captions: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.captions is None or len(self.captions) != len(self):
            raise ValueError(f"captions must be a list of {len(self)} strings")

    def to(self, device: torch.device | str) -> CaptionedImageSet:
        return CaptionedImageSet(self.images.to(device), self.labels.to(device), self.captions)

    def subset(self, index: torch.Tensor) -> CaptionedImageSet:
        base = super().subset(index)
        return CaptionedImageSet(base.images, base.labels, [self.captions[i] for i in index.tolist()])


@dataclass
class CaptionRows:
    """A listing's rows: image files (absolute), captions, and class names (None when it has no label column)."""

    files: list[Path]
    captions: list[str]
    labels: list[str] | None


def _rows_csv(path: Path, separator: str | None) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8") as f:
        header = f.readline()
        # null separator: a tab if the header holds one (open_clip's default), else a comma
        sep = separator if separator is not None else ("\t" if "\t" in header else ",")
        f.seek(0)
        reader = csv.DictReader(f, delimiter=sep)
        return list(reader.fieldnames or []), list(reader)


def _rows_jsonl(path: Path) -> tuple[list[str], list[dict]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SslrunError(f"{path}, line {number}, is not valid JSON ({e}): each line of a JSON Lines file "
                                  "must be one object such as {\"filepath\": \"a.jpg\", \"title\": \"a cat\"}.") from e
            if not isinstance(row, dict):
                raise SslrunError(f"{path}, line {number}, holds a {type(row).__name__}, not a JSON object.")
            rows.append(row)
    return sorted({k for row in rows for k in row}), rows


def read_pairs(path: Path, format: str, separator: str | None, image_key: str, caption_key: str,
               label_key: str | None, image_root: Path | None) -> CaptionRows:
    """Read the (image, caption[, label]) rows of a CSV/TSV or JSON Lines file.

    Args:
        format: ``csv``, ``jsonl``, or ``auto`` (``.jsonl``/``.json`` files are JSON Lines, others CSV).
        separator: the CSV field separator; None sniffs the header (a tab if it holds one, else a comma).
        image_key, caption_key: the columns (or JSON keys) of the image path and the caption.
        label_key: the column of the class name; a file without it is unlabeled.
        image_root: relative image paths are taken from here; None = the listing file's folder.

    Raises:
        SslrunError: a missing file, an unknown format, a missing column, a row without an image path or label.
    """
    if not path.is_file():
        raise SslrunError(f"The image-caption listing {path} does not exist: set dataset.train_file (and "
                          "dataset.test_file) to a CSV or JSON Lines file of image paths and captions.")
    if format not in FORMATS:
        raise SslrunError(f"dataset.format={format!r} is not a valid choice; use one of: {', '.join(FORMATS)}.")
    jsonl = format == "jsonl" or (format == "auto" and path.suffix.lower() in (".jsonl", ".json"))
    try:
        keys, rows = _rows_jsonl(path) if jsonl else _rows_csv(path, separator)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SslrunError(f"{path} could not be read ({type(e).__name__}: {e}): it must be a UTF-8 "
                          f"{'JSON Lines' if jsonl else 'CSV'} file.") from e
    missing = [k for k in (image_key, caption_key) if k not in keys]
    if missing:
        which = "keys" if jsonl else "columns"
        raise SslrunError(f"{path} has no {' or '.join(map(repr, missing))} {which} (it has: "
                          f"{', '.join(keys) or 'none'}): set dataset.image_key and dataset.caption_key to the {which} holding the image path and "
                          "the caption.")
    if not rows:
        raise SslrunError(f"{path} lists no images.")
    root = image_root if image_root is not None else path.parent
    files, captions, labels = [], [], []
    has_labels = label_key is not None and label_key in keys
    for number, row in enumerate(rows, 1):
        where = f"{path}, row {number}"
        if not row.get(image_key):
            raise SslrunError(f"{where} has no image path in {image_key!r}.")
        files.append((root / str(row[image_key])).expanduser())
        captions.append("" if row.get(caption_key) is None else str(row[caption_key]))
        if has_labels:
            if row.get(label_key) in (None, ""):
                raise SslrunError(f"{where} has no class in {label_key!r}: label every row, or none (then the "
                                  "kNN and linear probes are skipped).")
            labels.append(str(row[label_key]))
    return CaptionRows(files, captions, labels if has_labels else None)


def _class_order(names: set[str]) -> list[str]:
    """Class names sorted, numerically when all are integers ("2" before "10")."""
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def _decode(rows: CaptionRows, classes: list[str], listing: Path, channels: int, size: int,
            num_workers: int) -> CaptionedImageSet:
    if rows.labels is None:
        labels = torch.full((len(rows.files),), -1, dtype=torch.long)
    else:
        unknown = sorted(set(rows.labels) - set(classes))
        if unknown:
            raise SslrunError(f"{listing} has classes the train listing lacks: {', '.join(unknown[:5])}; the two "
                              "must use the same class names.")
        index = {c: i for i, c in enumerate(classes)}
        labels = torch.tensor([index[c] for c in rows.labels], dtype=torch.long)
    decoded = decode_into_memory(FolderListing(listing.parent, rows.files, labels, classes), channels, size,
                                 num_workers)
    return CaptionedImageSet(decoded.images, decoded.labels, rows.captions)


def imagetext(train_file: str, test_file: str | None, image_root: str | None, format: str, separator: str | None,
              image_key: str, caption_key: str, label_key: str | None, image_size: int, channels: int,
              val_fraction: float, num_workers: int, seed: int) -> DatasetSplits:
    """Image-caption pairs from ``train_file`` (and ``test_file``), decoded, resized (shorter side) and
    center-cropped to ``image_size``; the defaults are in conf/dataset/imagetext.yaml.

    Without ``test_file`` a ``val_fraction`` of the pairs (stratified by class when labelled, chosen by ``seed``)
    is the test split. With a label column, ``classes`` are the train listing's class names (sorted) and the
    labels index them; without one, every label is -1 and ``classes`` is empty.

    Returns:
        ``DatasetSplits`` whose sets are ``CaptionedImageSet``s (``pretrain`` is ``train``).
    """
    if channels not in (1, 3):
        raise SslrunError(f"dataset.channels={channels} is not supported for image-text data: use 3 (RGB) or 1.")
    root = Path(image_root).expanduser() if image_root is not None else None
    listings = [Path(train_file).expanduser()] + ([Path(test_file).expanduser()] if test_file is not None else [])
    parsed = [read_pairs(p, format, separator, image_key, caption_key, label_key, root) for p in listings]
    classes = _class_order(set(parsed[0].labels)) if parsed[0].labels is not None else []
    if len(parsed) == 2 and (parsed[0].labels is None) != (parsed[1].labels is None):
        raise SslrunError(f"Only one of {listings[0]} and {listings[1]} has the label column {label_key!r}: "
                          "label both listings or neither.")
    train = _decode(parsed[0], classes, listings[0], channels, image_size, num_workers)
    if len(parsed) == 2:
        test = _decode(parsed[1], classes, listings[1], channels, image_size, num_workers)
    else:
        if not 0 < val_fraction < 1:
            raise SslrunError(f"dataset.val_fraction={val_fraction} must be between 0 and 1 "
                              "(or set dataset.test_file).")
        keep, held_out = stratified_split(train.labels, val_fraction, seed)  # -1 everywhere: a plain random split
        if len(held_out) == 0 or len(keep) == 0:
            raise SslrunError(f"dataset.val_fraction={val_fraction} leaves an empty split of {len(train)} pairs: "
                              "change it or set dataset.test_file.")
        train, test = train.subset(keep), train.subset(held_out)
    mean, std = channel_stats(train.images)
    return DatasetSplits("imagetext", train, train, test, len(classes), mean, std, classes)
