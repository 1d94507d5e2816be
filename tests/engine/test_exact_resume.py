"""Stopped mid-epoch by a signal and started again, every method ends exactly where an uninterrupted run
ends: the checkpoint holds every piece of state a step reads (weights, optimizer, queues and banks, the
views' generator and the global random streams that key shuffles and re-initialisations draw from)."""

import os
import signal

import pytest
import torch
from omegaconf import OmegaConf
from rich.console import Console
from runner import FAST, ROOT, compose, write_caption_set
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sslrun.engine.signals import StopRequested
from sslrun.monitor.recorder import TrainingMonitor
from sslrun.run import run

METHODS = sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml"))
STOP_AT = 6  # of 2 epochs x 4 steps: mid-epoch, after the epoch-1 checkpoint


SIZE_WORDS = ("dim", "queue", "prototypes", "nce_k", "pcl_r", "clusters", "length")


def shrink(node) -> None:
    """Every head width, queue, bank and cluster count of the method made small (the test is about state, not
    scale): ints of 64 or more under keys naming a size become 32."""
    for key in list(node.keys()):
        value = node[key]
        if any(w in str(key) for w in SIZE_WORDS):
            if isinstance(value, int) and not isinstance(value, bool) and value >= 64:
                node[key] = 32
            elif OmegaConf.is_list(value):
                node[key] = [min(v, 32) if isinstance(v, int) else v for v in value]


def tiny(method: str, data_dir):
    if method == "clip":  # learns from image-caption pairs: a tiny captioned set in the real CSV layout
        write_caption_set(data_dir, 64, label=True)
        return compose("method=clip", "dataset=imagetext", f"dataset.train_file={data_dir / 'train.csv'}",
                       f"dataset.test_file={data_dir / 'test.csv'}", "dataset.image_size=16", "dataset.num_workers=0",
                       "backbone=small_cnn", "backbone.width=8", "backbone.feat_dim=32", "method.embed_dim=16",
                       "method.text_width=32", "method.text_layers=1", "method.text_heads=2", "trainer.batch_size=16",
                       "trainer.epochs=2", "trainer.checkpoint_every=1", "trainer.log_every=1",
                       "eval.knn.enabled=false", "eval.linear.enabled=false", "monitor.figures.enabled=false",
                       "monitor.knn_every=0")
    has_proj = "proj_hidden_dim" in OmegaConf.load(ROOT / "conf" / "method" / f"{method}.yaml").get("method", {})
    fast = [o for o in FAST if has_proj or not o.startswith("method.proj_hidden_dim")]
    if method == "distill":  # distils an earlier run: a tiny supervised teacher first
        run(tiny("supervised", data_dir), data_dir / "teacher", console=Console(quiet=True))
        fast.append(f"method.teacher={data_dir / 'teacher'}")
    cfg = compose(*fast, f"method={method}", "dataset.num_train=64", "dataset.num_test=32", "trainer.batch_size=16",
                  "trainer.epochs=2", "trainer.checkpoint_every=1", "eval.knn.enabled=false",
                  "eval.linear.enabled=false", "monitor.figures.enabled=false", "monitor.knn_every=0")
    shrink(cfg.method)
    return cfg


def final_state(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["method"]


@pytest.mark.parametrize("method", METHODS)
def test_signal_then_resume_equals_uninterrupted(method, tmp_path, monkeypatch):
    if method == "clip":
        pytest.importorskip("open_clip")
    cfg = tiny(method, tmp_path / "data")
    quiet = Console(quiet=True)
    run(cfg, tmp_path / "straight", console=quiet)

    after_step = TrainingMonitor.after_step

    def stop_once(self, state, *args, **kwargs):
        if state.step == STOP_AT and not getattr(stop_once, "sent", False):
            stop_once.sent = True
            os.kill(os.getpid(), signal.SIGTERM)
        return after_step(self, state, *args, **kwargs)

    monkeypatch.setattr(TrainingMonitor, "after_step", stop_once)
    with pytest.raises(StopRequested):
        run(cfg, tmp_path / "stopped", console=quiet)
    stopped = torch.load(tmp_path / "stopped" / "checkpoints" / "last.pt", weights_only=False)
    assert stopped["state"]["step"] == STOP_AT
    run(cfg, tmp_path / "stopped", console=quiet)

    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "stopped")
    assert a.keys() == b.keys()
    same = {k: torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a}  # extra state: dicts
    different = [k for k, ok in same.items() if not ok]
    assert not different, f"{method}: resumed state differs in {different[:5]}"
    # TensorBoard: the resumed run's steps follow on, none written twice.
    acc = EventAccumulator(str(tmp_path / "stopped"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == list(range(1, 9))
