"""Stop signals during training: Ctrl-C, SIGTERM (cluster preemption), SIGUSR1/SIGUSR2 (SLURM's warning
before the time limit). The handler only records the signal; the loop notices it after the current step,
writes a checkpoint and then stops, so no work since the last checkpoint is lost."""

from __future__ import annotations

import signal
from types import FrameType

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1", "SIGUSR2")
                     if hasattr(signal, name))


class StopRequested(Exception):
    """Training stopped on a signal after writing its checkpoint; the CLI exits with 128 + the signal number."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


class StopSignals:
    """Context manager recording the first stop signal in ``received`` (None until one arrives).

    The handlers that were installed before (e.g. submitit's, which requeues a preempted SLURM job) are
    restored on exit, and ``chain`` hands the signal on to them once the checkpoint is safe.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
        elif signum == signal.SIGINT:  # a second Ctrl-C: the user does not want to wait for the step
            raise KeyboardInterrupt

    def __enter__(self) -> StopSignals:
        try:
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread (e.g. a launcher's worker thread): signals stay as they were
            self._restore()
        return self

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def __exit__(self, *exc) -> None:
        self._restore()

    def chain(self, signum: int) -> bool:
        """Call the handler that was installed before ours, when it is a Python function (submitit's
        requeue); return whether one was called. Must run inside the ``with`` block."""
        previous = self._previous.get(signum)
        if callable(previous) and previous is not signal.default_int_handler:
            self._restore()
            previous(signum, None)
            return True
        return False
