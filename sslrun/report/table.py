"""One row per run — the overrides that vary, the probes, the budget, collapse and spikes, the status — as
CSV, Markdown and a rich table, and mean ± std over runs that differ only by ``trainer.seed``."""

from __future__ import annotations

import csv
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from rich.table import Table

from .events import last_values
from .runs import RunInfo, read_run, varying_keys

SEED = "trainer.seed"
# (key, header): the measured columns, after the varying overrides.
COLUMNS = (("knn_top1", "kNN top-1"), ("linear_top1", "linear top-1"), ("epochs", "epochs"),
           ("minutes", "minutes"), ("imgs_per_s", "images/s"), ("collapse_std", "collapse std"),
           ("collapse_std_ref", "1/√d"), ("spikes", "spikes"))
NUMERIC = tuple(k for k, _ in COLUMNS)


def _minutes(m: dict) -> float | None:
    """Wall time of the run, pretraining plus evaluation."""
    if "seconds" not in m and "eval_seconds" not in m:
        return None
    return (m.get("seconds", 0.0) + m.get("eval_seconds", 0.0)) / 60


def run_row(info: RunInfo, keys: list[str], name: str) -> dict:
    """The summary row of one run: ``run``, the ``keys`` overrides ('' where the run has none), then COLUMNS,
    ``status`` and ``error`` (a failed job's message)."""
    m = info.metrics or {}
    std = last_values(info.path, ("collapse/std", "collapse/std_ref"))
    row = {"run": name, **{k: info.overrides.get(k, "") for k in keys},
           "knn_top1": m.get("knn_top1"), "linear_top1": m.get("linear_top1"), "epochs": m.get("epochs"),
           "minutes": _minutes(m), "imgs_per_s": m.get("imgs_per_s"), "collapse_std": std["collapse/std"],
           "collapse_std_ref": std["collapse/std_ref"],
           "spikes": len(m["spikes"]) if isinstance(m.get("spikes"), list) else None, "status": info.status,
           "error": (info.error or {}).get("error", "")}
    return row


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def seed_rows(rows: list[dict], keys: list[str]) -> list[dict]:
    """Mean ± sample std (n-1) of every numeric column over the finished runs that differ only by the seed.

    Rows whose other varying overrides are equal form a group; groups of two or more runs give one
    row ``{<other keys>, "seeds", "n", <column>: (mean, std)}``. Failed or unfinished runs are left out
    of the means; ``n`` counts the finished runs.
    """
    if SEED not in keys:
        return []
    others = [k for k in keys if k != SEED]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in others), []).append(r)
    out = []
    for group_key, members in groups.items():
        if len(members) < 2:
            continue
        done = [r for r in members if r["status"] == "ok"]
        row = {**dict(zip(others, group_key)), "seeds": ", ".join(str(r[SEED]) for r in members), "n": len(done)}
        for col in NUMERIC:
            vals = [r[col] for r in done if _finite(r[col])]
            row[col] = (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else float("nan")) \
                if vals else None
        out.append(row)
    return out


def fmt(col: str, value) -> str:
    """A cell as shown in Markdown and the terminal (CSV keeps the raw number)."""
    if isinstance(value, tuple):
        return f"{fmt(col, value[0])} ± {fmt(col, value[1])}"
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if not _finite(value):
        return str(value)
    if col in ("imgs_per_s",):
        return f"{value:,.0f}"
    if col in ("epochs", "minutes"):
        return f"{value:.2f}"
    if col in ("spikes", "n"):
        return f"{value:g}"
    return f"{value:.4f}"


@dataclass
class Summary:
    """A table of runs: ``keys`` are the overrides that vary across them (the label columns)."""

    keys: list[str]
    rows: list[dict]
    seed_rows: list[dict] = field(default_factory=list)

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.rows if r["status"] == "failed"]

    def _columns(self) -> list[tuple[str, str]]:
        cols = [("run", "run"), *((k, k) for k in self.keys), *COLUMNS, ("status", "status")]
        return cols + ([("error", "error")] if any(r["error"] for r in self.rows) else [])

    def _seed_columns(self) -> list[tuple[str, str]]:
        return [*((k, k) for k in self.keys if k != SEED), ("seeds", "seeds"), ("n", "n"), *COLUMNS]

    def markdown(self) -> str:
        parts = [_markdown(self._columns(), self.rows)]
        if self.seed_rows:
            parts.append("Mean ± std (sample, n-1) over runs that differ only by trainer.seed:\n\n" +
                         _markdown(self._seed_columns(), self.seed_rows))
        return "\n\n".join(parts) + "\n"

    def rich(self, title: str = "runs") -> list[Table]:
        tables = [_rich(self._columns(), self.rows, title)]
        if self.seed_rows:
            tables.append(_rich(self._seed_columns(), self.seed_rows, f"{title}: mean ± std over seeds"))
        return tables

    def write(self, out_dir: Path, stem: str = "summary") -> list[Path]:
        """``<stem>.csv``, ``<stem>.md`` and, when seeds repeat, ``<stem>_seeds.csv`` in ``out_dir``."""
        out_dir.mkdir(parents=True, exist_ok=True)
        written = [out_dir / f"{stem}.csv", out_dir / f"{stem}.md"]
        write_csv(written[0], [k for k, _ in self._columns()], self.rows)
        written[1].write_text(self.markdown())
        if self.seed_rows:
            cols = [k for k, _ in self._seed_columns() if k not in NUMERIC]
            flat = [{**{k: r[k] for k in cols}, **{f"{c}_{s}": (r[c][i] if r[c] else None) for c in NUMERIC
                                                    for i, s in enumerate(("mean", "std"))}} for r in self.seed_rows]
            written.append(out_dir / f"{stem}_seeds.csv")
            write_csv(written[2], cols + [f"{c}_{s}" for c in NUMERIC for s in ("mean", "std")], flat)
        return written


def summarize(run_dirs: list[Path]) -> Summary:
    """The summary of ``run_dirs`` (from :func:`sslrun.report.runs.find_runs`)."""
    infos = [read_run(p) for p in run_dirs]
    keys = varying_keys([i.overrides for i in infos])
    root = os.path.commonpath([str(p) for p in run_dirs]) if len(run_dirs) > 1 else None
    names = [os.path.relpath(p, root) if root else Path(p).name for p in run_dirs]
    rows = [run_row(i, keys, n) for i, n in zip(infos, names)]
    return Summary(keys, rows, seed_rows(rows, keys))


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if r.get(k) is None else r.get(k) for k in columns})


def _markdown(columns: list[tuple[str, str]], rows: list[dict]) -> str:
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(k, r.get(k)).replace("|", "\\|").replace("\n", " ")
                                       for k, _ in columns) + " |")
    return "\n".join(lines)


def _rich(columns: list[tuple[str, str]], rows: list[dict], title: str) -> Table:
    table = Table(title=title)
    for k, h in columns:
        table.add_column(h, justify="right" if k in NUMERIC or k == "n" else "left",
                         overflow="fold", max_width=60 if k == "error" else None)
    for r in rows:
        style = "red" if r.get("status") == "failed" else None
        table.add_row(*(fmt(k, r.get(k)) for k, _ in columns), style=style)
    return table
