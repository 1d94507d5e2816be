"""sslrun-plot: curves of several real runs on shared axes, in one PNG."""

import subprocess
import sys

import pytest
import tomllib
from hydra import compose, initialize_config_dir
from PIL import Image
from rich.console import Console
from runner import FAST, ROOT

from sslrun.monitor.plot import find_runs, labels, load_run, main
from sslrun.run import run


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two small real runs, laid out as a Hydra multirun: <sweep>/0_..., <sweep>/1_..."""
    root = tmp_path_factory.mktemp("sweep")
    for i, sg in enumerate(("true", "false")):
        overrides = ["method=simsiam", f"method.stop_gradient={sg}", "trainer.epochs=2", "monitor.knn_every_steps=2",
                     "monitor.figures.enabled=false", "eval.linear.enabled=false", "monitor.spike_min_history=2",
                     "monitor.spike_factor=1.01"]  # factor ~1: a few spikes to mark
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=[*FAST, *overrides])
        run_dir = root / f"{i}_method.stop_gradient={sg}"
        run(cfg, run_dir, overrides, console=Console(quiet=True))  # writes .hydra/overrides.yaml, as a sweep job
    return root


def test_plot_of_two_real_runs_is_a_png(sweep, tmp_path, capsys):
    out = tmp_path / "both.png"
    assert main([str(sweep), "-o", str(out), "--panels", "loss,std,knn,grad,rank,std_backbone,lr"]) == 0
    with Image.open(out) as im:
        im.verify()
    printed = capsys.readouterr().out
    assert "2 run(s)" in printed and "method.stop_gradient=true" in printed and "method.stop_gradient=false" in printed


def test_runs_found_in_order_and_labelled_by_what_differs(sweep):
    runs = find_runs([sweep])
    assert [r.name for r in runs] == ["0_method.stop_gradient=true", "1_method.stop_gradient=false"]
    assert find_runs([runs[1], sweep]) == [runs[1], runs[0]]  # each run once, in the order given
    assert labels(runs) == ["method.stop_gradient=true", "method.stop_gradient=false"]


def test_run_curves_and_spikes_are_read_back(sweep):
    r = load_run(find_runs([sweep])[0], "a")
    steps, values = r.scalars["train/loss"]
    assert list(steps) == list(range(1, 9)) and len(values) == 8
    assert list(r.scalars["monitor/knn_top1_steps"][0]) == [2, 4, 6, 8]
    assert r.spikes and all({"step", "layer", "value"} <= set(s) for s in r.spikes)  # from metrics.json


def test_bad_arguments_exit_with_a_message_not_a_traceback(tmp_path):
    for args, words in ((["/no/such/dir"], "not a directory"), ([str(tmp_path)], "no TensorBoard event files")):
        proc = subprocess.run([sys.executable, "-m", "sslrun.monitor.plot", *args], capture_output=True, text=True)
        assert proc.returncode != 0 and words in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--panels", "nosuch"])


def test_console_script_is_declared():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["sslrun-plot"] == "sslrun.monitor.plot:main"
