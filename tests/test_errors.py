"""Bad input stops before any training with one clear message and a non-zero exit, never a traceback."""

import pytest
from runner import FAST, sslrun


def fails(*args, tmp_path):
    proc = sslrun(*args, f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    return proc.stderr


def test_unknown_group_option_lists_the_choices(tmp_path):
    err = fails("method=nosuch", tmp_path=tmp_path)
    assert "method/nosuch" in err and "simclr" in err and "simsiam" in err


@pytest.mark.parametrize("override,words", [
    ("optimizer.lr=-0.1", ["optimizer.lr", "positive"]),
    ("optimizer.lr=abc", ["optimizer.lr", "must be a number"]),
    ("trainer.epochs=0", ["trainer.epochs", "positive"]),
    ("trainer.precision=fp8", ["trainer.precision", "bf16"]),
])
def test_bad_values_name_the_key(override, words, tmp_path):
    err = fails(*FAST, override, tmp_path=tmp_path)
    for w in words:
        assert w in err


def test_batch_larger_than_dataset(tmp_path):
    err = fails(*FAST, "trainer.batch_size=4096", tmp_path=tmp_path)
    assert "trainer.batch_size=4096" in err and "256" in err


def test_missing_dataset_says_where_and_how(tmp_path):
    err = fails("dataset=cifar10", f"dataset.root={tmp_path / 'nowhere'}", "dataset.download=false",
                tmp_path=tmp_path)
    assert "nowhere" in err and "dataset.root" in err and "fashion_mnist" in err


def test_non_finite_loss_stops_with_the_step(tmp_path):
    err = fails(*FAST, "method=simclr", "optimizer.lr=1e30", "trainer.epochs=3", tmp_path=tmp_path)
    assert "non-finite" in err and "step" in err and "optimizer.lr" in err


def test_eval_only_needs_a_checkpoint(tmp_path):
    err = fails("eval.only=true", tmp_path=tmp_path)
    assert "eval.checkpoint" in err
