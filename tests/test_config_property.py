"""Property test of the config layer (issue 8): random overrides of random types and values either run
cleanly or stop with sslrun's one-paragraph error (or Hydra's own config error, which the CLI turns into
exit 2), never with any other exception."""

import pytest
from hydra.errors import HydraException
from hydra.utils import instantiate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console
from runner import FAST, compose

from sslrun.errors import SslrunError
from sslrun.run import run

# Integers up to 40: past the 32-image bank, yet every run stays a few seconds long.
VALUES = st.one_of(st.integers(-3, 40), st.floats(-2, 2), st.sampled_from([float("nan"), float("inf")]),
                   st.sampled_from(["abc", "", "null", "true", "[1,2]", "[1.5,2]", "[0.2,0.1]", "{a:1}", "auto"]))
KEYS = st.sampled_from([
    "trainer.epochs", "trainer.batch_size", "trainer.precision", "trainer.log_every", "trainer.max_minutes",
    "trainer.seed", "trainer.checkpoint_every", "optimizer.lr", "optimizer.weight_decay", "optimizer.warmup_epochs",
    "eval.knn.k", "eval.knn.temperature", "eval.linear.epochs", "eval.batch_size", "monitor.spike_factor",
    "monitor.on_spike", "augmentation.views.0.count", "augmentation.views.0.size", "augmentation.views.0.scale",
    "augmentation.views.0.hflip", "dataset.num_train", "dataset.limit_test", "method.temperature",
    "+trainer.epoch", "+eval.knn.kk"])
GROUPS = st.sampled_from(["method=simclr", "method=byol", "method=swav", "method=barlow", "method=nosuch",
                          "optimizer=adamw", "optimizer=lars", "augmentation=minimal", "backbone=nosuch"])


def override(key: str, value) -> str:
    return f"{key}={value}"


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pairs=st.lists(st.tuples(KEYS, VALUES), max_size=3), group=st.one_of(st.none(), GROUPS))
def test_random_overrides_run_or_fail_cleanly(pairs, group, tmp_path_factory):
    overrides = [*FAST, "dataset.num_train=32", "dataset.num_test=16", "trainer.batch_size=8", "trainer.epochs=1",
                 "eval.linear.epochs=1", "monitor.figures.enabled=false", "monitor.knn_every=0",
                 *([group] if group else []), *(override(k, v) for k, v in pairs)]
    try:
        cfg = compose(*overrides)
    except (HydraException, OmegaConfBaseException):
        return  # Hydra's own config error: the CLI prints it and exits 2 (tests/test_trust.py)
    try:
        run(cfg, tmp_path_factory.mktemp("run"), overrides, Console(quiet=True))
    except SslrunError as e:
        assert str(e) and "\n" not in str(e).strip(), f"the error is not one paragraph: {e}"
