import math

import pytest
import torch
from omegaconf import OmegaConf
from rich.console import Console

from sslrun.data.image_set import DatasetSplits, ImageSet
from sslrun.errors import SslrunError
from sslrun.eval.adapt import (
    TSD,
    adapt_on_corruptions,
    neighbour_alignment_loss,
    prototype_loss,
    select_supports,
    tta_table,
)
from sslrun.eval.corruptions import contrast, corrupt, gaussian_blur
from sslrun.eval.linear import train_linear

TTA = OmegaConf.load("conf/eval/default.yaml").tta


def test_support_selection_keeps_at_most_k_per_class_with_the_lowest_entropy():
    entropy = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8])
    cls = torch.tensor([0, 0, 0, 1, 1, 2, 0])
    labels = torch.nn.functional.one_hot(cls, 3).float()
    keep = select_supports(entropy, labels, 2)
    assert keep.tolist() == [1, 2, 3, 4, 5]  # class 0: 0.1 and 0.5 (not 0.8, 0.9); class 1: both; class 2: its one
    assert select_supports(entropy, labels, 1).tolist() == [1, 3, 5]
    assert select_supports(entropy, labels, -1).tolist() == list(range(7))


def test_prototype_loss_is_the_kl_of_the_official_code():
    z = torch.tensor([[1.0, 0.0]])
    prototypes = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # cosines 1 and 0
    scores = torch.tensor([[0.7, 0.3]])
    q = torch.softmax(torch.tensor([1.0, 0.0]), 0)  # tau = 1
    log_s = torch.log_softmax(scores[0], 0)  # the scores go through a log-softmax, as in softmax_kl_loss
    hand = sum(q[c] * (math.log(q[c]) - log_s[c]) for c in range(2))
    assert prototype_loss(z, prototypes, scores, 1.0).item() == pytest.approx(float(hand), rel=1e-6)


def test_neighbour_alignment_by_hand():
    z = torch.tensor([[1.0, 0.0]])
    supports = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # cosines 1, 0, -1
    scores = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    logits = torch.tensor([[2.0, 0.0]], requires_grad=True)
    # k = 2: neighbours 0 (sim 1, ||[2,0]-[1,0]||^2 = 1) and 1 (sim 0); -(1*1 + 0*5)/2
    loss = neighbour_alignment_loss(z, supports, scores, logits, 2)
    assert loss.item() == pytest.approx(-0.5)
    loss.backward()
    assert logits.grad is not None and supports.grad is None


def test_corruptions_follow_imagenet_c():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    c = contrast(x, 5)  # factor 0.05 towards each channel's mean
    m = x.mean((2, 3), keepdim=True)
    assert torch.allclose(c, (x - m) * 0.05 + m)
    flat = torch.full((1, 1, 8, 8), 0.4)
    assert torch.allclose(gaussian_blur(flat, 5), flat, atol=1e-6)  # a blur keeps a constant image
    blurred = gaussian_blur(x, 5)
    assert blurred.std() < x.std()
    u8 = (x * 255).round().to(torch.uint8)
    noisy = corrupt(u8, "gaussian_noise", 5, seed=1)
    assert noisy.dtype == torch.uint8 and torch.equal(noisy, corrupt(u8, "gaussian_noise", 5, seed=1))
    diff = (noisy.float() - u8.float()) / 255
    assert 0.25 < diff.std().item() < 0.4  # std 0.38 before clipping to [0, 1]
    with pytest.raises(SslrunError, match="1 to 5"):
        corrupt(u8, "contrast", 6)
    with pytest.raises(SslrunError, match="gaussian_noise"):
        corrupt(u8, "fog", 1)


def toy_splits(n=96, size=8):
    """Two classes: a bright left half or a bright right half, with noise."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 2
    x = torch.rand(n, 1, size, size, generator=g) * 0.3
    x[y == 0, :, :, : size // 2] += 0.6
    x[y == 1, :, :, size // 2:] += 0.6
    s = ImageSet((x.clamp(0, 1) * 255).round().to(torch.uint8), y)
    return DatasetSplits("toy", s, s, s, 2, (0.5,), (0.25,), ["left", "right"])


def backbone():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                               torch.nn.Flatten())


def test_tsd_adapts_a_copy_and_reports_before_and_after():
    splits = toy_splits()
    net = backbone().eval()
    with torch.no_grad():
        feats = net((splits.train.images.float() / 255 - 0.5) / 0.25)
    probe = train_linear(feats, splits.train.labels, 2, epochs=20, lr=0.1, batch_size=32)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cfg = OmegaConf.merge(TTA, {"method": "tsd", "corruptions": ["contrast", "gaussian_noise"], "severities": [1, 5],
                                "num_test": 32, "batch_size": 16, "lr": 1e-2, "filter_K": 5})
    out = adapt_on_corruptions(net, probe, splits, cfg, torch.device("cpu"))
    assert len(out) == 2 * 2 * 3 + 3  # before, bn, after per set; and their means
    assert all(0.0 <= v <= 1.0 for v in out.values())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the original is untouched
    text = Console(width=200, record=True)
    text.print(tta_table(out))
    shown = text.export_text()
    first_tsd = next(line for line in shown.splitlines() if line.count("│") > 3 and line.split("│")[2].strip() == "TSD")
    tsd_row = [c.strip() for c in first_tsd.split("│")[3:-1]]  # contrast's TSD row: s1, s5, mean
    expect = [out["tta_contrast_s1_after"], out["tta_contrast_s5_after"]]
    assert tsd_row == [f"{v:.3f}" for v in [*expect, sum(expect) / 2]]
    assert "contrast" in shown and "test-batch BN" in shown and f"{out['tta_mean_bn']:.3f}" in shown
    with pytest.raises(SslrunError, match="linear"):
        adapt_on_corruptions(net, None, splits, cfg, torch.device("cpu"))


def test_the_table_keeps_every_figure_whole_in_an_80_column_log():
    """The run's console when its output is a file: the default three corruptions x five severities x three models
    made the table one column too wide, and rich cut s4 and the means to "0.4…"."""
    names = ("gaussian_noise", "gaussian_blur", "contrast")
    metrics = {f"tta_{c}_s{s}_{w}": 0.4567 for c in names for s in range(1, 6) for w in ("before", "bn", "after")}
    metrics.update({f"tta_mean_{w}": 0.4567 for w in ("before", "bn", "after")})
    log = Console(width=80, soft_wrap=True, record=True)
    log.print(tta_table(metrics))
    shown = log.export_text()
    assert "…" not in shown and shown.count("0.457") == 3 * 3 * 6 + 3


def test_tsd_step_updates_the_featurizer_and_bounds_the_memory():
    torch.manual_seed(0)
    feat = torch.nn.Linear(4, 3)
    clf = torch.nn.Linear(3, 2)
    cfg = OmegaConf.merge(TTA, {"method": "tsd", "filter_K": 3, "lr": 1e-2})
    tsd = TSD(feat, clf, cfg)
    assert tsd.supports.shape == (2, 3)  # the classifier's weight rows seed the memory
    w_feat, w_clf = feat.weight.detach().clone(), clf.weight.detach().clone()
    for _ in range(4):
        p = tsd.step(torch.randn(8, 4))
    assert p.shape == (8, 2)
    assert not torch.equal(feat.weight, w_feat) and torch.equal(clf.weight, w_clf)  # update_classifier=false
    per_class = tsd.labels.argmax(1).bincount(minlength=2)
    assert per_class.max() <= 3 and len(tsd.supports) == per_class.sum()


def bn_backbone():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Dropout(0.5), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())


def probe_on(net, splits):
    net.train()
    with torch.no_grad():  # running statistics of the clean images, as after pretraining
        for _ in range(20):
            net((splits.train.images.float() / 255 - 0.5) / 0.25)
    net.eval()
    with torch.no_grad():
        feats = net((splits.train.images.float() / 255 - 0.5) / 0.25)
    return train_linear(feats, splits.train.labels, 2, epochs=20, lr=0.1, batch_size=32)


def test_batch_norm_modes_without_a_step_are_the_source_model_and_test_batch_statistics():
    """lr = 0: TSD changes no weight, so 'after' must be the source model with running statistics
    (batch_norm=running) or test-batch statistics (batch_norm=batch, then equal to the '_bn' column)."""
    splits, net = toy_splits(), bn_backbone()
    probe = probe_on(net, splits)
    base = {"method": "tsd", "corruptions": ["contrast"], "severities": [5], "num_test": 48, "batch_size": 16,
            "lr": 0.0, "filter_K": 5}
    running = adapt_on_corruptions(net, probe, splits, OmegaConf.merge(TTA, base, {"batch_norm": "running"}),
                                   torch.device("cpu"))
    assert "tta_contrast_s5_bn" not in running
    assert running["tta_contrast_s5_after"] == running["tta_contrast_s5_before"]
    batch = adapt_on_corruptions(net, probe, splits, OmegaConf.merge(TTA, base, {"batch_norm": "batch"}),
                                 torch.device("cpu"))
    assert batch["tta_contrast_s5_after"] == batch["tta_contrast_s5_bn"]
    assert batch["tta_contrast_s5_before"] == running["tta_contrast_s5_before"]
    # Running statistics that do not fit the test data (the source's mean far off): the source model sees all-zero
    # features after the ReLU and guesses one class; each test batch's own statistics restore it.
    net[1].running_mean.fill_(10.0)
    off = adapt_on_corruptions(net, probe, splits, OmegaConf.merge(TTA, base, {"severities": [1], "num_test": None}),
                               torch.device("cpu"))
    assert off["tta_contrast_s1_before"] == 0.5 and off["tta_contrast_s1_bn"] > 0.9
    with pytest.raises(SslrunError, match="batch_norm"):
        adapt_on_corruptions(net, probe, splits, OmegaConf.merge(TTA, base, {"batch_norm": "train"}),
                             torch.device("cpu"))


def test_test_batch_normalisation_leaves_dropout_off_and_never_normalises_one_image():
    from sslrun.eval.adapt import _batches, _normalise_with_test_batches

    net = _normalise_with_test_batches(bn_backbone().eval())
    assert net[1].training and not net[3].training and not net[0].training
    splits = toy_splits(n=33)
    sizes = [len(b) for b in _batches(splits.test.images, splits, torch.device("cpu"), 16)]
    assert sizes == [16, 17]
    assert [len(b) for b in _batches(splits.test.images[:32], splits, torch.device("cpu"), 16)] == [16, 16]
