"""The one exception type users see, and the one place that turns a failure into its cause and fix."""

from __future__ import annotations

import errno
import re


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


def build_error(e: Exception, group: str | None, target: str | None) -> SslrunError:
    """The paragraph for a config node (``dataset``, ``backbone``, ``method``, ``optimizer``,
    ``method.optimizers.<name>``; None when unknown) that Hydra could not instantiate as ``target``: the target's
    own ``SslrunError`` as it is; a key the target does not take, by name (usually a key set for another choice
    of the group, e.g. an experiment's ``dataset.train_dir`` under ``dataset=synthetic``, or a misspelling
    added with +); otherwise the last line of the error."""
    cause = e.__cause__
    if isinstance(cause, SslrunError):
        return cause
    show = "`sslrun --cfg job` shows the composed config"
    if isinstance(cause, TypeError) and (m := re.search(r"unexpected keyword argument '(\w+)'", str(cause))):
        key = f"{group}.{m.group(1)}" if group else m.group(1)
        return SslrunError(
            f"{key} is not a setting of {target or 'the class it configures'} (it takes no such argument). It was "
            f"set by an experiment or an override written for another {group or 'group'} choice, or it is "
            f"misspelled. Drop it (~{key}), or pick the choice it was written for ({show}).")
    last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    return SslrunError(f"Could not build {group or 'a config group'} from its config ({target or 'see above'}): "
                       f"{last}. Check the keys you overrode ({show}).")


def explain(e: BaseException) -> str | None:
    """The one-paragraph explanation of a failure the user can fix, or None for a bug (which keeps its traceback)."""
    from hydra.errors import InstantiationException

    if isinstance(e, SslrunError):
        return str(e)
    if isinstance(e, InstantiationException):  # a config key its class does not take, or a value it refuses
        return str(build_error(e, None, None))
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
