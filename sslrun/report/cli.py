"""``sslrun-report``: the summary table of any run or sweep directories.

    sslrun-report outputs/multirun/2026-11-30/10-00-00
    sslrun-report outputs/2026-11-30/*  -o report/     # also writes report/summary.csv and summary.md

One row per run: the overrides that vary across the runs, kNN and linear top-1, epochs, minutes
(pretraining and evaluation), images/s, the final collapse std beside 1/√d, gradient spikes, status;
and mean ± std over runs that differ only by trainer.seed. The same table a sweep writes at its end.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from ..errors import SslrunError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sslrun-report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", type=Path, help="run directories, or directories holding runs")
    ap.add_argument("-o", "--out", type=Path, default=None, help="write summary.csv and summary.md here")
    args = ap.parse_args(argv)
    from .runs import find_runs
    from .table import summarize

    try:
        summary = summarize(find_runs(args.dirs))
    except SslrunError as e:
        Console(stderr=True, soft_wrap=True).print(f"[bold red]sslrun-report error:[/] {e}", highlight=False)
        return 2
    console = Console()
    for table in summary.rich(title=", ".join(map(str, args.dirs))):
        console.print(table)
    if args.out:
        console.print(f"Wrote {', '.join(map(str, summary.write(args.out)))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
