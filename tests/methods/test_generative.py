import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from runner import ROOT, engine_step, method_config

from sslrun.backbones.small_cnn import SmallCNN
from sslrun.engine.optim import build_optimizer
from sslrun.errors import SslrunError
from sslrun.methods.ae import reconstruction_error
from sslrun.methods.base import FitInfo, TrainState
from sslrun.methods.gan import GAN, discriminator_loss, generator_loss
from sslrun.methods.vae import kl_divergence

MEAN, STD = (0.3,), (0.4,)
FIT = FitInfo(32, 1, 1, 1, mean=MEAN, std=STD)


def backbone():
    return SmallCNN(in_channels=1, width=4, feat_dim=16, pool_size=1)


def build(name, **kw):
    torch.manual_seed(0)
    cfg = method_config(name)
    m = instantiate(cfg, backbone=backbone(), channels=1, image_size=8, decoder_width=4, shown_images=4, **kw) \
        if name != "gan" else instantiate(cfg, backbone=backbone(), channels=1, image_size=8, generator_width=4,
                                          shown_images=4, noise_dim=8, optimizers=gan_optimizers(), **kw)
    m.on_fit_start(FIT)
    return m


def gan_optimizers():
    adamw = OmegaConf.load(ROOT / "conf" / "optimizer" / "adamw.yaml")
    own = method_config("gan").optimizers
    return OmegaConf.create({k: OmegaConf.merge(adamw, own[k]) for k in own})


def images(n=16, seed=0):
    """Normalised views of a toy image set: a bright square in one of two places."""
    x = torch.zeros(n, 1, 8, 8)
    for i in range(n):
        r = 1 if i % 2 else 4
        x[i, :, r:r + 3, r:r + 3] = 1.0
    return (x - MEAN[0]) / STD[0]


def test_kl_matches_the_closed_form_and_torch_distributions():
    # KL(N(1, 1) || N(0, 1)) = 1/2; KL(N(0, 2) || N(0, 1)) = 1/2 (2 - 1 - ln 2); summed over dims, batch-averaged.
    mu = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)], [0.0, 0.0]])
    hand = (0.5 + 0.5 * (1 - math.log(2))) / 2
    assert kl_divergence(mu, logvar).item() == pytest.approx(hand, rel=1e-6)
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mu, (0.5 * logvar).exp()),
                                            torch.distributions.Normal(0.0, 1.0)).sum(1).mean()
    assert kl_divergence(mu, logvar).item() == pytest.approx(ref.item(), rel=1e-5)
    assert kl_divergence(torch.zeros(2, 4), torch.zeros(2, 4)).item() == 0.0  # the prior itself


def test_reconstruction_error_is_summed_per_image_and_averaged_over_the_batch():
    x = torch.zeros(2, 1, 2, 2)
    recon = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[1.0, 1.0], [1.0, -1.0]]]])
    assert reconstruction_error(recon, x).item() == pytest.approx((1 + 4) / 2)


def test_gan_losses_by_hand():
    half = torch.zeros(3)  # logit 0: sigmoid 1/2, BCE ln 2 against either target
    assert discriminator_loss(half, half, "bce").item() == pytest.approx(2 * math.log(2))
    assert generator_loss(half, "bce").item() == pytest.approx(math.log(2))
    # LSGAN: 1/2 E[(D(x)-1)^2] + 1/2 E[D(G(z))^2] and 1/2 E[(D(G(z))-1)^2]
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 2.0])
    assert discriminator_loss(real, fake, "lsgan").item() == pytest.approx(0.5 * 2 + 0.5 * 2)
    assert generator_loss(fake, "lsgan").item() == pytest.approx(0.5 * (1 + 1) / 2)
    assert discriminator_loss(torch.ones(2), torch.zeros(2), "lsgan").item() == 0.0


@pytest.mark.parametrize("loss", ["bce", "lsgan"])
def test_each_gan_step_updates_only_its_own_network(loss):
    m = build("gan", loss=loss)
    opts = {name: build_optimizer(cfg, groups, 16) for name, (cfg, groups) in m.named_optimizers().items()}
    assert m.param_groups() == []  # no main optimizer
    nets = {"discriminator": torch.nn.ModuleList([m.backbone, m.head]), "generator": m.generator}
    changed = []

    def snapshot():
        return {k: [p.detach().clone() for p in net.parameters()] for k, net in nets.items()}

    def step(name, loss_value):
        before = snapshot()
        opts[name].zero_grad(set_to_none=True)
        loss_value.backward()
        opts[name].step()
        after = snapshot()
        changed.append({k: any(not torch.equal(a, b) for a, b in zip(before[k], after[k])) for k in nets})

    out = m.training_step([images()], torch.arange(16), step, TrainState())
    assert changed == [{"discriminator": True, "generator": False}, {"discriminator": False, "generator": True}]
    assert out["loss"].item() == pytest.approx(out["loss_d"].item() + out["loss_g"].item())
    assert out["z"].shape == (16, 16)
    samples = m.figures()["samples"]
    assert samples.shape == (4, 1, 8, 8) and 0 <= samples.min() and samples.max() <= 1


def test_gan_refuses_an_unknown_loss_and_a_missing_optimizer():
    kw = dict(channels=1, image_size=8, noise_dim=8, generator_width=4, shown_images=4)
    with pytest.raises(SslrunError, match="bce, lsgan"):
        GAN(backbone(), loss="wgan", optimizers=gan_optimizers(), **kw)
    with pytest.raises(SslrunError, match="method.optimizers.generator"):
        GAN(backbone(), loss="bce", optimizers={"discriminator": {}}, **kw)


@pytest.mark.parametrize("name", ["ae", "vae"])
def test_autoencoders_learn_to_reconstruct(name):
    m = build(name)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    state, x = TrainState(), images()
    first = engine_step(m, opt, [x], state)
    for _ in range(40):
        last = engine_step(m, opt, [x], state)
    assert last["loss"].item() < 0.5 * first["loss"].item()
    figs = m.figures()
    assert figs["reconstructions"].shape == (8, 1, 8, 8)  # 4 inputs over 4 reconstructions
    if name == "vae":
        assert last["loss"].item() == pytest.approx(last["reconstruction"].item() + last["kl"].item(), rel=1e-5)
        assert figs["samples"].shape == (4, 1, 8, 8)
        enc = m.eval_backbone()
        assert enc.feat_dim == 20 and enc(x).shape == (16, 20)
        assert torch.equal(enc.eval()(x), m.eval().mean(m.backbone(x)))  # the representation is the mean


def test_vae_beta_weights_the_kl_term():
    x = images()
    outs = []
    for beta in (1.0, 4.0):
        m = build("vae", beta=beta)
        torch.manual_seed(1)
        outs.append(m([x], torch.arange(16)))
    (o1, o4) = outs
    assert o1["kl"].item() == pytest.approx(o4["kl"].item())
    assert o4["loss"].item() == pytest.approx(o4["reconstruction"].item() + 4.0 * o4["kl"].item(), rel=1e-5)


@pytest.mark.slow
def test_gan_end_to_end_with_two_named_optimizers(tmp_path):
    """The engine builds the generator's and discriminator's optimizers from method.optimizers, lets the method own
    its step, checkpoints both, and the monitor writes the samples grid."""
    from runner import FAST, read_metrics, sslrun

    fast = [a for a in FAST if not a.startswith("method.")]
    sslrun("method=gan", "method.loss=lsgan", *fast, "method.optimizers.generator.lr=1e-3", f"hydra.run.dir={tmp_path}")
    m = read_metrics(tmp_path)
    assert 0.0 <= m["knn_top1"] <= 1.0 and m["steps"] == 4
    assert (tmp_path / "figures" / "samples.png").is_file()
    ck = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    assert set(ck["optimizer"]) == {"discriminator", "generator"}  # no main optimizer: the method has none
    lrs = {k: v["param_groups"][0]["lr"] for k, v in ck["optimizer"].items()}
    assert lrs == {"discriminator": pytest.approx(3e-4), "generator": pytest.approx(1e-3)}  # own groups, constant
    assert all(v["state"] for v in ck["optimizer"].values())  # both stepped (Adam moments exist)
