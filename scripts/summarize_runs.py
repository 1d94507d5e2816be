"""Tabulate finished runs (a multirun directory, or run directories) as a Markdown table.

    python scripts/summarize_runs.py outputs/multirun/2026-11-22/10-00-00 [--by method]

Reads each run's metrics.json, its config choices (.hydra/hydra.yaml) and the last collapse/std of
its TensorBoard events, and prints one row per run.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def find_runs(paths: list[Path]) -> list[Path]:
    runs = []
    for p in paths:
        runs += sorted({m.parent for m in p.rglob("metrics.json")})
    return runs


def last_scalar(run: Path, tag: str) -> float:
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    return acc.Scalars(tag)[-1].value if tag in acc.Tags()["scalars"] else math.nan


def row(run: Path) -> dict:
    m = json.loads((run / "metrics.json").read_text())
    # The config group's choice (mocov1, mocov2) rather than the class name (MoCo for both).
    choices = OmegaConf.load(run / ".hydra" / "hydra.yaml").hydra.runtime.choices
    return {"method": choices.method, "run": run.name, "knn_top1": m.get("knn_top1"),
            "linear_top1": m.get("linear_top1"),
            "epochs": m.get("epochs"), "imgs_per_s": m.get("imgs_per_s"),
            "collapse_std": last_scalar(run, "collapse/std"), "std_ref": last_scalar(run, "collapse/std_ref")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", type=Path)
    args = ap.parse_args()
    rows = [row(r) for r in find_runs(args.paths)]
    print("| method | kNN top-1 | linear top-1 | epochs | images/s | collapse std | 1/√d |")
    print("|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: -(r["knn_top1"] or 0)):
        print(f"| {r['method']} | {r['knn_top1']:.4f} | {r['linear_top1']:.4f} | {r['epochs']} | {r['imgs_per_s']} | "
              f"{r['collapse_std']:.4f} | {r['std_ref']:.4f} |")


if __name__ == "__main__":
    main()
