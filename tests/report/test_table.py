"""Runs found, read, labelled and tabulated from run directories written the way sslrun writes them."""

import csv
import json
import statistics

import pytest
from torch.utils.tensorboard import SummaryWriter

from sslrun.errors import SslrunError
from sslrun.report.cli import main as report_main
from sslrun.report.runs import find_runs, labels, write_job_error
from sslrun.report.table import summarize


def make_run(d, overrides, metrics=None, std=None):
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if metrics is not None:
        (d / "metrics.json").write_text(json.dumps(metrics))
    if std is not None:
        with SummaryWriter(str(d)) as w:
            for step, v in enumerate(std):
                w.add_scalar("collapse/std", v, step)
            w.add_scalar("collapse/std_ref", 0.0625, 0)


def metrics(knn, lin, seconds=60.0, spikes=0):
    return {"knn_top1": knn, "linear_top1": lin, "epochs": 3.0, "seconds": seconds, "eval_seconds": 30.0,
            "imgs_per_s": 1000.0, "spikes": [{"step": i, "layer": "x", "value": 1.0} for i in range(spikes)]}


@pytest.fixture
def sweep(tmp_path):
    """A sweep of lr x seed in which one job failed: jobs 0-3 finished, job 4 recorded its error."""
    s = tmp_path / "sweep"
    make_run(s / "0", ["method=simclr", "optimizer.lr=0.1", "trainer.seed=0"], metrics(0.80, 0.85), std=[0.08, 0.06])
    make_run(s / "1", ["method=simclr", "optimizer.lr=0.1", "trainer.seed=1"], metrics(0.82, 0.86, spikes=2))
    make_run(s / "2", ["method=simclr", "optimizer.lr=0.3", "trainer.seed=0"], metrics(0.70, 0.75))
    make_run(s / "3", ["method=simclr", "optimizer.lr=0.3", "trainer.seed=1"], metrics(0.74, 0.77))
    write_job_error(s / "10", ValueError("optimizer.lr=-1 must be positive"),
                    ["method=simclr", "optimizer.lr=-1", "trainer.seed=0"])
    return s


def test_rows_are_labelled_by_the_overrides_that_vary(sweep):
    runs = find_runs([sweep])
    assert [r.name for r in runs] == ["0", "1", "2", "3", "10"]  # natural order: 10 after 3
    assert labels(runs[:2]) == ["trainer.seed=0", "trainer.seed=1"]
    s = summarize(runs)
    assert s.keys == ["optimizer.lr", "trainer.seed"]  # method is the same everywhere: not a column
    assert [(r["optimizer.lr"], r["trainer.seed"]) for r in s.rows][:3] == [("0.1", "0"), ("0.1", "1"), ("0.3", "0")]
    first = s.rows[0]
    assert first["minutes"] == pytest.approx(1.5) and first["collapse_std"] == pytest.approx(0.06)  # the last value
    assert first["collapse_std_ref"] == pytest.approx(0.0625) and s.rows[1]["spikes"] == 2
    assert first["status"] == "ok"


def test_a_failed_job_is_a_row_with_its_error_and_overrides(sweep):
    s = summarize(find_runs([sweep]))
    failed = s.rows[-1]
    assert failed["status"] == "failed" and "must be positive" in failed["error"]
    assert failed["optimizer.lr"] == "-1" and failed["knn_top1"] is None
    assert "must be positive" in s.markdown() and s.failed == [failed]


def test_mean_and_std_over_rows_that_differ_only_by_seed(sweep):
    s = summarize(find_runs([sweep]))
    by_lr = {r["optimizer.lr"]: r for r in s.seed_rows}
    assert set(by_lr) == {"0.1", "0.3"}  # lr=-1 has one (failed) run: no group
    assert by_lr["0.1"]["n"] == 2 and by_lr["0.1"]["seeds"] == "0, 1"
    mean, std = by_lr["0.1"]["knn_top1"]
    assert mean == pytest.approx(0.81) and std == pytest.approx(statistics.stdev([0.80, 0.82]))
    assert by_lr["0.3"]["linear_top1"][0] == pytest.approx(0.76)
    assert "0.8100 ± 0.0141" in s.markdown()


def test_sslrun_report_rebuilds_the_same_table(sweep, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # rich's width when not on a terminal
    written = summarize(find_runs([sweep])).write(tmp_path / "a")
    assert report_main([str(sweep), "-o", str(tmp_path / "b")]) == 0
    for f in written:
        assert (tmp_path / "b" / f.name).read_text() == f.read_text()
    rows = list(csv.DictReader((tmp_path / "b" / "summary.csv").open()))
    assert len(rows) == 5 and rows[0]["knn_top1"] == "0.8" and rows[4]["status"] == "failed"
    assert "kNN top-1" in capsys.readouterr().out


def test_bad_directories_are_explained(tmp_path, capsys):
    with pytest.raises(SslrunError, match="not a directory"):
        find_runs([tmp_path / "nope"])
    with pytest.raises(SslrunError, match="No runs in or under"):
        find_runs([tmp_path])
    assert report_main([str(tmp_path)]) == 2 and "No runs" in capsys.readouterr().err
