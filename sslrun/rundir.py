"""A run directory is used by one run at a time, keeps a log of what the run printed, and is not left
behind empty by a run that failed before writing anything."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from rich.console import Console

from .errors import SslrunError

LOCK = ".sslrun.lock"
LOG = "sslrun.log"


class RunDirectory:
    """Hold an exclusive lock on ``run_dir`` for the life of the run (a second run into the same directory,
    started together or later, gets an SslrunError instead of mixing its files with the first one's).

    On exit the ``console``'s recorded output is appended to ``sslrun.log``; after a failure that left the
    directory without any file of its own, the directory is removed again (with Hydra's
    ``outputs/<date>/`` folder when that is left empty), so failed attempts do not litter ``outputs/``.
    """

    def __init__(self, run_dir: Path, console: Console | None = None) -> None:
        self.run_dir, self.console = run_dir, console
        self._fd: int | None = None

    def __enter__(self) -> RunDirectory:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise SslrunError(f"Another sslrun run (pid {holder}) is using the run directory {self.run_dir}. "
                              "Two runs in one directory would mix their checkpoints, curves and metrics: wait for "
                              "it to finish, or give this run its own directory (drop hydra.run.dir, or pick "
                              "another).") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._fd is None:
            return
        try:
            if self.console is not None and self.console.record:
                with open(self.run_dir / LOG, "a") as f:
                    f.write(self.console.export_text())
        except OSError:
            pass  # a full or read-only disk: the error being reported matters more than the log
        if exc_type is not None and not (set(os.listdir(self.run_dir)) - {LOCK, LOG}):
            self._remove_empty()
        os.close(self._fd)
        self._fd = None

    def _remove_empty(self) -> None:
        for name in (LOCK, LOG):
            (self.run_dir / name).unlink(missing_ok=True)
        try:
            self.run_dir.rmdir()
            if self.run_dir.parent.parent.name == "outputs":  # Hydra's outputs/<date>/ folder, if now empty
                self.run_dir.parent.rmdir()
        except OSError:
            pass
