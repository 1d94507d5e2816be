import math

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from runner import FAST, engine_step, method_config, read_metrics, sslrun

from sslrun.backbones.small_cnn import SmallCNN
from sslrun.errors import SslrunError
from sslrun.methods.base import FitInfo, TrainState
from sslrun.methods.cmc import CMC
from sslrun.methods.lab import lab_to_rgb, rgb_to_lab

N = 40  # images in the toy dataset
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def small_cnn_config(channels: int = 3):
    return OmegaConf.create({"_target_": "sslrun.backbones.small_cnn.SmallCNN", "in_channels": channels,
                             "width": 8, "feat_dim": 32, "pool_size": 3})


def build(**overrides):
    torch.manual_seed(0)
    method = instantiate(method_config("cmc"), backbone=SmallCNN(in_channels=3, width=8, feat_dim=32),
                         backbone_config=small_cnn_config(), **overrides)
    method.on_fit_start(FitInfo(N, 5, 10, 2, mean=MEAN, std=STD))
    return method


def normalise(rgb: torch.Tensor) -> torch.Tensor:
    return (rgb - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


# ---- Lab ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rgb, lab", [
    # Tabulated CIE L*a*b* (D65) of the sRGB primaries, secondaries and greys (scikit-image's rgb2lab gives the same;
    # CMC's normalisation constants are the a* of green and the b* of blue and yellow).
    ((1.0, 0.0, 0.0), (53.2408, 80.0925, 67.2032)),
    ((0.0, 1.0, 0.0), (87.7347, -86.1827, 83.1793)),
    ((0.0, 0.0, 1.0), (32.2970, 79.1875, -107.8602)),
    ((1.0, 1.0, 0.0), (97.1393, -21.5537, 94.4780)),
    ((1.0, 1.0, 1.0), (100.0, 0.0, 0.0)),
    ((0.5, 0.5, 0.5), (53.3890, 0.0, 0.0)),
    ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
])
def test_rgb_to_lab_reference_values(rgb, lab):
    out = rgb_to_lab(torch.tensor(rgb).view(1, 3, 1, 1)).flatten()
    torch.testing.assert_close(out, torch.tensor(lab), atol=0.02, rtol=0)


def test_lab_split_reproduces_the_image():
    # Normalised RGB -> (L, ab) as the encoders see them -> undo the rescaling -> Lab -> RGB: the input image.
    method = build()
    rgb = torch.rand(4, 3, 9, 9, generator=torch.Generator().manual_seed(0))
    light, colour = method.encoder.split(normalise(rgb))
    assert light.shape == (4, 1, 9, 9) and colour.shape == (4, 2, 9, 9)
    assert light.abs().max() <= 1.0 + 1e-5 and colour.abs().max() <= 1.0 + 1e-3  # the official ~[-1, 1] scaling
    enc = method.encoder
    lab = torch.cat([light, colour], 1) * enc.lab_std.view(1, 3, 1, 1) + enc.lab_mean.view(1, 3, 1, 1)
    torch.testing.assert_close(lab_to_rgb(lab), rgb, atol=1e-4, rtol=0)


def test_grayscale_data_is_refused():
    with pytest.raises(SslrunError, match="RGB"):
        CMC(SmallCNN(in_channels=1, width=8, feat_dim=32), small_cnn_config(1), 128, 0.1, "bank", 16, 0.5)


def test_bad_negatives_choice_is_refused():
    with pytest.raises(SslrunError, match="bank, batch"):
        CMC(SmallCNN(in_channels=3, width=8, feat_dim=32), small_cnn_config(), 128, 0.1, "queue", 16, 0.5)


def test_two_encoders_for_one_and_two_channels_and_a_concatenated_representation():
    method = build()
    assert method.encoder.l.conv1[0].in_channels == 1 and method.encoder.ab.conv1[0].in_channels == 2
    assert method.backbone is method.encoder.l
    rep = method.eval_backbone().eval()
    x = normalise(torch.rand(3, 3, 12, 12))
    light, colour = rep.split(x)
    torch.testing.assert_close(rep(x), torch.cat([rep.l(light), rep.ab(colour)], 1))
    assert rep.feat_dim == 64
    # The views' normalisation travels with the representation (a checkpoint of it can be evaluated alone).
    assert set(rep.state_dict()) >= {"mean", "std"}
    torch.testing.assert_close(rep.std, torch.tensor(STD))


# ---- the loss ----------------------------------------------------------------------------------------


def contrast_reference(q: torch.Tensor, pos: torch.Tensor, cands: list[torch.Tensor], t: float) -> float:
    """-log exp(q.pos/T) / (exp(q.pos/T) + sum_j exp(q.c_j/T)) for one query (the softmax form)."""
    q, pos, cands = q.detach(), pos.detach(), [c.detach() for c in cands]
    s = [float(q @ pos) / t] + [float(q @ c) / t for c in cands]
    return -(s[0] - math.log(sum(math.exp(v) for v in s)))


def embeddings(method, x):
    h_l, h_ab = method.encoder.encode(x)
    return F.normalize(method.proj_l(h_l), dim=1), F.normalize(method.proj_ab(h_ab), dim=1)


def test_batch_loss_is_both_directions_of_the_contrast():
    method = build(negatives="batch")
    x = normalise(torch.rand(5, 3, 12, 12, generator=torch.Generator().manual_seed(1)))
    out = method([x, x], torch.arange(5))
    z_l, z_ab = embeddings(method, x)
    t = method.temperature
    expected = 0.0
    for i in range(5):
        expected += contrast_reference(z_l[i], z_ab[i], [z_ab[j] for j in range(5) if j != i], t) / 5
        expected += contrast_reference(z_ab[i], z_l[i], [z_l[j] for j in range(5) if j != i], t) / 5
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)


def test_bank_loss_contrasts_with_the_other_views_bank_and_updates_both_banks():
    method = build(nce_k=6)
    x = normalise(torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(2)))
    index = torch.tensor([3, 7, 11, 20])
    bank_l, bank_ab = method.bank_l.data.clone(), method.bank_ab.data.clone()
    torch.manual_seed(5)
    out = method([x, x], index)
    torch.manual_seed(5)
    noise = torch.randint(N, (6,))
    z_l, z_ab = embeddings(method, x)
    t = method.temperature
    expected = 0.0
    for i, k in enumerate(index):
        expected += contrast_reference(z_l[i], bank_ab[k], list(bank_ab[noise]), t) / 4
        expected += contrast_reference(z_ab[i], bank_l[k], list(bank_l[noise]), t) / 4
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    method.on_after_step(TrainState())
    m = method.bank_momentum
    torch.testing.assert_close(method.bank_l.data[index], F.normalize(m * bank_l[index] + (1 - m) * z_l.detach()))
    torch.testing.assert_close(method.bank_ab.data[index], F.normalize(m * bank_ab[index] + (1 - m) * z_ab.detach()))
    untouched = torch.ones(N, dtype=torch.bool)
    untouched[index] = False
    torch.testing.assert_close(method.bank_l.data[untouched], bank_l[untouched])


@pytest.mark.parametrize("negatives", ["bank", "batch"])
def test_steps_on_synthetic_views(negatives):
    method = build(negatives=negatives, nce_k=16)
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        index = torch.randperm(N, generator=g)[:8]
        x = normalise(torch.rand(8, 3, 16, 16, generator=g))
        out = engine_step(method, opt, [x, x], TrainState(), index)
        assert math.isfinite(out["loss"].item())
        assert out["z"].shape == (8, 128)
    assert method.encoder.ab.conv1[0].weight.grad is not None  # both encoders train


def test_one_view_per_image_and_a_second_is_ignored():
    method = build()
    method.check_setup([32], 8)
    method.check_setup([32, 32], 8)  # the minimal augmentation's second view is unused


@pytest.mark.slow
def test_end_to_end_run_and_grayscale_refusal(tmp_path):
    # The CLI path: ${backbone} built twice from the config, the views' normalisation handed over in FitInfo, the
    # probes on the concatenated Lab encoders. On grayscale data: one paragraph and exit 2, before training.
    fast = [a for a in FAST if not a.startswith("method.proj_hidden_dim")] + ["method.nce_k=64"]
    sslrun("method=cmc", *fast, f"hydra.run.dir={tmp_path / 'rgb'}")
    metrics = read_metrics(tmp_path / "rgb")
    assert metrics["knn_top1"] > 0.2  # 10 synthetic classes: chance is 0.1
    proc = sslrun("method=cmc", *fast, "dataset.channels=1", f"hydra.run.dir={tmp_path / 'gray'}", check=False)
    assert proc.returncode == 2
    assert "Lab colour space, which needs RGB" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
