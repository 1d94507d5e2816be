"""The ``sslrun`` command: Hydra composes the config, ``run`` does the work.

Every way a run can end badly ends here as one paragraph on stderr and a non-zero exit, never a traceback:
exit 2 for input the user can fix (a config error Hydra or sslrun found, a dataset, a checkpoint, a full
or read-only disk, out of memory), 128 + N after a stop signal N (the checkpoint is written first).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from rich.console import Console
from rich.markup import escape  # messages quote values like [0.08, 1.0], not markup

from .errors import SslrunError, explain
from .rundir import RunDirectory

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
_task_started = False  # whether Hydra got as far as calling the task (else an exit 1 is a config error)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _main(cfg: DictConfig) -> None:
    global _task_started
    _task_started = True
    from . import dist  # imported here, like run, so that `sslrun --help` does not pay for torch
    from .engine.signals import StopRequested
    from .run import run

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    try:
        run_dir = _shared_run_dir(cfg, run_dir)
        if dist.is_main():
            console = Console(record=True, soft_wrap=True)  # one line per message, also when piped
            with RunDirectory(run_dir, console):
                run(cfg, run_dir, list(hc.overrides.task), console)
        else:
            run(cfg, run_dir, list(hc.overrides.task), Console(quiet=True))
        dist.barrier()  # the other ranks wait for rank 0's probes: tearing gloo down under it can abort a process
        dist.destroy()
    except StopRequested as e:
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (loading data, evaluating): nothing to save
        Console(stderr=True).print("Interrupted (Ctrl-C). Checkpoints already written are intact; rerun the same "
                                   "command to continue.", highlight=False)
        sys.exit(130)
    except BaseException as e:  # noqa: BLE001 - sorted into explained (exit 2) and re-raised below
        message = explain(e)
        if message is None:
            raise
        Console(stderr=True, soft_wrap=True).print(f"[bold red]sslrun error:[/] {escape(message)}", highlight=False)
        if hc.mode == RunMode.MULTIRUN:
            raise  # the sweep goes on: Hydra marks this job failed, sslrun.report.sweep_callback records it
        sys.exit(2)


def _shared_run_dir(cfg: DictConfig, run_dir: Path) -> Path:
    """Under torchrun every process composed its own ``${now}`` run directory: all use rank 0's, and the
    others remove the empty one Hydra made for them."""
    from . import dist
    from .engine.device import resolve_device

    if not dist.init_from_env(resolve_device(cfg.trainer.device)):
        return run_dir
    shared = Path(dist.broadcast_object(str(run_dir)))
    if shared != run_dir:
        for d in (run_dir, run_dir.parent):
            try:
                d.rmdir()  # only if empty: rank 0 may share the date folder
            except OSError:
                break
    return shared


def main() -> None:
    from .config_check import misspelled_override

    # Before Hydra, whose own message for a misspelled key advises adding it with "+" (~0.1 s of composing).
    misspelled = misspelled_override(sys.argv[1:])
    if misspelled:
        Console(stderr=True, soft_wrap=True).print(f"[bold red]sslrun error:[/] {escape(misspelled)}", highlight=False)
        sys.exit(2)
    try:
        _main()
    except SystemExit as e:
        # Hydra exits 1 for the config errors it finds itself (an unknown option or key, a bad override);
        # they are the user's input like every other config error, so they exit 2 too.
        if e.code == 1 and not _task_started:
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
