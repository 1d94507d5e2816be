"""``sslrun-reproduce``: run a paper table's rows and say, row by row, whether each figure was reproduced.

    sslrun-reproduce fmnist_cpu                      # every row of conf/experiment/fmnist_cpu/, one after another
    sslrun-reproduce fmnist_cpu --dry-run            # check every row composes; print the commands
    sslrun-reproduce solo_cifar10 --launcher slurm   # one sweep through conf/hydra/launcher/slurm.yaml
    sslrun-reproduce simsiam_appD --rows simsiam trainer.device=cuda:1   # some rows, extra overrides

A table is a folder ``conf/experiment/<table>/``; each ``<row>.yaml`` (not ``_*.yaml``: pieces rows share) is
a full recipe with an ``expected: {metric, value, tol, source[, floor]}`` block. Rows run in name order (a row
that reads another row's run, such as a distillation student its teacher's, after that row, pointed at its run) into
``--out`` (default ``outputs/reproduce/<table>/<date>_<time>``), one directory each; then ``reproduce.csv``
and ``reproduce.md`` there hold ``expected | got | delta | minutes | reproduced?`` and the terminal shows
the same; ``--collect`` judges the runs already in ``--out`` without running anything. ``reproduced`` means
|got - expected| <= tol, or got >= expected - tol for a row marked ``floor: true``.
Exit status 0 when every row reproduced, 1 when some did not or failed, 2 for bad input.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from ..cli import CONF_DIR
from ..errors import SslrunError
from .expected import judge
from .runs import find_runs, read_run
from .table import fmt, write_csv

EXPERIMENTS = Path(CONF_DIR) / "experiment"


@dataclass
class Row:
    name: str                      # <table>/<row>: the experiment option
    expected: dict


def tables() -> list[str]:
    """The tables: folders of conf/experiment holding row YAMLs."""
    return sorted(d.name for d in EXPERIMENTS.iterdir() if d.is_dir() and _row_names(d))


def _row_names(folder: Path) -> list[str]:
    """A table's rows: its YAMLs, less those named ``_*`` (pieces the rows share, e.g. ``_recipe.yaml``)."""
    return sorted(p.stem for p in folder.glob("*.yaml") if not p.name.startswith("_"))


def load_table(table: str, only: list[str] | None = None) -> list[Row]:
    """The rows of ``conf/experiment/<table>/`` (all, or those named in ``only``), checked to compose.

    Raises:
        SslrunError: no such table or row, or a row that does not compose, fails the config check, or has
            no ``expected`` block.
    """
    folder = EXPERIMENTS / table
    if not folder.is_dir():
        raise SslrunError(f"No table {table!r}: a table is a folder of conf/experiment/. Tables: "
                          f"{', '.join(tables())}.")
    names = _row_names(folder)
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise SslrunError(f"Table {table} has no row {', '.join(unknown)}; its rows: {', '.join(names)}.")
    rows = []
    for name in (n for n in names if not only or n in only):
        exp = OmegaConf.load(folder / f"{name}.yaml").get("expected")
        if exp is None:
            raise SslrunError(f"conf/experiment/{table}/{name}.yaml has no expected block; a table row needs "
                              "expected: {metric, value, tol, source}.")
        rows.append(Row(f"{table}/{name}", OmegaConf.to_container(exp)))
    return rows


def compose_row(row: Row, overrides: list[str]):
    """The row's composed config (Hydra's compose API), through sslrun's config check."""
    from hydra import compose, initialize_config_dir

    from ..config_check import check_config, misspelled_override

    try:
        with initialize_config_dir(CONF_DIR, version_base="1.3"):
            cfg = compose("config", overrides=[f"experiment={row.name}", *overrides])
    except Exception as e:  # Hydra's own errors: an unknown key or option in the row
        misspelled = misspelled_override([f"experiment={row.name}", *overrides])  # composes again, only on failure
        if misspelled:
            raise SslrunError(f"conf/experiment/{row.name}.yaml with the given overrides: {misspelled}") from None
        raise SslrunError(f"conf/experiment/{row.name}.yaml does not compose: {e}") from e
    try:
        check_config(cfg)
    except SslrunError as e:
        raise SslrunError(f"conf/experiment/{row.name}.yaml: {e}") from e
    return cfg


def _leaves(node, prefix: str = ""):
    """(dotted key, value) for every leaf of a plain nested dict/list."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else None
    if items is None:
        yield prefix, node
        return
    for k, v in items:
        yield from _leaves(v, f"{prefix}.{k}" if prefix else str(k))


def row_inputs(rows: list[Row], cfgs: dict, table: list[Row]) -> dict[str, dict[str, str]]:
    """For each of ``rows``, the keys that read the run of another row of its ``table`` (a student's
    ``method.teacher``): row -> {key: row read}.

    A row's run directory is the ``hydra.run.dir`` its YAML sets; a config value equal to it (or a path under it)
    reads that row's run, which ``sslrun-reproduce`` must run first and point at its own copy under ``--out``."""
    run_dirs = {}
    for r in table:
        d = OmegaConf.select(OmegaConf.load(EXPERIMENTS / f"{r.name}.yaml"), "hydra.run.dir")
        if d:
            run_dirs[r.name] = str(Path(d))
    out: dict[str, dict[str, str]] = {}
    for r in rows:
        for key, value in _leaves(OmegaConf.to_container(cfgs[r.name], resolve=False)):
            if not isinstance(value, str):
                continue
            for other, d in run_dirs.items():
                if other != r.name and (value == d or value.startswith(d + "/")):
                    out.setdefault(r.name, {})[key] = other
    return out


def run_order(rows: list[Row], inputs: dict[str, dict[str, str]]) -> list[Row]:
    """Rows in name order, except that a row runs after the rows it reads (the teacher before its students).

    Raises:
        SslrunError: when a row reads a row that is not being run, or rows read each other in a cycle.
    """
    names = {r.name for r in rows}
    for name, keys in inputs.items():
        missing = sorted(set(keys.values()) - names)
        if name in names and missing:
            raise SslrunError(f"{name} reads the run of {', '.join(missing)} ({', '.join(keys)}); add "
                              f"{', '.join(m.split('/')[1] for m in missing)} to --rows, or set the key to an "
                              "existing run on the command line.")
    ordered: list[Row] = []
    pending = list(rows)
    while pending:
        ready = [r for r in pending if set(inputs.get(r.name, {}).values()) <= {o.name for o in ordered}]
        if not ready:
            raise SslrunError(f"The rows {', '.join(r.name for r in pending)} read each other's runs in a cycle.")
        ordered.append(ready[0])
        pending.remove(ready[0])
    return ordered


def commands(rows: list[Row], out: Path, overrides: list[str], launcher: str | None,
             inputs: dict[str, dict[str, str]] | None = None) -> list[list[str]]:
    """The ``sslrun`` command lines: one per row (a row that reads another's run points at that row's directory
    under ``out``), or one sweep through a Hydra launcher.

    Raises:
        SslrunError: a sweep of rows that read each other's runs (a sweep's jobs run at the same time).
    """
    inputs = inputs or {}
    if launcher:
        if inputs:
            raise SslrunError(f"{', '.join(inputs)} read other rows' runs, so this table cannot run as one sweep "
                              "(its jobs run at the same time): run it without --launcher, or sweep the rows they "
                              "read first (--rows) and then the others with their keys pointing at those runs.")
        return [["sslrun", "-m", "experiment=" + ",".join(r.name for r in rows), f"hydra/launcher={launcher}",
                 f"hydra.sweep.dir={out}", *overrides]]
    return [["sslrun", f"experiment={r.name}", f"hydra.run.dir={out / r.name.split('/')[1]}",
             *(f"{key}={out / other.split('/')[1]}" for key, other in inputs.get(r.name, {}).items()), *overrides]
            for r in rows]


def results(rows: list[Row], out: Path) -> list[dict]:
    """One result per row from its run directory under ``out`` (found by its experiment override)."""
    by_experiment = {}
    try:
        found = find_runs([out])
    except SslrunError:  # no run got as far as its directory: every row is "not run"
        found = []
    for run in found:
        by_experiment.setdefault(read_run(run).overrides.get("experiment"), run)
    table = []
    for row in rows:
        run = by_experiment.get(row.name)
        info = read_run(run) if run is not None else None
        metrics = (info.metrics if info else None) or {}
        verdict = judge(row.expected, metrics)
        minutes = (metrics["seconds"] + metrics.get("eval_seconds", 0.0)) / 60 if "seconds" in metrics else None
        status = info.status if info else "not run"
        table.append({"row": row.name.split("/")[1], "metric": row.expected["metric"],
                      "expected": row.expected["value"], "tol": row.expected["tol"],
                      "floor": bool(row.expected.get("floor", False)), "got": verdict["got"],
                      "delta": verdict["delta"], "minutes": minutes,
                      "reproduced": verdict["reproduced"] if status == "ok" else None, "status": status,
                      "run": str(run) if run else "", "source": row.expected["source"]})
    return table


def _expected_cell(r: dict) -> str:
    return f"≥ {r['expected'] - r['tol']:.4f}" if r["floor"] else f"{r['expected']:.4f} ± {r['tol']:.4f}"


def _verdict(r: dict) -> str:
    return {True: "yes", False: "no"}.get(r["reproduced"], r["status"])


HEADERS = ("row", "metric", "expected", "got", "delta", "minutes", "reproduced?", "source")


def _cells(r: dict) -> list[str]:
    delta = "—" if r["delta"] is None else f"{r['delta']:+.4f}"
    return [r["row"], r["metric"], _expected_cell(r), fmt("got", r["got"]), delta, fmt("minutes", r["minutes"]),
            _verdict(r), r["source"]]


def write_results(table: list[dict], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "reproduce.csv", out / "reproduce.md"
    write_csv(csv_path, list(table[0].keys()), table)
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in _cells(r)) + " |" for r in table]
    md_path.write_text("\n".join(lines) + "\n")
    return [csv_path, md_path]


def rich_table(table: list[dict], title: str) -> Table:
    t = Table(title=title)
    for h in HEADERS:
        t.add_column(h, justify="right" if h in ("got", "delta", "minutes") else "left", overflow="fold")
    for r in table:
        t.add_row(*_cells(r), style={True: "green", False: "red"}.get(r["reproduced"], "yellow"))
    return t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sslrun-reproduce", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("table", nargs="?", help="a folder of conf/experiment/ (none: list the tables)")
    ap.add_argument("overrides", nargs="*", help="overrides for every row, e.g. trainer.device=cuda:1")
    ap.add_argument("--rows", default=None, help="comma-separated rows to run (default: all)")
    ap.add_argument("--dry-run", action="store_true", help="check that every row composes; print the commands")
    ap.add_argument("--launcher", default=None,
                    help="run the rows as one sweep through this Hydra launcher (conf/hydra/launcher/)")
    ap.add_argument("--collect", action="store_true",
                    help="run nothing: judge the runs already in --out (after a sweep elsewhere, or a new tolerance)")
    ap.add_argument("--out", type=Path, default=None,
                    help="directory of the runs and the result (default outputs/reproduce/<table>/<date>_<time>)")
    args = ap.parse_intermixed_args(argv)  # overrides may come before or after the options
    console, err = Console(), Console(stderr=True, soft_wrap=True)
    try:
        if not args.table:
            console.print("Tables (conf/experiment/<table>/): " + ", ".join(tables()))
            return 0
        rows = load_table(args.table, args.rows.split(",") if args.rows else None)
        cfgs = {row.name: compose_row(row, args.overrides) for row in rows}
        given = {k.split("=", 1)[0].lstrip("+~") for k in args.overrides}  # keys the user set win
        inputs = {} if args.collect else {  # --collect runs nothing: the runs read what they read
            name: {k: o for k, o in keys.items() if k not in given}
            for name, keys in row_inputs(rows, cfgs, load_table(args.table)).items()}
        inputs = {name: keys for name, keys in inputs.items() if keys}
        rows = run_order(rows, inputs)
        out = args.out or Path("outputs/reproduce") / args.table / time.strftime("%Y-%m-%d_%H-%M-%S")
        cmds = commands(rows, out, args.overrides, args.launcher, inputs)
    except SslrunError as e:
        err.print(f"[bold red]sslrun-reproduce error:[/] {e}", highlight=False)
        return 2
    if args.collect and not args.out:
        err.print("[bold red]sslrun-reproduce error:[/] --collect judges the runs of an earlier sslrun-reproduce: "
                  "give their directory with --out.", highlight=False)
        return 2
    if args.dry_run:
        for cmd in cmds:
            print(shlex.join(cmd))
        for r in rows:
            exp = r.expected
            band = f">= {exp['value'] - exp['tol']:g}" if exp.get("floor") else f"{exp['value']:g} ± {exp['tol']:g}"
            print(f"# {r.name}: {exp['metric']} {band} ({exp['source']})")
        return 0
    for cmd in [] if args.collect else cmds:
        console.print(f"[bold]$ {shlex.join(cmd)}[/]", highlight=False)
        proc = subprocess.run([sys.executable, "-m", "sslrun.cli", *cmd[1:]])
        if proc.returncode != 0:
            err.print(f"[yellow]{shlex.join(cmd)} exited with {proc.returncode}; going on.[/]", highlight=False)
    table = results(rows, out)
    written = write_results(table, out)
    console.print(rich_table(table, f"sslrun-reproduce {args.table} — {out}"))
    console.print(f"Wrote {', '.join(map(str, written))}")
    return 0 if all(r["reproduced"] for r in table) else 1


if __name__ == "__main__":
    sys.exit(main())
