"""Every paper table composes, passes the config check and prints its commands (sslrun-reproduce --dry-run);
every row of every table takes its recipe's first two optimizer steps on synthetic data through the real engine
(its optimizer, lr schedule, method and views) and is evaluated and judged; sslrun-reproduce runs a row end to
end and judges it."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from first_steps import FirstSteps, warmup_cosine
from hydra import compose, initialize_config_dir
from rich.console import Console
from runner import ROOT

from sslrun.report.expected import judge
from sslrun.report.reproduce import EXPERIMENTS, load_table, main, tables

# Tiny synthetic stand-ins for the rows' datasets and backbones: what is tested is each row's recipe.
SMOKE = ["dataset=synthetic", "dataset.num_train=64", "dataset.num_test=32", "dataset.limit_train=null",
         "backbone=small_cnn", "backbone.width=8", "backbone.feat_dim=32", "trainer.epochs=1", "trainer.batch_size=32",
         "trainer.log_every=1", "eval.knn.k=5", "eval.linear.epochs=1", "monitor.knn_every=0",
         "monitor.figures.enabled=false", "monitor.knn_bank_size=32", "monitor.knn_query_size=16"]
# k-means needs fewer clusters than the 32 images; by row name, which is the method's in every table.
EXTRA = {"deepcluster": ["method.num_clusters=8"], "deepclusterv2": ["method.num_prototypes=[8,8,8]"]}
PAPER_TABLES = {"simsiam_appD", "solo_cifar10", "solo_cifar100", "moco_cifar10_demo", "lightly_cifar10", "fmnist_cpu"}
ROWS = [r.name for t in tables() for r in load_table(t)]  # every row of every table, the paper tables' and the rest
# Tables whose rows keep their backbone, tiny image folders standing in for their data (CIFAR-10 as the JPEG
# folders they were measured on): the distillation tutorial's two small CNNs are its subject (the hint loss reads
# their feature maps) and cheap at 32 px. The other tables' ResNets and ViTs become the tiny CNN.
OWN_BACKBONE = {"distillation"}


pytestmark = pytest.mark.usefixtures("one_thread")  # every run here is tiny: 32-image batches through wide heads


def compose_row(name: str, overrides: list[str] = SMOKE):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"experiment={name}", *overrides, *EXTRA.get(name.split("/")[1], [])])


def step_overrides(name: str, folder: Path) -> list[str]:
    """SMOKE less its one epoch (the row's epochs set its lr schedule, which is tested) with one batch per epoch,
    so that two steps are two epochs and the per-epoch hooks (k-means, temperature and freezing schedules) run
    for each; for the tables in OWN_BACKBONE, with its backbone and the image folders under ``folder``."""
    if name.split("/")[0] not in OWN_BACKBONE:
        return [*(o for o in SMOKE if not o.startswith(("trainer.epochs=", "dataset.num_train="))),
                "dataset.num_train=32"]
    own = [o for o in SMOKE if not o.startswith(("trainer.epochs=", "backbone", "dataset"))]
    return [*own, "dataset=imagefolder", f"dataset.train_dir={folder / 'train'}", f"dataset.val_dir={folder / 'test'}",
            "dataset.image_size=32", "dataset.num_workers=0", "dataset.cache_dir=null"]


@pytest.fixture(scope="module")
def image_folders(tmp_path_factory) -> Path:
    """``train/`` (4 images per class, 40: one batch of 32 per epoch) and ``test/`` (2 per class) of the synthetic
    set's 10 classes as 32-px PNGs in class folders: the distillation rows' CIFAR-10 folders in small."""
    from PIL import Image

    from sslrun.data.datasets import synthetic

    root = tmp_path_factory.mktemp("folders")
    data = synthetic(num_train=200, num_test=100, num_classes=10, image_size=32, channels=3, seed=0)
    for split, images, per_class in (("train", data.train, 4), ("test", data.test, 2)):
        for c in range(10):
            (root / split / f"class_{c}").mkdir(parents=True)
            for i in (images.labels == c).nonzero().flatten()[:per_class].tolist():
                image = Image.fromarray(images.images[i].permute(1, 2, 0).numpy())
                image.save(root / split / f"class_{c}" / f"{i}.png")
    return root


def test_the_paper_tables_are_all_there():
    assert PAPER_TABLES <= set(tables())
    assert len(load_table("solo_cifar10")) == 9 and len(load_table("lightly_cifar10")) == 7
    assert [r.name for r in load_table("moco_cifar10_demo")] == [f"moco_cifar10_demo/e{e}" for e in (200, 400, 800)]


@pytest.mark.parametrize("table", tables())
def test_dry_run_composes_every_row_and_prints_its_command(table, capsys):
    assert main([table, "--dry-run", "--out", "/tmp/never-written"]) == 0
    out = capsys.readouterr().out
    rows = load_table(table)
    if table == "distillation":  # checked below: the teacher runs first and its students read its run
        return
    assert [line for line in out.splitlines() if line.startswith("sslrun ")] == [
        f"sslrun experiment={r.name} hydra.run.dir=/tmp/never-written/{r.name.split('/')[1]}" for r in rows]


def test_students_run_after_their_teacher_and_read_its_run_not_an_older_one(capsys):
    """Rows run in name order, but a student (student_* < teacher) must read the teacher that this reproduction
    trains, under --out; the row's own default, outputs/distillation/teacher, may hold an older teacher."""
    assert main(["distillation", "--dry-run", "--out", "/o"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sslrun ")]
    assert lines[:2] == ["sslrun experiment=distillation/student_ce hydra.run.dir=/o/student_ce",
                         "sslrun experiment=distillation/teacher hydra.run.dir=/o/teacher"]
    assert lines[2:] == [f"sslrun experiment=distillation/student_{s} hydra.run.dir=/o/student_{s} "
                         "method.teacher=/o/teacher" for s in ("cosine", "hint", "kd")]
    assert main(["distillation", "--dry-run", "--rows", "student_kd"]) == 2  # its teacher is not being run
    assert "add teacher to --rows" in capsys.readouterr().err
    assert main(["distillation", "--dry-run", "--rows", "student_kd", "method.teacher=/t", "--out", "/o"]) == 0
    assert "method.teacher=/t" in capsys.readouterr().out  # the user's teacher wins
    assert main(["distillation", "--dry-run", "--launcher", "slurm"]) == 2  # a sweep's jobs run at once
    assert "cannot run as one sweep" in capsys.readouterr().err


def test_dry_run_through_a_launcher_is_one_sweep(capsys):
    assert main(["moco_cifar10_demo", "--dry-run", "--launcher", "slurm", "--out", "/tmp/x"]) == 0
    assert ("sslrun -m experiment=moco_cifar10_demo/e200,moco_cifar10_demo/e400,moco_cifar10_demo/e800 "
            "hydra/launcher=slurm hydra.sweep.dir=/tmp/x") in capsys.readouterr().out


_STEPPED: dict[str, tuple] = {}  # row -> step_row's result (students distil from their teacher's run directory)


def step_row(name: str, tmp_path_factory, monkeypatch, folders: Path, checkpoint: bool = False):
    """``sslrun.run.run`` of the row's config (step_overrides) with FirstSteps as its trainer, once per row: the
    row's config, its metrics, the trainer with its records and the run directory (with a checkpoint if asked).
    A row whose ``method.teacher`` is another row's run directory (``outputs/<table>/<row>``, that row's
    hydra.run.dir) distils from that row's stepped run and checkpoint, stepped first."""
    from sslrun.run import run

    done = _STEPPED.get(name)
    if done and (not checkpoint or (done[3] / "checkpoints" / "last.pt").is_file()):
        return done
    cfg = compose_row(name, step_overrides(name, folders))
    teacher = cfg.method.get("teacher")
    if teacher:
        row = "/".join(Path(teacher).parts[-2:])
        assert row in ROWS, f"{name}: method.teacher={teacher} is not the run directory of a row of its table"
        cfg.method.teacher = str(step_row(row, tmp_path_factory, monkeypatch, folders, checkpoint=True)[3])
    run_dir = tmp_path_factory.mktemp(name.replace("/", "_"))
    monkeypatch.setattr("sslrun.run.Pretrainer", FirstSteps)
    monkeypatch.setattr(FirstSteps, "checkpoint", checkpoint)
    metrics = run(cfg, run_dir, console=Console(quiet=True))
    _STEPPED[name] = cfg, metrics, FirstSteps.last, run_dir
    return _STEPPED[name]


@pytest.mark.parametrize("name", ROWS)
def test_every_row_takes_its_recipes_first_steps_and_is_judged(name, tmp_path_factory, monkeypatch, image_folders):
    cfg, m, trainer, _ = step_row(name, tmp_path_factory, monkeypatch, image_folders)
    t = cfg.trainer
    # The optimizer group's config, and a method's own named ones (distillation's hint regressor).
    optimizers = {"main": cfg.optimizer, **cfg.method.get("optimizers", {})}
    total = t.epochs * trainer.steps_per_epoch  # the row's epochs: 2 steps are the first two of hundreds
    sizes = [v.size for v in cfg.augmentation.views for _ in range(v.count)]
    assert m["steps"] == len(trainer.records) == FirstSteps.steps
    for i, rec in enumerate(trainer.records):
        # Schedules read steps / total, or the time budget's fraction when a row has one and it is further on.
        assert rec["progress"] >= i / total if t.max_minutes else rec["progress"] == i / total
        assert set(rec["groups"]) <= set(optimizers) and "main" in rec["groups"]
        for opt, groups in rec["groups"].items():
            o = optimizers[opt]
            base = o.lr * t.batch_size / 256 if o.scale_lr else o.lr  # scaled with the batch as the paper does
            factor = warmup_cosine(rec["progress"], min(1.0, o.warmup_epochs / t.epochs), o.min_lr_factor,
                                   o.warmup_start_factor)
            for base_lr, lr, fixed in groups:
                assert base_lr == pytest.approx(base), f"step {i}: optimizer {opt}'s base lr is not the row's"
                assert lr == pytest.approx(base if fixed else base * factor), \
                    f"step {i}: optimizer {opt}'s lr is not its schedule's"
        assert [(v[0], v[-1]) for v in rec["views"]] == [(t.batch_size, s) for s in sizes]  # the row's views
        assert math.isfinite(rec["loss"])
    after = trainer.method.state_dict()
    assert all(v.isfinite().all() for v in after.values() if isinstance(v, torch.Tensor) and v.is_floating_point())
    weights = [n for n, p in trainer.method.backbone.named_parameters() if p.ndim > 1]
    unmoved = [n for n in weights if torch.equal(trainer.before[f"backbone.{n}"], after[f"backbone.{n}"])]
    assert weights and not unmoved, f"the optimizer steps left these backbone weights as they were: {unmoved}"
    assert trainer.records[-1]["backbone_grad"] > 0, "the last step's loss gave the backbone no gradient"
    assert 0.0 <= m[cfg.expected.metric] <= 1.0 and cfg.expected.source.strip()  # the row's metric was measured
    assert m["reproduced"] == judge(m["expected"], m)["reproduced"]  # and run.py judged it with the same function


@pytest.mark.slow
def test_reproduce_runs_a_row_and_judges_it(tmp_path, capsys):
    rc = main(["fmnist_cpu", "--rows", "simclr", *SMOKE, "--out", str(tmp_path)])
    metrics = json.loads((tmp_path / "simclr" / "metrics.json").read_text())
    (row,) = list(csv.DictReader((tmp_path / "reproduce.csv").open()))
    verdict = judge(load_table("fmnist_cpu", ["simclr"])[0].expected, metrics)
    assert float(row["got"]) == metrics["knn_top1"] and row["reproduced"] == str(verdict["reproduced"])
    assert rc == (0 if verdict["reproduced"] else 1)
    assert "| row | metric | expected | got | delta | minutes | reproduced? | source |" in \
        (tmp_path / "reproduce.md").read_text()
    before = (tmp_path / "reproduce.csv").read_text()
    assert main(["fmnist_cpu", "--rows", "simclr", *SMOKE, "--out", str(tmp_path), "--collect"]) == rc
    assert (tmp_path / "reproduce.csv").read_text() == before  # --collect judges the same runs the same way


def test_bad_table_or_row_is_explained(capsys):
    assert main(["no_such_table"]) == 2 and "No table 'no_such_table'" in capsys.readouterr().err
    assert main(["fmnist_cpu", "--rows", "nope"]) == 2 and "has no row nope" in capsys.readouterr().err
    assert main(["fmnist_cpu", "--collect"]) == 2 and "give their directory with --out" in capsys.readouterr().err
    assert EXPERIMENTS.is_dir()


def test_a_misspelled_override_is_named_with_the_key_it_likely_meant(capsys):
    assert main(["fmnist_cpu", "--dry-run", "--rows", "simclr", "trainer.epoch=3"]) == 2
    assert "did you mean trainer.epochs?" in capsys.readouterr().err
