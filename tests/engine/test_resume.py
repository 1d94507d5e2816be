"""A resume continues the stored run only under the stored config; a finished run is never silently resumed."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from runner import FAST, compose

from sslrun.engine.resume import changed_keys, check_resumable, finished_message
from sslrun.errors import SslrunError


def _ck(cfg, epoch=1, seconds=10.0):
    return {"config": OmegaConf.to_container(cfg, resolve=True), "state": {"epoch": epoch, "step": 4},
            "seconds": seconds}


def test_changed_training_keys_are_refused_and_named():
    old = compose(*FAST, "method=simclr")
    new = compose(*FAST, "method=simclr", "optimizer.lr=0.5", "method.temperature=0.5", "trainer.batch_size=32")
    with pytest.raises(SslrunError) as e:
        check_resumable(_ck(old), OmegaConf.to_container(new, resolve=True), Path("x/last.pt"), force=False)
    msg = str(e.value)
    for key in ("optimizer.lr", "method.temperature", "trainer.batch_size", "trainer.resume_force=true"):
        assert key in msg
    check_resumable(_ck(old), OmegaConf.to_container(new, resolve=True), Path("x"), force=True)  # forced: accepted


def test_safe_keys_may_change():
    old = compose(*FAST, "method=simclr")
    new = compose(*FAST, "method=simclr", "trainer.epochs=5", "eval.linear.epochs=7", "trainer.log_every=3",
                  "monitor.figures.enabled=false")
    assert changed_keys(_ck(old)["config"], OmegaConf.to_container(new, resolve=True)) == []


def test_another_methods_checkpoint_is_named_in_one_line():
    old, new = compose(*FAST, "method=simclr"), compose(*FAST, "method=byol")
    with pytest.raises(SslrunError) as e:
        check_resumable(_ck(old), OmegaConf.to_container(new, resolve=True), Path("x"), force=True)
    assert "SimCLR" in str(e.value) and "BYOL" in str(e.value) and "\n" not in str(e.value)


def test_a_finished_run_is_not_resumed_unless_the_budget_grows():
    cfg = compose(*FAST, "trainer.epochs=1")
    assert "finished run" in finished_message(_ck(cfg, epoch=1), cfg.trainer, Path("x"))
    longer = compose(*FAST, "trainer.epochs=2")
    assert finished_message(_ck(cfg, epoch=1), longer.trainer, Path("x")) is None
    timed = compose(*FAST, "trainer.epochs=100", "trainer.max_minutes=0.1")
    assert "max_minutes" in finished_message(_ck(timed, epoch=1, seconds=6.0), timed.trainer, Path("x"))
    more_time = compose(*FAST, "trainer.epochs=100", "trainer.max_minutes=1")
    assert finished_message(_ck(timed, epoch=1, seconds=6.0), more_time.trainer, Path("x")) is None
