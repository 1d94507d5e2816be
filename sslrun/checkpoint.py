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


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write to a temp file in the same directory, fsync, then rename over ``path`` (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
