from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from rich.console import Console
from runner import FAST, ROOT
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sslrun.run import run


def losses(run_dir: Path) -> list[float]:
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return [e.value for e in acc.Scalars("train/loss")]


@pytest.mark.slow
def test_same_seed_same_loss_curve_on_cpu(tmp_path):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*FAST, "method=simclr", "trainer.epochs=2", "eval.linear.enabled=false",
                                           "monitor.knn_every=0"])
        other = compose("config", overrides=[*FAST, "method=simclr", "trainer.epochs=2", "eval.linear.enabled=false",
                                             "monitor.knn_every=0", "trainer.seed=1"])
    curves = []
    for name, c in (("a", cfg), ("b", cfg), ("c", other)):
        (tmp_path / name).mkdir()
        run(c, tmp_path / name, console=Console(quiet=True))
        curves.append(losses(tmp_path / name))
    assert len(curves[0]) == 2 * (256 // 64)
    assert curves[0] == curves[1]
    assert curves[0] != curves[2]  # the seed matters
