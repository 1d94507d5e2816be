"""A real `sslrun -m` sweep summarises itself: varying overrides as columns, a failed job as a row (the sweep
goes on), mean ± std over seeds; `sslrun-report` rebuilds the same table."""

import csv
import json
import statistics
import subprocess
import sys

import pytest
from runner import FAST, ROOT

from sslrun.report.cli import main as report_main

SMALL = [o for o in FAST if not o.startswith("trainer.batch_size")] + ["eval.linear.epochs=1", "monitor.knn_every=0",
                                                                         "monitor.figures.enabled=false"]


def sslrun_m(*args, tmp_path):
    return subprocess.run([sys.executable, "-m", "sslrun.cli", "-m", *args, f"hydra.sweep.dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env={"COLUMNS": "250", **_env()})


def _env():
    import os

    return dict(os.environ)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """seed 0,1 x batch 64 (runs) and 4096 (larger than the 256 images: an SslrunError in each of its jobs)."""
    root = tmp_path_factory.mktemp("sweep")
    proc = sslrun_m(*SMALL, "trainer.seed=0,1", "trainer.batch_size=64,4096", tmp_path=root)
    return root, proc


@pytest.mark.slow
def test_failed_jobs_do_not_end_the_sweep_and_the_command_says_so(sweep):
    root, proc = sweep
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "2 of 4 jobs failed" in proc.stderr and "Traceback" not in proc.stderr
    done = sorted(p.parent.name for p in root.glob("*/metrics.json"))
    assert done == ["0", "2"]  # the batch-64 jobs ran although job 1 had failed before job 2 started
    assert "kNN top-1" in proc.stdout  # the rich table


@pytest.mark.slow
def test_summary_has_the_varying_overrides_the_failed_rows_and_the_seed_means(sweep):
    root, _ = sweep
    rows = list(csv.DictReader((root / "summary.csv").open()))
    assert list(rows[0])[:3] == ["run", "trainer.seed", "trainer.batch_size"]
    assert [(r["trainer.seed"], r["trainer.batch_size"], r["status"]) for r in rows] == [
        ("0", "64", "ok"), ("0", "4096", "failed"), ("1", "64", "ok"), ("1", "4096", "failed")]
    for r in rows:
        if r["status"] == "failed":
            assert "larger than the pretraining set" in r["error"] and r["knn_top1"] == ""
        else:
            m = json.loads((root / r["run"] / "metrics.json").read_text())
            assert float(r["knn_top1"]) == m["knn_top1"] and float(r["epochs"]) == m["epochs"]
            assert float(r["collapse_std"]) > 0 and r["spikes"] != ""
    seeds = {r["trainer.batch_size"]: r for r in csv.DictReader((root / "summary_seeds.csv").open())}
    knn = [float(r["knn_top1"]) for r in rows if r["status"] == "ok"]
    assert seeds["64"]["n"] == "2" and float(seeds["64"]["knn_top1_mean"]) == pytest.approx(statistics.fmean(knn))
    assert float(seeds["64"]["knn_top1_std"]) == pytest.approx(statistics.stdev(knn))
    assert seeds["4096"]["n"] == "0"
    md = (root / "summary.md").read_text()
    assert "| run | trainer.seed | trainer.batch_size |" in md and "Mean ± std" in md
    assert (root / "1" / "job_error.json").is_file()


@pytest.mark.slow
def test_sslrun_report_rebuilds_the_sweeps_table(sweep, tmp_path):
    root, _ = sweep
    assert report_main([str(root), "-o", str(tmp_path)]) == 0
    for name in ("summary.csv", "summary.md", "summary_seeds.csv"):
        assert (tmp_path / name).read_text() == (root / name).read_text()


def test_the_callback_is_registered_and_the_console_scripts_declared():
    import tomllib

    from omegaconf import OmegaConf

    cfg = OmegaConf.load(ROOT / "conf" / "config.yaml")
    assert cfg.hydra.callbacks.summary._target_ == "sslrun.report.sweep_callback.SweepSummary"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["sslrun-report"] == "sslrun.report.cli:main"
    assert scripts["sslrun-reproduce"] == "sslrun.report.reproduce:main"
