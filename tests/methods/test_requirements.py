"""Method.check_setup: every method states the batch and views it needs, and a config that does not fit is
refused before training with the key to change (issue 8: SimCLR trained at loss exactly 0 at batch 1, Barlow
Twins crashed, and SwAV silently coded a small crop as its second large crop)."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from runner import ROOT

from sslrun.errors import SslrunError
from sslrun.methods.base import Method

METHODS = sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml"))
SMALL_CNN = ["backbone=small_cnn", "backbone.width=4", "backbone.feat_dim=16"]
# Methods that cannot be built from their YAML alone.
NEEDS_INPUT = {"distill": "method.teacher must name a checkpoint of an earlier run"}


def build(*overrides: str) -> tuple[Method, list[int]]:
    """The method of a composed config (tiny backbone) and the crop size of each view its augmentation makes."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        backbone = [] if any(o.startswith("backbone=") for o in overrides) else SMALL_CNN
        cfg = compose("config", overrides=["dataset=synthetic", *backbone, *overrides])
    torch.manual_seed(0)
    method = instantiate(cfg.method, backbone=instantiate(cfg.backbone))
    augment = instantiate(cfg.augmentation, mean=[0.5] * 3, std=[0.25] * 3)
    return method, [r.out_size(cfg.dataset.image_size) for r in augment.recipes for _ in range(r.count)]


@pytest.mark.parametrize("name", METHODS)
def test_every_method_fits_its_own_config_and_refuses_a_batch_of_one(name):
    if name in NEEDS_INPUT:
        pytest.skip(NEEDS_INPUT[name])
    method, sizes = build(f"method={name}")
    method.check_setup(sizes, 256)  # the method's own YAML (its views) at the default batch
    assert method.min_batch_size >= 1 and method.num_large_crops >= 1
    with pytest.raises(SslrunError, match=r"trainer\.batch_size=1\b"):
        method.check_setup(sizes, 1)
    if method.num_large_crops > 1:  # one large crop too few: the first recipe makes one view fewer
        with pytest.raises(SslrunError, match=rf"augmentation\.views\.0\.count={method.num_large_crops}"):
            method.check_setup(sizes[: method.num_large_crops - 1], 256)


def test_simclr_at_batch_one_has_a_zero_loss_and_is_refused():
    """Why the minimum: with one image a view's only candidate is its positive, so the loss is exactly 0."""
    method, sizes = build("method=simclr", "method.proj_hidden_dim=16")
    method.train()
    views = [torch.randn(1, 3, 32, 32) for _ in range(2)]
    method.projector.eval()  # BN at batch 1 would raise before the loss shows it; the loss is the point here
    method.backbone.eval()
    assert method(views, torch.arange(1))["loss"].item() == 0.0
    with pytest.raises(SslrunError, match=r"SimCLR needs a batch of at least 2.*loss is exactly 0\), but trainer\.batch_size=1"):
        method.check_setup(sizes, 1)


@pytest.mark.parametrize("name", ["dino", "swav"])
def test_multicrop_with_one_large_crop_is_refused(name):
    """The issue's replay: augmentation.views.0.count=1 made DINO crash and SwAV code a small crop as large."""
    method, sizes = build(f"method={name}", "augmentation.views.0.count=1")
    assert sizes == [32] + [18] * 6
    with pytest.raises(SslrunError, match=r"first 2 views.*\[32, 18, .*augmentation\.views\.0\.count=2"):
        method.check_setup(sizes, 256)


@pytest.mark.parametrize("name", ["simclr", "byol", "barlow", "mocov3", "simsiam"])
def test_two_view_methods_refuse_small_crops_they_would_ignore(name):
    method, sizes = build(f"method={name}", "augmentation=multicrop")
    with pytest.raises(SslrunError, match=r"uses 2 view\(s\).*6 would be computed and ignored"):
        method.check_setup(sizes, 256)


def test_paired_large_crops_must_share_a_size():
    method, _ = build("method=byol")
    with pytest.raises(SslrunError, match=r"\[32, 24\].*one size"):
        method.check_setup([32, 24], 256)
    asym, _ = build("method=mocov2")  # query and key go through separate passes: sizes may differ
    asym.check_setup([32, 24], 256)
    sym, _ = build("method=mocov2", "method.symmetric=true")
    with pytest.raises(SslrunError, match="one size"):
        sym.check_setup([32, 24], 256)


def test_small_crops_must_not_be_larger_than_the_large_ones():
    method, _ = build("method=dino")
    with pytest.raises(SslrunError, match=r"must share the largest size.*\[24, 24, 32\]"):
        method.check_setup([24, 24, 32], 256)


def test_vit_patch_size_must_divide_every_crop():
    method, sizes = build("method=dino", "backbone=vit_tiny", "backbone.depth=1", "backbone.embed_dim=16",
                          "backbone.num_heads=2")
    assert sizes == [32, 32] + [18] * 6
    with pytest.raises(SslrunError, match=r"backbone\.patch_size=4.*18 px"):
        method.check_setup(sizes, 256)
    method.check_setup([32, 32] + [16] * 6, 256)


def test_moco_checks_its_queue_and_split_batchnorm_against_the_batch():
    method, sizes = build("method=mocov2")  # queue 4096, bn_splits 8
    method.check_setup(sizes, 4096)
    with pytest.raises(SslrunError, match=r"method\.queue_size=4096"):
        method.check_setup(sizes, 8192)
    method.check_setup(sizes, 72)  # 8 groups of 9
    for batch in (8, 20):  # 8 groups of 1; 20 does not split into 8 groups
        with pytest.raises(SslrunError, match=r"method\.bn_splits=8 groups of 2 or more.*multiple of 16"):
            method.check_setup(sizes, batch)


def test_swav_queue_must_hold_a_batch():
    method, sizes = build("method=swav", "method.queue_length=64")
    method.check_setup(sizes, 64)
    with pytest.raises(SslrunError, match=r"method\.queue_length=64.*trainer\.batch_size=128"):
        method.check_setup(sizes, 128)
