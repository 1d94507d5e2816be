"""Atomic checkpoints, read and written on the ground floor: the engine, eval-only and a method that loads a
teacher (distillation) all reach them without importing the engine or the run module."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import SslrunError


def _write_atomic(path: Path, write) -> None:
    """Write through ``write(file)`` to a temp file in the same directory, fsync, then rename over ``path``
    (atomic on POSIX): a kill at any moment leaves the old file or the new one, never a torn one. On an
    OS error (full disk, read-only or missing directory) the temp file is removed and the old file kept."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Atomically write a checkpoint (see ``_write_atomic``)."""
    _write_atomic(path, lambda f: torch.save(state, f))


def write_text_atomic(path: Path, text: str) -> None:
    """Atomically write a small text file (metrics.json, the run's config)."""
    _write_atomic(path, lambda f: f.write(text.encode()))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise SslrunError(f"No checkpoint at {path}. Check the path (a run keeps its checkpoints in "
                          "<run dir>/checkpoints/last.pt), or drop the key to start from scratch.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as e:
        raise SslrunError(f"The checkpoint {path} could not be read ({type(e).__name__}: {e}); the file is "
                          "truncated or not a checkpoint. Point at another one (the run directory's "
                          "checkpoints/ keeps last.pt), or start from scratch with trainer.resume=never.") from e
    if not isinstance(state, dict) or "backbone" not in state:
        raise SslrunError(f"{path} is a torch file but not an sslrun checkpoint (no 'backbone' entry). "
                          "Point at a checkpoints/last.pt written by sslrun.")
    return state
