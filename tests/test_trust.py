"""Issue 8's faults, replayed through the command as a user runs it: no wrong answer with exit 0, no lost work.

Each test here failed before its fix: a rerun into a finished run directory reported the old run's numbers, a
changed lr was "resumed", two runs shared a directory, eval.only dropped dataset overrides, SIGTERM and Ctrl-C
lost the work since the last checkpoint, and Hydra's own config errors exited 1.
"""

import errno
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf
from runner import FAST, ROOT, compose, read_metrics, sslrun

from sslrun.checkpoint import save_checkpoint
from sslrun.config_check import check_config
from sslrun.errors import SslrunError, explain

LONG = [*FAST, "method=simclr", "dataset.num_train=1024", "trainer.epochs=4", "monitor.figures.enabled=false"]


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sslrun.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_training(proc: subprocess.Popen) -> None:
    """Block until the run prints its first progress line (a step has been taken)."""
    for line in proc.stdout:
        if line.startswith("epoch "):
            return
    raise AssertionError(f"the run ended before training: {proc.wait()} {proc.stderr.read()}")


@pytest.mark.slow
def test_rerun_into_a_finished_run_or_with_a_changed_lr_is_refused(tmp_path):
    sslrun(*FAST, "method=simclr", f"hydra.run.dir={tmp_path}")
    before = (tmp_path / "metrics.json").read_text()
    same = sslrun(*FAST, "method=simclr", f"hydra.run.dir={tmp_path}", check=False)
    assert same.returncode == 2 and "finished run" in same.stderr and "Traceback" not in same.stderr
    lr = sslrun(*FAST, "method=simclr", "optimizer.lr=0.5", f"hydra.run.dir={tmp_path}", check=False)
    assert lr.returncode == 2 and "optimizer.lr" in lr.stderr and "trainer.resume_force" in lr.stderr
    assert (tmp_path / "metrics.json").read_text() == before  # the first run's results are untouched
    assert OmegaConf.load(tmp_path / ".hydra" / "overrides.yaml") == OmegaConf.create([*FAST, "method=simclr"])


@pytest.mark.slow
def test_a_sweep_into_an_old_sweep_directory_does_not_report_the_old_runs(tmp_path):
    sslrun("-m", *FAST, "method=simclr", "optimizer.lr=0.05", f"hydra.sweep.dir={tmp_path}")
    old = read_metrics(tmp_path / "0")
    proc = sslrun("-m", *FAST, "method=simclr", "optimizer.lr=0.5", f"hydra.sweep.dir={tmp_path}", check=False)
    assert "optimizer.lr" in proc.stderr  # the job was refused, naming the key
    assert read_metrics(tmp_path / "0") == old
    assert OmegaConf.load(tmp_path / "0" / ".hydra" / "config.yaml").optimizer.lr == 0.05
    # The sweep's summary reports the refused job as failed, under its own overrides, without the old figures.
    assert proc.returncode == 2
    summary = (tmp_path / "summary.csv").read_text()
    assert "failed" in summary and str(old["knn_top1"]) not in summary


@pytest.mark.slow
def test_a_second_run_in_a_busy_directory_is_refused(tmp_path):
    first = start(*LONG, "trainer.epochs=400", f"hydra.run.dir={tmp_path}")  # still running when the second comes
    try:
        wait_for_training(first)
        second = sslrun(*FAST, "method=byol", f"hydra.run.dir={tmp_path}", check=False)
        assert second.returncode == 2 and "Another sslrun run" in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    cfg = OmegaConf.load(tmp_path / ".hydra" / "config.yaml")
    assert cfg.method._target_.endswith("SimCLR")  # the refused run wrote nothing into the directory


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_a_checkpoint_and_the_rerun_continues(sig, code, tmp_path):
    proc = start(*LONG, f"hydra.run.dir={tmp_path}")
    wait_for_training(proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code and "Traceback" not in err
    ck = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    assert 0 < ck["state"]["step"] < 4 * 16  # saved where it stopped, mid-run
    again = sslrun(*LONG, f"hydra.run.dir={tmp_path}")
    assert f"Resumed at epoch {ck['state']['epoch']}, step {ck['state']['step']}" in again.stdout
    m = read_metrics(tmp_path)
    assert m["steps"] == 4 * 16 and m["eval_seconds"] >= 0 and m["imgs_per_s"] > 0


@pytest.mark.slow
def test_kill_9_at_random_moments_then_rerun_equals_the_uninterrupted_run(tmp_path):
    args = [*LONG, "trainer.epochs=3", "trainer.checkpoint_every=1", "eval.linear.enabled=false"]
    sslrun(*args, f"hydra.run.dir={tmp_path / 'straight'}")
    killed = tmp_path / "killed"
    for delay in (0.0, 0.7):  # two kills at different moments of the same run
        proc = start(*args, f"hydra.run.dir={killed}")
        ckpt = killed / "checkpoints" / "last.pt"
        deadline = time.time() + 120
        while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(delay)
        proc.kill()
        proc.wait()
    sslrun(*args, f"hydra.run.dir={killed}")
    a, b = (torch.load(d / "checkpoints" / "last.pt", weights_only=False) for d in (tmp_path / "straight", killed))
    assert a["state"] == b["state"]
    assert all(torch.equal(v, b["method"][k]) if torch.is_tensor(v) else v == b["method"][k]
               for k, v in a["method"].items())
    assert read_metrics(killed)["knn_top1"] == read_metrics(tmp_path / "straight")["knn_top1"]


@pytest.mark.slow
def test_eval_only_merges_dataset_overrides_and_matches_the_training_run(tmp_path):
    train = tmp_path / "train"
    sslrun(*FAST, "method=simclr", f"hydra.run.dir={train}")
    ckpt = train / "checkpoints" / "last.pt"
    same = tmp_path / "same"
    sslrun("eval.only=true", f"eval.checkpoint={ckpt}", f"hydra.run.dir={same}")  # the stored probe settings
    assert read_metrics(same)["linear_top1"] == read_metrics(train)["linear_top1"]
    assert OmegaConf.load(same / ".hydra" / "config.yaml").method.proj_hidden_dim == 64  # the trained config
    limited = tmp_path / "limited"
    sslrun("eval.only=true", f"eval.checkpoint={ckpt}", "dataset.limit_test=100", f"hydra.run.dir={limited}")
    used = OmegaConf.load(limited / ".hydra" / "config.yaml")
    assert used.dataset.name == "synthetic" and used.dataset.limit_test == 100 and used.dataset.num_train == 256
    assert read_metrics(limited)["dataset"] == "synthetic"


@pytest.mark.parametrize("args,words", [
    (["--no-such-flag"], ["unrecognized arguments"]),
    (["trainer.epoch=3"], ["did you mean trainer.epochs?", "nothing reads it"]),
    (["eval.knn.kk=3"], ["did you mean eval.knn.k?"]),  # a nested key too
    (["+trainer.epoch=3"], ["trainer.epoch", "Did you mean trainer.epochs"]),
    (["+foo=1"], ["foo is not a config group"]),
    (["+optimizer.lrr=0.1"], ["optimizer.lrr is not a setting of torch.optim"]),
    (["+backbone.widht=3"], ["backbone.widht is not a setting"]),
    (["trainer.batch_size=1"], ["at least 2"]),  # refused after .hydra/ and the curves file were written
])
def test_config_errors_exit_2_and_leave_no_run_directory(args, words, tmp_path):
    proc = sslrun(*FAST, *args, f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2
    for w in words:
        assert w in proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_key_set_for_another_choice_of_the_group_is_named(tmp_path):
    """imagefolder's train_dir under dataset=synthetic (as an experiment for image folders, given another dataset,
    would set it) is named, not a TypeError."""
    proc = sslrun(*FAST, "+dataset.train_dir=/data/train", f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "dataset.train_dir is not a setting of sslrun.data.datasets.synthetic" in proc.stderr
    assert "~dataset.train_dir" in proc.stderr and not (tmp_path / "run").exists()


def test_a_run_directory_that_cannot_be_made_is_one_paragraph():
    proc = sslrun(*FAST, "hydra.run.dir=/proc/sslrun-test/run", check=False)
    assert proc.returncode == 2 and "cannot be made" in proc.stderr and "Traceback" not in proc.stderr


def test_disk_and_memory_failures_are_explained_and_leave_no_temp_file(tmp_path, monkeypatch):
    def full_disk(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "last.pt"))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError) as e:
        save_checkpoint({"backbone": {}}, tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []  # no .last.pt.tmp left behind
    assert "disk is full" in explain(e.value)
    assert "read-only" in explain(OSError(errno.EROFS, "Read-only file system"))
    assert "trainer.batch_size" in explain(MemoryError())
    assert explain(ValueError("a bug")) is None  # bugs keep their traceback


@pytest.mark.slow
def test_eval_only_of_a_method_that_evaluates_its_own_network(tmp_path):
    # CMC evaluates its two Lab encoders, not the configured backbone: eval.only rebuilds them from the checkpoint.
    args = [o for o in FAST if not o.startswith("method.")] + ["method=cmc", "monitor.figures.enabled=false"]
    sslrun(*args, f"hydra.run.dir={tmp_path / 'train'}")
    sslrun("eval.only=true", f"eval.checkpoint={tmp_path / 'train' / 'checkpoints' / 'last.pt'}",
           "eval.linear.epochs=3", "monitor.figures.enabled=false", f"hydra.run.dir={tmp_path / 'eval'}")
    trained, evaluated = read_metrics(tmp_path / "train"), read_metrics(tmp_path / "eval")
    assert (evaluated["knn_top1"], evaluated["linear_top1"]) == (trained["knn_top1"], trained["linear_top1"])


@pytest.mark.slow
def test_resume_force_trains_on_with_the_new_hyperparameters(tmp_path):
    sslrun(*FAST, "method=simclr", f"hydra.run.dir={tmp_path}")
    sslrun(*FAST, "method=simclr", "optimizer.lr=0.6", "trainer.resume_force=true", "trainer.epochs=2",
           f"hydra.run.dir={tmp_path}")
    ck = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    assert {g["base_lr"] for g in ck["optimizer"]["main"]["param_groups"]} == {0.6 * 64 / 256}


@pytest.mark.parametrize(("args", "message"), [
    (["method=simclr", "method.temperature=0"], "method.temperature=0 must be positive"),
    (["method=dino", "method.teacher_temp=-0.1"], "method.teacher_temp=-0.1 must be positive"),
    (["method=distill", "method.soft_weight=-1"], "method.soft_weight=-1 must be at least 0"),
    (["method=vae", "method.beta=-1"], "method.beta=-1 must be at least 0"),
    (["method=distill", "method.embed_queue=2.5"], "method.embed_queue=2.5 must be an integer"),
])
def test_method_keys_out_of_their_range_are_refused_before_any_work(args, message):
    """A temperature of 0 divides into NaN (a message that blames the lr); a negative weight or beta maximises
    its loss; both would train with exit 0 otherwise."""
    with pytest.raises(SslrunError, match=message):
        check_config(compose(*args))


@pytest.mark.parametrize("method", sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml")
                                          if p.stem != "default"))
def test_every_methods_own_defaults_are_in_range(method):
    check_config(compose(f"method={method}"))


def test_a_key_whose_default_is_missing_is_not_taken_for_a_misspelling():
    """imagetext's train_file is ??? (to be given): OmegaConf's `in` says False for it, the key list does not."""
    from sslrun.config_check import misspelled_override

    assert misspelled_override(["dataset=imagetext", "dataset.train_file=/x.csv"]) is None
    assert "did you mean dataset.train_file?" in misspelled_override(["dataset=imagetext", "dataset.train_fil=/x"])
    # A config of the user's own (another search path or primary config) may add keys: Hydra alone judges those.
    assert misspelled_override(["hydra.searchpath=[file:///my/conf]", "method.my_key=1"]) is None
    assert misspelled_override(["--config-dir=/my/conf", "method.my_key=1"]) is None


def test_eval_only_of_a_backbone_trained_on_other_images_is_one_paragraph(tmp_path):
    """The teacher probe's sibling entry point: a 1-channel checkpoint evaluated on 3-channel images crashed with a
    traceback (exit 1) in feature extraction."""
    sslrun(*FAST, "dataset.channels=1", "monitor.figures.enabled=false", f"hydra.run.dir={tmp_path / 'gray'}")
    proc = sslrun("eval.only=true", f"eval.checkpoint={tmp_path / 'gray' / 'checkpoints' / 'last.pt'}",
                  "dataset.channels=3", f"hydra.run.dir={tmp_path / 'eval'}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "cannot take 3-channel 32-px images" in proc.stderr and "trained on dataset synthetic (1 channel(s)" in proc.stderr
    assert not (tmp_path / "eval").exists()
