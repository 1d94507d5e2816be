"""The one exception type users see, and the one place that turns a failure into its cause and fix."""

from __future__ import annotations

import errno


class SslrunError(Exception):
    """A problem with the user's input (config, data, checkpoint) that they can fix.

    The CLI prints the message as one paragraph and exits non-zero; code raising it should name
    what was wrong (the key, the path, the value) and what to do about it.
    """


# A failure to write files, by errno: what happened, and what to do about it.
DISK_ERRORS = {
    errno.ENOSPC: ("the disk is full", "Free some space, or point the run at another disk"),
    errno.EDQUOT: ("the disk quota is exceeded", "Free some space, or point the run at another disk"),
    errno.EROFS: ("the file system is read-only", "Point the run at a writable directory"),
    errno.EACCES: ("permission denied", "Point the run at a directory you may write to"),
    errno.EPERM: ("the operation is not permitted there", "Point the run at a directory you may write to"),
    errno.ENOENT: ("a directory on the path does not exist and cannot be made", "Check the path"),
}


def explain(e: BaseException) -> str | None:
    """The one-paragraph explanation of a failure the user can fix, or None for a bug (which keeps its traceback)."""
    from hydra.errors import InstantiationException

    if isinstance(e, SslrunError):
        return str(e)
    if isinstance(e, InstantiationException):  # a config key its class does not take, or a value it refuses
        cause = e.__cause__ if isinstance(e.__cause__, SslrunError) else None
        return str(cause) if cause else (
            f"A config group could not be built: {str(e).strip().splitlines()[-1]}. Check the keys you overrode "
            "against `sslrun --cfg job` (a misspelled key added with + reaches the class as an unknown argument).")
    if isinstance(e, OSError) and e.errno in DISK_ERRORS:
        what, fix = DISK_ERRORS[e.errno]
        where = f" ({e.filename})" if e.filename else ""
        return (f"Could not write the run's files: {what}{where}. {fix} (hydra.run.dir=<dir>, or hydra.sweep.dir "
                "for -m); the last good checkpoint and the files already written are intact, and rerunning the same "
                "command there resumes.")
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or (
            isinstance(e, RuntimeError) and "can't allocate memory" in str(e)):
        detail = next((line.strip() for line in str(e).splitlines() if "allocate" in line), type(e).__name__)
        return (f"Out of memory ({detail[:160]}). Lower trainer.batch_size (and eval.batch_size for evaluation), use "
                "a smaller backbone or image size, or dataset.storage=stream for data larger than memory; the last "
                "good checkpoint is intact.")
    return None
