"""Find run directories and read what a run leaves behind: metrics, overrides, a failed job's error.

A run directory is one that holds ``metrics.json`` (a finished run), ``job_error.json`` (a job of a
sweep that failed, written by :mod:`sslrun.report.sweep_callback`), TensorBoard event files or
``.hydra/overrides.yaml`` (a run that started).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from ..errors import SslrunError

EVENTS = "events.out.tfevents.*"
METRICS = "metrics.json"
JOB_ERROR = "job_error.json"
OVERRIDES = Path(".hydra") / "overrides.yaml"


@dataclass
class RunInfo:
    """What one run directory says about its run.

    ``overrides`` maps each command-line override's key to its value, in order (``method`` ->
    ``simclr``; a deletion ``~key`` has the value ``"~"``). ``status`` is ``ok`` (metrics.json
    written), ``failed`` (the sweep recorded an error) or ``incomplete`` (still running, killed, or a
    single run that stopped with an error).
    """

    path: Path
    overrides: dict[str, str] = field(default_factory=dict)
    metrics: dict | None = None
    error: dict | None = None

    @property
    def status(self) -> str:
        if self.metrics is not None:
            return "ok"
        return "failed" if self.error is not None else "incomplete"


def _natural(path: Path) -> list:
    """Sort key: job 2 before job 10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def _is_run(d: Path) -> bool:
    return (d / METRICS).is_file() or (d / JOB_ERROR).is_file() or (d / OVERRIDES).is_file() or any(d.glob(EVENTS))


def find_runs(paths: list[Path], require_events: bool = False) -> list[Path]:
    """Run directories at or under ``paths``, in the order given (each path's runs in natural order), each once.

    Args:
        paths: run directories or directories holding runs (a Hydra sweep directory, ``outputs/``).
        require_events: only runs with TensorBoard event files (curves to draw).

    Raises:
        SslrunError: a path is not a directory, or holds no run.
    """
    runs: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise SslrunError(f"{p} is not a directory; pass run directories or a sweep directory "
                              "(e.g. outputs/multirun/<date>/<time>).")
        if require_events:
            found = [p] if any(p.glob(EVENTS)) else sorted({f.parent for f in p.rglob(EVENTS)}, key=_natural)
            if not found:
                raise SslrunError(f"There are no TensorBoard event files ({EVENTS}) in or under {p}: pass the directory "
                                  "of a run that has started training.")
        else:
            candidates = {f.parent for pattern in (METRICS, JOB_ERROR, EVENTS) for f in p.rglob(pattern)}
            candidates |= {f.parent.parent for f in p.rglob(str(OVERRIDES))}
            found = [p] if _is_run(p) else sorted(candidates, key=_natural)
            if not found:
                raise SslrunError(f"No runs in or under {p}: a run directory holds metrics.json, .hydra/ or "
                                  "TensorBoard event files.")
        runs += [r for r in found if r not in runs]
    return runs


def parse_overrides(overrides: list[str]) -> dict[str, str]:
    """``["method=simclr", "~eval.linear"]`` -> ``{"method": "simclr", "~eval.linear": "~"}``."""
    out = {}
    for o in map(str, overrides):
        key, sep, value = o.partition("=")
        out[key] = value if sep else "~"
    return out


def read_run(path: Path) -> RunInfo:
    """Read one run directory (none of its files is required)."""
    path = Path(path)
    info = RunInfo(path)
    if (path / OVERRIDES).is_file():
        info.overrides = parse_overrides(list(OmegaConf.load(path / OVERRIDES)))
    if (path / METRICS).is_file():
        info.metrics = json.loads((path / METRICS).read_text())
    if (path / JOB_ERROR).is_file():
        # The directory's latest job failed (the sweep callback removes the file when a job succeeds): its
        # overrides label the row, and a metrics.json beside it is an earlier run's result, not this job's.
        info.error = json.loads((path / JOB_ERROR).read_text())
        info.overrides = parse_overrides(info.error.get("overrides", [])) or info.overrides
        info.metrics = None
    return info


def write_job_error(run_dir: Path, error: BaseException, overrides: list[str]) -> None:
    """Record why a job of a sweep failed, for its row in the summary: ``{"type", "error", "overrides"}``
    (the job's overrides too: a run that failed early has not written .hydra/overrides.yaml)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"type": type(error).__name__, "error": str(error), "overrides": [str(o) for o in overrides]}
    (run_dir / JOB_ERROR).write_text(json.dumps(record, indent=2))


def varying_keys(overrides: list[dict[str, str]]) -> list[str]:
    """Override keys whose value is not the same in every run (absent counts as a value), in first-seen order."""
    keys: list[str] = []
    for o in overrides:
        keys += [k for k in o if k not in keys]
    return [k for k in keys if len({o.get(k) for o in overrides}) > 1]


def labels(runs: list[Path]) -> list[str]:
    """Each run's overrides that set it apart (``key=value, ...``); its directory name when none do."""
    overrides = [read_run(r).overrides for r in runs]
    keys = varying_keys(overrides)
    return [", ".join(f"{k}={o[k]}" for k in keys if k in o) or r.name for r, o in zip(runs, overrides)]
