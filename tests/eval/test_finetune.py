from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from runner import FAST, read_metrics, sslrun

from sslrun.backbones.small_cnn import SmallCNN
from sslrun.data.datasets import synthetic
from sslrun.errors import SslrunError
from sslrun.eval.finetune import balanced_subset, finetune_eval, fraction_key

DEFAULTS = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / "eval" / "default.yaml").finetune


def finetune_cfg(**overrides):
    return OmegaConf.merge(DEFAULTS, overrides)


def test_subsets_are_class_balanced_and_fixed_by_the_seed():
    labels = torch.arange(1000) % 10            # 100 images per class
    labels[::7] = -1                            # unlabeled images are never picked
    for fraction, per_class in ((0.01, 1), (0.1, 9)):  # round(fraction * 857 / 10)
        index = balanced_subset(labels, fraction, seed=0)
        picked = labels[index]
        assert (picked >= 0).all()
        assert torch.bincount(picked, minlength=10).tolist() == [per_class] * 10
        assert len(index.unique()) == len(index)
        assert torch.equal(index, balanced_subset(labels, fraction, seed=0))
        assert not torch.equal(index, balanced_subset(labels, fraction, seed=1))


def test_a_small_class_gives_all_it_has_and_bad_fractions_are_refused():
    labels = torch.tensor([0] * 50 + [1] * 3)
    assert torch.bincount(labels[balanced_subset(labels, 0.5, seed=0)]).tolist() == [13, 3]
    with pytest.raises(SslrunError, match="fraction"):
        balanced_subset(labels, 1.5, seed=0)
    with pytest.raises(SslrunError, match="unlabeled"):
        balanced_subset(torch.full((5,), -1), 0.5, seed=0)


def test_fraction_keys():
    assert [fraction_key(f) for f in (0.01, 0.1, 0.005, 1.0)] == ["1pct", "10pct", "0.5pct", "100pct"]


def test_finetuning_learns_and_leaves_the_pretrained_backbone_untouched():
    splits = synthetic(num_train=400, num_test=200, num_classes=4, image_size=16, channels=3, seed=0)
    torch.manual_seed(0)
    backbone = SmallCNN(in_channels=3, width=8, feat_dim=32)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    # SGD at a fixed lr: LARS' trust ratio is tuned for long runs, this test has 40 steps.
    cfg = finetune_cfg(fractions=[0.25, 0.5], epochs=[8, 8], batch_size=32, optimizer="sgd", lr=0.02,
                       scale=[0.6, 1.0])
    results = finetune_eval(backbone, splits, cfg, torch.device("cpu"))
    assert set(results) == {"finetune_25pct_top1", "finetune_25pct_top5", "finetune_50pct_top1", "finetune_50pct_top5"}
    assert results["finetune_50pct_top1"] > 0.5  # chance is 0.25
    assert results["finetune_50pct_top5"] == 1.0  # 4 classes: top-5 holds all of them
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics


def test_mismatched_epochs_are_refused():
    splits = synthetic(num_train=40, num_test=8, num_classes=2, image_size=8, channels=1)
    with pytest.raises(SslrunError, match="one epoch count per fraction"):
        finetune_eval(SmallCNN(in_channels=1, width=4, feat_dim=8), splits, finetune_cfg(epochs=[1]),
                      torch.device("cpu"))


@pytest.mark.slow
def test_a_run_reports_finetuning_beside_the_probes_of_the_pretrained_backbone(tmp_path):
    common = [*FAST, "monitor.figures.enabled=false", "eval.finetune.batch_size=32"]
    sslrun(*common, f"hydra.run.dir={tmp_path / 'off'}")
    sslrun(*common, "eval.finetune.enabled=true", "eval.finetune.fractions=[0.1,0.5]", "eval.finetune.epochs=[1,2]",
           f"hydra.run.dir={tmp_path / 'on'}")
    off, on = read_metrics(tmp_path / "off"), read_metrics(tmp_path / "on")
    for key in ("finetune_10pct_top1", "finetune_10pct_top5", "finetune_50pct_top1", "finetune_50pct_top5"):
        assert 0.0 <= on[key] <= 1.0
    assert not any(k.startswith("finetune_") for k in off)
    # Fine-tuning runs after the probes, on a copy: they see the same pretrained backbone either way.
    assert (on["knn_top1"], on["linear_top1"]) == (off["knn_top1"], off["linear_top1"])
