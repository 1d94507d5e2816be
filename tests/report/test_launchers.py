"""The [sweep] extra: conf/hydra/launcher/local.yaml (submitit, a process per job; slurm.yaml's twin) runs a
2-job sweep here, and conf/hydra/sweeper/optuna_lr.yaml searches lr / weight decay / temperature."""

import csv
import importlib.util
import json
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf
from runner import FAST, ROOT

SMALL = [*FAST, "eval.linear.epochs=1", "monitor.knn_every=0", "monitor.figures.enabled=false"]


def need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed: pip install -e '.[sweep]' (CI installs it)")


def sslrun_m(*args, sweep_dir):
    return subprocess.run([sys.executable, "-m", "sslrun.cli", "-m", *args, f"hydra.sweep.dir={sweep_dir}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})


@pytest.mark.slow
def test_a_two_job_sweep_through_submitit_local(tmp_path):
    need("hydra_plugins.hydra_submitit_launcher")
    proc = sslrun_m(*SMALL, "hydra/launcher=local", "trainer.seed=0,1", sweep_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.parent.name for p in tmp_path.glob("*/metrics.json")) == ["0", "1"]
    assert list(tmp_path.glob(".submitit/*/*_result.pkl"))  # the jobs really ran through submitit
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [(r["trainer.seed"], r["status"]) for r in rows] == [("0", "ok"), ("1", "ok")]


def test_the_slurm_launcher_config_composes_with_one_task_per_gpu():
    need("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition
    assert launcher.tasks_per_node == launcher.gpus_per_node and launcher.nodes >= 1 and launcher.timeout_min > 0


@pytest.mark.slow
def test_optuna_searches_lr_weight_decay_and_temperature(tmp_path):
    need("hydra_plugins.hydra_optuna_sweeper")
    proc = sslrun_m(*SMALL, "hydra/sweeper=optuna_lr", "hydra.sweeper.n_trials=2", sweep_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    knn = [json.loads((tmp_path / str(i) / "metrics.json").read_text())["knn_top1"] for i in range(2)]
    best = OmegaConf.load(tmp_path / "optimization_results.yaml")
    assert best.best_value == pytest.approx(max(knn))  # each trial returned its knn_top1 (the callback's objective)
    assert set(best.best_params) == {"optimizer.lr", "optimizer.weight_decay", "method.temperature"}
    assert 0.01 <= best.best_params["optimizer.lr"] <= 1.0 and 0.05 <= best.best_params["method.temperature"] <= 0.5
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert len(rows) == 2 and {"optimizer.lr", "optimizer.weight_decay", "method.temperature"} <= set(rows[0])
