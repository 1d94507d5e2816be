"""A run directory is used by one run at a time, keeps a log of what the run printed, and is not left
behind empty by a run that failed before writing anything."""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from rich.console import Console

from .errors import SslrunError, explain

LOCK = ".sslrun.lock"
LOG = "sslrun.log"


class RunDirectory:
    """Hold an exclusive lock on ``run_dir`` for the life of the run (a second run into the same directory,
    started together or later, gets an SslrunError instead of mixing its files with the first one's).

    On exit the ``console``'s recorded output, and the error a run failed with, are appended to ``sslrun.log``.
    A failed attempt that started in an empty directory and got no checkpoint written is removed again
    (with Hydra's ``outputs/<date>/`` folder when that is left empty), so failed attempts do not litter
    ``outputs/``; a directory that held anything before is never removed.
    """

    def __init__(self, run_dir: Path, console: Console | None = None) -> None:
        self.run_dir, self.console = run_dir, console
        self._fd: int | None = None

    def __enter__(self) -> RunDirectory:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._fresh = not (set(os.listdir(self.run_dir)) - {LOCK})
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
            with open(self.run_dir / LOG, "a") as f:
                if self.console is not None and self.console.record:
                    f.write(self.console.export_text())
                if exc is not None:
                    f.write(f"sslrun error: {explain(exc) or repr(exc)}\n")
        except OSError:
            pass  # a full or read-only disk: the error being reported matters more than the log
        worthless = not (self.run_dir / "checkpoints").exists() and not (self.run_dir / "metrics.json").exists()
        if exc_type is not None and self._fresh and worthless:
            self._remove()
        os.close(self._fd)
        self._fd = None

    def _remove(self) -> None:
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if self.run_dir.parent.parent.name == "outputs":  # Hydra's outputs/<date>/ folder, if now empty
            try:
                self.run_dir.parent.rmdir()
            except OSError:
                pass


class WritableOutputDir(Callback):
    """Hydra callback: make the run (or sweep) directory before Hydra does, so that one that cannot be made
    (a read-only or full disk, a path under /proc) ends with sslrun's one paragraph and exit 2, not a traceback."""

    def _make(self, path: str) -> None:
        try:
            Path(path).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            from rich.console import Console
            from rich.markup import escape

            Console(stderr=True, soft_wrap=True).print(f"[bold red]sslrun error:[/] {escape(explain(e))}", highlight=False)
            sys.exit(2)

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._make(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._make(config.hydra.sweep.dir)
