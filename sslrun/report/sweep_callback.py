"""The Hydra callback that makes a sweep summarise itself (registered in conf/config.yaml).

At the end of ``sslrun -m ...`` it writes ``summary.csv`` and ``summary.md`` into the sweep directory
and prints the table. Along the way it keeps one failing job from ending the sweep: Hydra records a
job that raised as FAILED and its sweepers then re-raise that error (the basic sweeper after the batch,
before ``on_multirun_end``; Optuna's after ``max_failure_rate``). The callback writes the error into the
job's directory (``job_error.json``, read back as the row's status and error) and hands the sweeper a
finished job whose value is None, so the other jobs run and the summary is written; the command then
exits with status 2, naming the failed jobs.

It also gives each finished job's ``objective`` metric (a key of metrics.json) to the sweeper as the
job's return value, which an optimising sweeper (``hydra/sweeper=optuna_lr``) maximises.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig
from rich.console import Console

from ..errors import SslrunError
from .runs import JOB_ERROR, METRICS, find_runs, write_job_error


class SweepSummary(Callback):
    """``hydra.callbacks.summary`` in conf/config.yaml.

    Args:
        objective: the metrics.json key each job returns to the sweeper (e.g. ``knn_top1``).
    """

    def __init__(self, objective: str) -> None:
        self.objective = objective

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs) -> None:
        hydra_cfg = job_return.hydra_cfg.hydra if job_return.hydra_cfg is not None else None
        if hydra_cfg is None or hydra_cfg.mode != RunMode.MULTIRUN:
            return  # a single run reports its own error and exit status
        run_dir = Path(hydra_cfg.runtime.output_dir)
        if job_return.status == JobStatus.FAILED:
            write_job_error(run_dir, job_return._return_value, job_return.overrides or [])
            job_return.status, job_return.return_value = JobStatus.COMPLETED, None
            return
        (run_dir / JOB_ERROR).unlink(missing_ok=True)  # an earlier attempt's error no longer describes the job
        metrics = run_dir / METRICS
        if metrics.is_file():
            job_return.return_value = json.loads(metrics.read_text()).get(self.objective)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from .table import summarize  # reads TensorBoard events: loaded only when a sweep ends

        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            summary = summarize(find_runs([sweep_dir]))
        except SslrunError as e:  # no job got as far as its directory
            Console(stderr=True, soft_wrap=True).print(f"No sweep summary: {e}", highlight=False)
            return
        written = summary.write(sweep_dir)
        console = Console()
        for table in summary.rich(title=f"sweep {sweep_dir}"):
            console.print(table)
        console.print(f"Summary: {', '.join(map(str, written))}")
        if summary.failed:
            Console(stderr=True, soft_wrap=True).print(
                f"[bold red]sslrun error:[/] {len(summary.failed)} of {len(summary.rows)} jobs failed "
                f"({', '.join(r['run'] for r in summary.failed)}); each one's error is in its row of "
                f"{sweep_dir / 'summary.md'} and in its job_error.json.", highlight=False)
            sys.exit(2)
