import csv
import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from sslrun.data.datasets import load_dataset
from sslrun.data.imagetext import CaptionedImageSet
from sslrun.errors import SslrunError

CONF = Path(__file__).resolve().parents[2] / "conf" / "dataset" / "imagetext.yaml"
CLASSES = ["cat", "dog", "ship"]


def write_images(folder: Path, count: int, start: int = 0) -> list[tuple[str, int, str]]:
    """PNGs of one grey value each (10 * i), named by it; rows (relative path, grey value, class name)."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(start, start + count):
        value = 10 * i
        Image.fromarray(np.full((6, 6), value, dtype=np.uint8), "L").save(folder / "img" / f"{value}.png")
        rows.append((f"img/{value}.png", value, CLASSES[i % 3]))
    return rows


def write_csv(path: Path, rows, sep: str = ",", label: bool = True) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter=sep)
        w.writerow(["filepath", "title"] + (["label"] if label else []))
        for file, value, name in rows:
            w.writerow([file, f"grey {value}, a {name}"] + ([name] if label else []))


def load(**overrides):
    cfg = OmegaConf.merge(OmegaConf.load(CONF), {"image_size": 4, "channels": 1, "num_workers": 0, **overrides})
    return load_dataset(cfg)


def assert_pairs_aligned(images: CaptionedImageSet) -> None:
    assert isinstance(images, CaptionedImageSet)
    for i in range(len(images)):
        assert images.captions[i].startswith(f"grey {int(images.images[i, 0, 0, 0])},")


def test_csv_with_labels_and_a_test_file(tmp_path):
    write_csv(tmp_path / "train.csv", write_images(tmp_path, 9))
    write_csv(tmp_path / "test.csv", write_images(tmp_path, 3, start=9))
    splits = load(train_file=str(tmp_path / "train.csv"), test_file=str(tmp_path / "test.csv"))
    assert (len(splits.train), len(splits.test), splits.classes, splits.num_classes) == (9, 3, CLASSES, 3)
    assert splits.pretrain is splits.train
    assert splits.train.images.shape == (9, 1, 4, 4)
    assert splits.train.captions[4] == "grey 40, a dog"
    assert splits.train.labels.tolist() == [0, 1, 2] * 3
    assert splits.test.labels.tolist() == [0, 1, 2]
    assert_pairs_aligned(splits.train)
    assert_pairs_aligned(splits.test)


def test_open_clip_tsv_without_labels_held_out_split_and_limit_keep_the_pairs(tmp_path):
    write_csv(tmp_path / "pairs.tsv", write_images(tmp_path, 20), sep="\t", label=False)
    splits = load(train_file=str(tmp_path / "pairs.tsv"), val_fraction=0.25, limit_train=10)
    assert (len(splits.train), len(splits.test)) == (10, 5)
    assert splits.classes == [] and splits.num_classes == 0
    assert (splits.train.labels == -1).all()
    assert_pairs_aligned(splits.train)
    assert_pairs_aligned(splits.test)


def test_jsonl_with_its_own_keys_and_an_image_root(tmp_path):
    rows = write_images(tmp_path / "pics", 4)
    lines = [json.dumps({"image": file, "text": f"grey {value}, a {name}", "cls": name}) for file, value, name in rows]
    (tmp_path / "pairs.jsonl").write_text("\n\n".join(lines) + "\n")  # blank lines are skipped
    splits = load(train_file=str(tmp_path / "pairs.jsonl"), test_file=str(tmp_path / "pairs.jsonl"),
                  image_root=str(tmp_path / "pics"), image_key="image", caption_key="text", label_key="cls")
    assert splits.test.captions == ["grey 0, a cat", "grey 10, a dog", "grey 20, a ship", "grey 30, a cat"]
    assert splits.classes == CLASSES


def test_bad_listings_say_what_is_wrong(tmp_path):
    rows = write_images(tmp_path, 3)
    write_csv(tmp_path / "train.csv", rows)
    with pytest.raises(SslrunError, match="no 'caption' columns .*filepath, title, label"):
        load(train_file=str(tmp_path / "train.csv"), caption_key="caption")
    with pytest.raises(SslrunError, match="does not exist"):
        load(train_file=str(tmp_path / "missing.csv"))
    (tmp_path / "bad.jsonl").write_text('{"filepath": "img/0.png", "title": "x"}\n{oops\n')
    with pytest.raises(SslrunError, match="line 2, is not valid JSON"):
        load(train_file=str(tmp_path / "bad.jsonl"))
    write_csv(tmp_path / "other.csv", [("img/0.png", 0, "zebra")])
    with pytest.raises(SslrunError, match="classes the train listing lacks: zebra"):
        load(train_file=str(tmp_path / "train.csv"), test_file=str(tmp_path / "other.csv"))
