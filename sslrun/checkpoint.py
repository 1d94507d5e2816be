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


# What to do instead, by the config key that named the checkpoint.
_INSTEAD = {
    "trainer.resume": "or start from scratch with trainer.resume=never",
    "eval.checkpoint": "or train a model first and point eval.checkpoint at its checkpoints/last.pt",
    "method.teacher": "or train a teacher first (e.g. method=supervised) and point method.teacher at its run directory",
}


def load_checkpoint(path: str | Path, key: str) -> dict[str, Any]:
    """Read an sslrun checkpoint onto the CPU; ``key`` is the config key that named it (trainer.resume,
    eval.checkpoint, method.teacher), for the messages.

    Raises SslrunError, naming the file and the fix, when it is missing, not a checkpoint, truncated, damaged (a
    stored entry fails its zip CRC-32: a bad copy or a disk error flips bytes that torch.load alone would read as
    weights) or holds non-finite backbone weights.
    """
    path = Path(path)
    instead = _INSTEAD.get(key, "or point at another checkpoint")
    if not path.is_file():
        raise SslrunError(f"No checkpoint at {path} ({key}). Check the path (a run keeps its checkpoints in "
                          f"<run dir>/checkpoints/last.pt), {instead}.")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()  # CRC-32 of every entry: ~1 GB/s, a fraction of torch.load's own time
        if damaged is not None:
            raise SslrunError(f"The checkpoint {path} ({key}) is damaged: its entry {damaged} fails its CRC check, "
                              f"so its weights are not the ones saved. Copy it again from where it was written, "
                              f"use an earlier checkpoint, {instead}.")
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as e:
        raise SslrunError(f"The checkpoint {path} ({key}) could not be read ({type(e).__name__}: {e}); the file is "
                          f"truncated or not a checkpoint. Point at another one (the run directory's "
                          f"checkpoints/ keeps last.pt), {instead}.") from e
    if not isinstance(state, dict) or "backbone" not in state:
        raise SslrunError(f"{path} ({key}) is a torch file but not an sslrun checkpoint (no 'backbone' entry). "
                          "Point at a checkpoints/last.pt written by sslrun.")
    for name, value in state["backbone"].items():
        if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise SslrunError(f"The checkpoint {path} ({key}) holds non-finite backbone weights ({name}): it was "
                              f"saved from a diverged run or written by another program. Use an earlier "
                              f"checkpoint, {instead}.")
    return state
