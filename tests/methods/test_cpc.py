import math

import pytest
import torch
from hydra.utils import instantiate
from runner import engine_step, method_config
from torch import nn

from sslrun.backbones.small_cnn import SmallCNN
from sslrun.errors import SslrunError
from sslrun.methods.base import TrainState
from sslrun.methods.cpc import cpc_infonce, patch_grid


def build(**overrides):
    torch.manual_seed(0)
    return instantiate(method_config("cpc"), backbone=SmallCNN(in_channels=1, width=4, feat_dim=16),
                       **{"context_hidden_dim": 8, **overrides})


def image(n: int = 2, size: int = 28, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


# ---- the patch grid and the encoder ------------------------------------------------------------------


def test_patch_grid_cuts_overlapping_patches_row_by_row():
    x = image(1, 28)
    cfg = method_config("cpc")
    p, s = cfg.patch_size, cfg.patch_stride
    assert (p, s) == (8, 4)  # the paper's 64/32 at 256 px, scaled by 1/8
    grid = patch_grid(x, p, s)
    assert grid.shape == (1, 6, 6, 1, 8, 8)  # 28 px -> 6x6; 32 px -> 7x7
    torch.testing.assert_close(grid[0, 2, 3], x[0, :, 8:16, 12:20])
    assert patch_grid(image(1, 32), p, s).shape[1:3] == (7, 7)
    with pytest.raises(SslrunError, match="patch_size"):
        patch_grid(image(1, 6), p, s)


def test_batch_norm_becomes_per_sample_layer_norm():
    method = build()
    kinds = {type(m) for m in method.backbone.modules()}
    assert nn.GroupNorm in kinds and nn.LayerNorm in kinds
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in method.modules())
    assert all(m.num_groups == 1 for m in method.backbone.modules() if isinstance(m, nn.GroupNorm))
    assert any(isinstance(m, nn.BatchNorm2d) for m in build(norm="batch").backbone.modules())


def test_eval_backbone_is_the_mean_of_the_patch_features():
    method = build().eval()
    x = image(3)
    feats = method.eval_backbone()(x)
    patches = patch_grid(x, 8, 4).reshape(-1, 1, 8, 8)
    expected = method.backbone(patches).view(3, 36, -1).mean(1)
    torch.testing.assert_close(feats, expected)
    assert method.eval_backbone().feat_dim == 16


# ---- causality ---------------------------------------------------------------------------------------


def test_context_never_sees_the_rows_below():
    # Perturb grid rows >= r: the context of rows < r is unchanged, and its gradient there is exactly zero.
    method = build()
    ctx = method.context[0]
    z = torch.randn(2, 16, 6, 6, requires_grad=True)
    for r in range(1, 6):
        z2 = z.detach().clone()
        z2[:, :, r:] += torch.randn_like(z2[:, :, r:])
        torch.testing.assert_close(ctx(z2)[:, :, :r], ctx(z.detach())[:, :, :r], rtol=0, atol=0)
        assert not torch.equal(ctx(z2)[:, :, r:], ctx(z.detach())[:, :, r:])  # rows >= r do read them
        (grad,) = torch.autograd.grad(ctx(z)[:, :, r - 1].sum(), z)
        assert grad[:, :, r:].abs().max() == 0 and grad[:, :, :r].abs().max() > 0


@pytest.mark.parametrize("norm, leaks", [("layer", False), ("batch", True)])
def test_no_prediction_sees_the_pixels_it_predicts(norm, leaks):
    # End to end, in training mode: the context of grid row r predicts row r + 2 onwards, whose pixels start at
    # (r + 2) * stride. Changing those pixels leaves that context unchanged with layer norm; with batch norm the
    # statistics shared by all patches leak them into every row (the paper's reason for layer norm).
    method = build(norm=norm).train()
    r, stride = 2, 4
    x = image(2)
    x2 = x.clone()
    x2[:, :, (r + 2) * stride:] = torch.randn_like(x2[:, :, (r + 2) * stride:])
    c1 = method.context[0](method.patches.grid(x))[:, :, : r + 1]
    c2 = method.context[0](method.patches.grid(x2))[:, :, : r + 1]
    assert torch.equal(c1, c2) != leaks


def test_each_prediction_targets_the_patch_k_steps_ahead_in_its_direction():
    # With an identity context network and identity predictors, a prediction is the embedding at its source, and a
    # one-hot embedding per patch reveals where it came from.
    def probe(directions):
        method = build(context_blocks=0, min_steps=2, max_steps=3, directions=directions)
        method.predictors = nn.ModuleList(nn.ModuleList(nn.Identity() for _ in ps) for ps in method.predictors)
        return method

    method = probe(4)
    n, rows, cols = 2, 5, 5
    d = n * rows * cols
    z = torch.eye(d).view(n, rows, cols, d).permute(0, 3, 1, 2)
    preds, targets = method.predictions(z)
    assert preds.shape[0] == 4 * n * cols * ((rows - 2) + (rows - 3))
    moves = set()
    for source, target in zip(preds.argmax(1).tolist(), targets.tolist()):
        (ns, rs, cs), (nt, rt, ct) = [(i // (rows * cols), i // cols % rows, i % cols) for i in (source, target)]
        assert ns == nt
        dr, dc = rt - rs, ct - cs
        assert (dr == 0) != (dc == 0) and abs(dr + dc) in (2, 3)
        moves.add((int(math.copysign(1, dr)) if dr else 0, int(math.copysign(1, dc)) if dc else 0))
    assert moves == {(1, 0), (-1, 0), (0, 1), (0, -1)}  # down (the first direction), up, and both ways across
    _, down_only = probe(1).predictions(z)
    expected = [b * 25 + (i + k) * 5 + j
                for k in (2, 3) for b in range(n) for i in range(rows - k) for j in range(cols)]
    assert down_only.tolist() == expected


# ---- the loss ----------------------------------------------------------------------------------------


def test_infonce_hand_computed_and_against_its_formula():
    # One prediction [1, 0], candidates [1, 0] (the positive) and [0, 1]: -log(e / (e + 1)).
    loss = cpc_infonce(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0]))
    assert loss.item() == pytest.approx(-math.log(math.e / (math.e + 1)), rel=1e-6)
    g = torch.Generator().manual_seed(0)
    p, c, pos = torch.randn(5, 3, generator=g), torch.randn(7, 3, generator=g), torch.tensor([0, 3, 3, 6, 1])
    expected = sum(-(float(p[q] @ c[pos[q]]) - math.log(sum(math.exp(float(p[q] @ cl)) for cl in c)))
                   for q in range(5)) / 5
    assert cpc_infonce(p, c, pos).item() == pytest.approx(expected, rel=1e-5)


def test_bad_choices_are_refused():
    with pytest.raises(Exception, match="layer, batch"):
        build(norm="group")
    with pytest.raises(Exception, match="directions"):
        build(directions=2)
    with pytest.raises(Exception, match="min_steps"):
        build(min_steps=0)
    with pytest.raises(SslrunError, match="max_steps to at most 5"):
        build(min_steps=2, max_steps=6)([image(2)], torch.arange(2))  # a 6x6 grid at 28 px


def test_steps_on_synthetic_views():
    method = build()
    opt = torch.optim.SGD(method.parameters(), lr=0.01)
    x = image(4)
    losses = [engine_step(method, opt, [x, x], TrainState())["loss"].item() for _ in range(2)]
    assert all(math.isfinite(v) for v in losses)
    # At the start every one of the 4 x 36 candidates is about equally likely.
    assert losses[0] == pytest.approx(math.log(4 * 36), rel=0.3)
    out = method([x, x], torch.arange(4))
    assert out["z"].shape == (4, 16)


def test_one_view_per_image_and_a_second_is_ignored():
    method = build()
    method.check_setup([28], 8)
    method.check_setup([28, 28], 8)
