import math

import pytest
import torch
from hydra.utils import instantiate
from runner import engine_step, method_config

from sslrun.backbones.small_cnn import SmallCNN
from sslrun.errors import SslrunError
from sslrun.methods.base import FitInfo, TrainState


def build(num_classes=3):
    torch.manual_seed(0)
    backbone = SmallCNN(in_channels=1, width=4, feat_dim=8, pool_size=1)
    return instantiate(method_config("supervised"), backbone=backbone, num_classes=num_classes)


def info(labels):
    return FitInfo(len(labels), 1, 1, 1, labels=torch.tensor(labels))


def test_loss_is_cross_entropy_over_labelled_samples_only():
    m = build().eval()  # eval: BN uses running stats, so the logits of a sample do not depend on its batch
    m.on_fit_start(info([2, -1, 0, 1]))
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    out = m([x], torch.arange(4))
    logits = m.logits(x)
    # -log softmax(logits)[y] by hand, averaged over samples 0, 2 and 3 (sample 1 is unlabeled).
    nll = [math.log(sum(math.exp(v) for v in logits[i].tolist())) - logits[i, y].item()
           for i, y in ((0, 2), (2, 0), (3, 1))]
    assert out["loss"].item() == pytest.approx(sum(nll) / 3, rel=1e-5)
    right = sum(int(logits[i].argmax()) == y for i, y in ((0, 2), (2, 0), (3, 1)))
    assert out["accuracy"].item() == pytest.approx(right / 3)


def test_a_batch_without_labels_gives_zero_loss_not_nan():
    m = build()
    m.on_fit_start(info([-1, -1, 0, 1]))
    out = m([torch.randn(2, 1, 8, 8)], torch.tensor([0, 1]))
    assert out["loss"].item() == 0.0


@pytest.mark.parametrize("labels, match", [([-1, -1], "has none"), ([0, 5], "num_classes=6")])
def test_refuses_unlabelled_data_and_too_few_classes(labels, match):
    with pytest.raises(SslrunError, match=match):
        build().on_fit_start(info(labels))
    with pytest.raises(SslrunError, match="has none"):
        build().on_fit_start(FitInfo(2, 1, 1, 1))


def test_training_fits_a_small_labelled_batch():
    m = build(num_classes=2)
    m.on_fit_start(info([0, 1] * 8))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 1, 8, 8, generator=g) + torch.tensor([0.0, 1.5] * 8).view(16, 1, 1, 1)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    state = TrainState()
    first = engine_step(m, opt, [x, x.flip(-1)], state)["loss"].item()
    for _ in range(30):
        last = engine_step(m, opt, [x, x.flip(-1)], state)
    assert last["loss"].item() < 0.5 * first
    assert last["accuracy"].item() == 1.0


@pytest.mark.slow
def test_supervised_end_to_end_reports_its_classifier_and_test_time_adaptation(tmp_path):
    from runner import FAST, read_metrics, sslrun

    fast = [a for a in FAST if not a.startswith("method.")]
    proc = sslrun("method=supervised", *fast, "eval.tta.method=tsd", "eval.tta.num_test=32",
                  "eval.tta.corruptions=[contrast]", "eval.tta.severities=[5]", f"hydra.run.dir={tmp_path}")
    m = read_metrics(tmp_path)
    assert 0.0 <= m["classifier_top1"] <= 1.0  # the method's own head, scored on the test split
    assert {"tta_contrast_s5_before", "tta_contrast_s5_after", "tta_mean_before", "tta_mean_after"} <= set(m)
    assert "Test-time adaptation (TSD)" in proc.stdout
