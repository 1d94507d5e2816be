"""End-to-end: the sslrun command as a user runs it, on synthetic data and a Fashion-MNIST subset."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from runner import FAST, read_metrics, sslrun
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

FMNIST = Path("/usr/share/datasets/fashion-mnist")
TAGS = {"train/loss", "train/lr", "grad/l2_total", "grad/linf/first_layer", "grad/linf/last_layer", "grad/spikes",
        "collapse/std", "collapse/std_ref", "monitor/knn_top1", "perf/imgs_per_s"}


def scalars(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return acc


@pytest.mark.slow
def test_pretrain_and_evaluate_writes_the_run_directory(tmp_path):
    proc = sslrun("method=simsiam", *FAST, "trainer.epochs=2", f"hydra.run.dir={tmp_path}")
    assert "knn_top1" in proc.stdout  # the results table
    assert (tmp_path / ".hydra" / "config.yaml").is_file()
    assert list(tmp_path.glob("events.out.tfevents.*"))
    assert (tmp_path / "checkpoints" / "last.pt").is_file()
    m = read_metrics(tmp_path)
    for key in ("knn_top1", "knn_top5", "linear_top1", "linear_top5", "epochs", "seconds", "imgs_per_s", "device"):
        assert key in m
    assert m["epochs"] == 2 and 0.0 <= m["knn_top1"] <= 1.0 and m["imgs_per_s"] > 0
    assert TAGS <= set(scalars(tmp_path).Tags()["scalars"])


@pytest.mark.slow
def test_eval_only_from_checkpoint_and_corrupt_checkpoint(tmp_path):
    train_dir = tmp_path / "train"
    sslrun("method=simclr", *FAST, f"hydra.run.dir={train_dir}")
    ckpt = train_dir / "checkpoints" / "last.pt"
    first = read_metrics(train_dir)
    # The backbone and dataset come from the checkpoint: no need to repeat them.
    eval_dir = tmp_path / "eval"
    sslrun("eval.only=true", f"eval.checkpoint={ckpt}", "eval.linear.epochs=3", f"hydra.run.dir={eval_dir}")
    again = read_metrics(eval_dir)
    assert again["knn_top1"] == pytest.approx(first["knn_top1"], abs=1e-6)  # same features, same kNN
    bad = tmp_path / "bad.pt"
    bad.write_bytes(ckpt.read_bytes()[:1000])
    proc = sslrun("eval.only=true", f"eval.checkpoint={bad}", f"hydra.run.dir={tmp_path / 'e2'}", check=False)
    assert proc.returncode == 2 and "could not be read" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_multirun_sweeps_each_job_into_its_own_directory(tmp_path):
    sslrun("-m", "method=simclr,simsiam", *FAST, f"hydra.sweep.dir={tmp_path}")
    runs = sorted(p.parent for p in tmp_path.glob("*/metrics.json"))
    assert len(runs) == 2
    methods = {o for r in runs for o in OmegaConf.load(r / ".hydra" / "overrides.yaml") if o.startswith("method=")}
    assert methods == {"method=simclr", "method=simsiam"}


@pytest.mark.slow
def test_resume_continues_from_last_checkpoint(tmp_path):
    sslrun("method=simclr", *FAST, f"hydra.run.dir={tmp_path}")
    proc = sslrun("method=simclr", *FAST, "trainer.epochs=2", f"hydra.run.dir={tmp_path}")
    assert "Resumed at epoch 1" in proc.stdout
    m = read_metrics(tmp_path)
    assert m["epochs"] == 2
    ck = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    assert ck["state"]["epoch"] == 2 and ck["state"]["step"] == 2 * (256 // 64)


@pytest.mark.slow
def test_max_minutes_bounds_pretraining(tmp_path):
    sslrun("method=simclr", *FAST, "trainer.epochs=1000", "trainer.max_minutes=0.05", "monitor.knn_every=0",
           f"hydra.run.dir={tmp_path}")
    m = read_metrics(tmp_path)
    assert m["stopped_by"] == "max_minutes" and m["epochs"] < 1000 and m["seconds"] < 3 + 10


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_subset_end_to_end(tmp_path):
    sslrun("method=simclr", "dataset=fashion_mnist", "dataset.limit_train=1024", "dataset.limit_test=256",
           "backbone=small_cnn", "trainer.batch_size=128", "trainer.epochs=1", "eval.linear.epochs=5",
           f"hydra.run.dir={tmp_path}")
    m = read_metrics(tmp_path)
    assert m["knn_top1"] > 0.3  # 10 classes: well above chance even after one short epoch
