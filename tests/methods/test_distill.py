import math

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from runner import ROOT, engine_step, method_config

from sslrun.backbones.kd_tutorial import DeepNN, LightNN
from sslrun.checkpoint import save_checkpoint
from sslrun.errors import SslrunError
from sslrun.methods.base import FitInfo, TrainState
from sslrun.methods.distill import cosine_feature_loss, seed_loss, soft_target_loss
from sslrun.methods.supervised import Supervised

KD_BACKBONE = {"_target_": "sslrun.backbones.kd_tutorial.DeepNN", "in_channels": 3, "image_size": 8}
HEAD = {"num_classes": 3, "hidden_dim": 8, "dropout": 0.1}


def test_soft_target_loss_by_hand_with_the_t_squared_factor():
    # T = 2, teacher logits [2 ln 3, 0] -> p_t = [3/4, 1/4]; student [0, 0] -> p_s = [1/2, 1/2].
    # KL = 3/4 ln(3/2) + 1/4 ln(1/2); times T^2 = 4.
    teacher, student = torch.tensor([[2 * math.log(3), 0.0]]), torch.zeros(1, 2)
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert soft_target_loss(student, teacher, 2.0).item() == pytest.approx(4 * kl, rel=1e-6)
    # T = 1: p_t = softmax([2 ln 3, 0]) = [9/10, 1/10], and no scaling.
    kl1 = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert soft_target_loss(student, teacher, 1.0).item() == pytest.approx(kl1, rel=1e-6)
    assert soft_target_loss(teacher, teacher, 2.0).item() == pytest.approx(0.0, abs=1e-7)
    # Batch-averaged: a second, identical row leaves the value unchanged.
    assert soft_target_loss(student.repeat(2, 1), teacher.repeat(2, 1), 2.0).item() == pytest.approx(4 * kl, rel=1e-6)


def test_cosine_loss_pools_the_wider_features():
    teacher = torch.tensor([[1.0, 1.0, 0.0, 0.0]])  # pooled by 2: [1, 0]
    assert cosine_feature_loss(torch.tensor([[2.0, 0.0]]), teacher).item() == pytest.approx(0.0, abs=1e-7)
    assert cosine_feature_loss(torch.tensor([[0.0, 3.0]]), teacher).item() == pytest.approx(1.0)
    assert cosine_feature_loss(torch.tensor([[-1.0, 0.0]]), teacher).item() == pytest.approx(2.0)


def test_seed_loss_by_hand():
    # queue [[1, 0]], s = t = [0, 1], temperatures 1: logits [0, 1] for both, so the loss is p's entropy.
    q, s = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    p = torch.softmax(torch.tensor([0.0, 1.0]), 0)
    assert seed_loss(s, s, q, 1.0, 1.0).item() == pytest.approx(-(p * p.log()).sum().item(), rel=1e-6)


def teacher_checkpoint(tmp_path, with_classifier=True):
    torch.manual_seed(0)
    m = Supervised(DeepNN(3, 8), **HEAD)
    state = m.state_dict() if with_classifier else {k: v for k, v in m.state_dict().items() if "classifier" not in k}
    path = tmp_path / "teacher" / "checkpoints" / "last.pt"
    save_checkpoint({"backbone": m.backbone.state_dict(), "method": state,
                     "config": {"backbone": KD_BACKBONE, "method": {"_target_": "x", **HEAD}}}, path)
    return m, tmp_path / "teacher"


def regressor_optimizers():
    adamw = OmegaConf.load(ROOT / "conf" / "optimizer" / "adamw.yaml")
    return OmegaConf.create({"regressor": OmegaConf.merge(adamw, method_config("distill").optimizers.regressor)})


def build(teacher, **kw):
    torch.manual_seed(1)
    cfg = {**dict(teacher=None if teacher is None else str(teacher), **HEAD, optimizers=regressor_optimizers()), **kw}
    try:
        return instantiate(method_config("distill"), backbone=LightNN(3, 8), **cfg)
    except InstantiationException as e:  # what run.py does: the method's own SslrunError reaches the user
        raise e.__cause__ if isinstance(e.__cause__, SslrunError) else e


def batch(n=8):
    g = torch.Generator().manual_seed(2)
    return [torch.randn(n, 3, 8, 8, generator=g)], torch.arange(n)


def test_the_teacher_is_rebuilt_frozen_and_not_saved(tmp_path):
    reference, run_dir = teacher_checkpoint(tmp_path)
    m = build(run_dir, soft_weight=0.25, label_weight=0.75, cosine_weight=0.5, hint_weight=0.5)
    m.on_fit_start(FitInfo(8, 1, 1, 1, labels=torch.tensor([0, 1, 2] * 2 + [0, 1])))
    t = m.teacher
    x = batch()[0][0]
    assert torch.equal(t.classifier(t.backbone(x)), reference.eval().logits(x))  # the same network, eval mode
    before = {k: v.clone() for k, v in t.state_dict().items()}
    assert not any(k.startswith("teacher") for k in m.state_dict())
    teacher_params = {id(p) for p in t.parameters()}
    assert not teacher_params & {id(p) for p in m.parameters()}
    opt = torch.optim.SGD([p for g in m.param_groups() for p in g["params"]], lr=0.5)
    m.train()
    assert not t.training  # m.train() does not reach it
    state = TrainState()
    for _ in range(3):
        out = engine_step(m, opt, batch()[0], state)
    assert all(p.grad is None and not p.requires_grad for p in t.parameters())
    assert all(torch.equal(before[k], v) for k, v in t.state_dict().items())
    assert set(out) >= {"soft", "label", "cosine", "hint"}
    parts = 0.25 * out["soft"] + 0.75 * out["label"] + 0.5 * out["cosine"] + 0.5 * out["hint"]
    assert out["loss"].item() == pytest.approx(parts.item(), rel=1e-5)


def test_the_hint_regressor_has_its_own_optimizer(tmp_path):
    _, run_dir = teacher_checkpoint(tmp_path)
    m = build(run_dir, soft_weight=0.0, label_weight=0.0, hint_weight=1.0)
    main = {id(p) for g in m.param_groups() for p in g["params"]}
    (cfg, groups), = m.named_optimizers().values()
    regressor = [p for g in groups for p in g["params"]]
    assert {id(p) for p in m.regressor.parameters()} == {id(p) for p in regressor}
    assert not main & {id(p) for p in regressor}
    assert m.regressor.in_channels == 16 and m.regressor.out_channels == 32  # the tutorial's conv 16 -> 32
    assert cfg.lr == 1e-3


def test_label_free_embedding_with_a_queue(tmp_path):
    _, run_dir = teacher_checkpoint(tmp_path, with_classifier=False)
    m = build(run_dir, soft_weight=0.0, label_weight=0.0, embed_weight=1.0, embed_queue=16)
    assert m.classifier is None
    m.on_fit_start(FitInfo(8, 1, 1, 1))  # no labels needed
    opt = torch.optim.SGD([p for g in m.param_groups() for p in g["params"]], lr=0.1)
    out = engine_step(m, opt, batch()[0], TrainState())
    assert math.isfinite(out["embed"].item())
    assert int(m.queue.ptr) == 8  # the teacher's embeddings of the batch were queued
    direct = build(run_dir, soft_weight=0.0, label_weight=0.0, embed_weight=1.0)
    assert 0.0 <= direct(*batch())["embed"].item() <= 4.0  # 2 - 2 cos


def test_bad_configurations_are_refused(tmp_path):
    _, plain = teacher_checkpoint(tmp_path, with_classifier=False)
    with pytest.raises(SslrunError, match="classifier"):
        build(plain, soft_weight=0.25)
    with pytest.raises(SslrunError, match="every loss weight"):
        build(plain, soft_weight=0.0, label_weight=0.0)
    with pytest.raises(SslrunError, match="method.teacher="):
        build(None)
    with pytest.raises(SslrunError, match="No checkpoint"):
        build(tmp_path / "nowhere")


def test_images_the_teacher_cannot_take_are_refused_before_training(tmp_path):
    """A teacher trained on 3-channel 8-px images, a run on 1-channel ones or 16-px views (its flattened head is
    for 8 px): one message naming the teacher's data, not a shape error at the first step."""
    _, teacher = teacher_checkpoint(tmp_path)
    student = build(teacher, soft_weight=0.25)
    student.check_inputs(3, [8, 8], views_vary=True)  # the teacher's own images pass
    for channels, size in ((1, 8), (3, 16)):
        with pytest.raises(SslrunError, match=f"cannot take this run's {channels}-channel {size}-px views"):
            student.check_inputs(channels, [size], views_vary=False)
    cached = build(teacher, soft_weight=0.25, cache_teacher=True)
    cached.check_inputs(3, [8], views_vary=False)
    with pytest.raises(SslrunError, match="the views are augmented"):  # before training, not at epoch 2
        cached.check_inputs(3, [8], views_vary=True)


def test_the_cached_teacher_gives_the_same_losses_and_runs_once_per_image(tmp_path):
    _, run_dir = teacher_checkpoint(tmp_path)
    kw = dict(soft_weight=0.25, label_weight=0.75, cosine_weight=0.5, hint_weight=0.5)
    plain, cached = build(run_dir, **kw).eval(), build(run_dir, cache_teacher=True, **kw).eval()  # no dropout
    info = FitInfo(12, 1, 1, 1, labels=torch.arange(12) % 3)
    plain.on_fit_start(info)
    cached.on_fit_start(info)
    calls = []
    teach = cached._teach
    cached._teach = lambda x: calls.append(len(x)) or teach(x)
    g = torch.Generator().manual_seed(3)
    images = torch.randn(12, 3, 8, 8, generator=g)
    for index in (torch.arange(8), torch.tensor([4, 9, 2, 11, 0, 10, 7, 8]), torch.arange(8)):  # epochs of 8
        a, b = plain([images[index]], index), cached([images[index]], index)
        for k in ("soft", "cosine", "hint", "loss"):
            assert torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-7), k
    assert calls == [8, 4]  # the first 8 images, then only the 4 never seen (9, 11, 10, 8); the last batch: none
    flipped = images[:8].flip(-1)  # an augmented view of cached images
    with pytest.raises(SslrunError, match="augmentation=none"):
        cached([flipped], torch.arange(8))
