"""A DCGAN baseline (Radford et al., 2016): the discriminator's features are the representation."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SslrunError
from .base import FitInfo, Method, StepFn, TrainState
from .generative import PixelRange, decoder, in_eval_mode

LOSSES = ("bce", "lsgan")


def discriminator_loss(real: torch.Tensor, fake: torch.Tensor, kind: str) -> torch.Tensor:
    """The discriminator's loss on its logits for real and generated images ([B] or [B, 1]), float32.

    ``bce`` (Goodfellow et al. 2014): BCE-with-logits, real -> 1 and fake -> 0, each averaged over its batch and
    summed. ``lsgan`` (Mao et al. 2017): 1/2 E[(D(x) - 1)^2] + 1/2 E[D(G(z))^2].
    """
    real, fake = real.float(), fake.float()
    if kind == "bce":
        return (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
                + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))
    return 0.5 * (real - 1).square().mean() + 0.5 * fake.square().mean()


def generator_loss(fake: torch.Tensor, kind: str) -> torch.Tensor:
    """The generator's loss on the discriminator's logits for generated images, float32: ``bce``: the
    non-saturating -log sigmoid(D(G(z))) (BCE with target 1); ``lsgan``: 1/2 E[(D(G(z)) - 1)^2]."""
    fake = fake.float()
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))
    return 0.5 * (fake - 1).square().mean()


class GAN(Method):
    """A generator and a discriminator updated in turn, each by its own named optimizer.

    Args:
        backbone: the discriminator's trunk (a linear head gives its logit); its features are the representation.
        channels, image_size: the images' shape (the generator's output, pixels in [-1, 1]).
        loss: ``bce`` or ``lsgan``.
        noise_dim: the generator's input, standard normal noise.
        generator_width: the generator's narrowest channel count (DCGAN: Linear, two transposed convs, Tanh).
        optimizers: ``generator`` and ``discriminator``, each an ``optimizer``-group config (own lr schedule).
        shown_images: how many samples the figure shows (from fixed noise).

    ``training_step``: one discriminator step on a real batch (the first view) and as many generated images,
    then one generator step; returns ``loss`` = the sum of the two (for the logs and the non-finite check),
    ``loss_d``, ``loss_g`` and ``z`` = discriminator features of the real batch. Source: the GAN recipes of
    ``shared/reference/generative_baselines.md`` (discriminator step, then generator step, per batch).
    """

    num_large_crops = 1      # only the first view is used (checked by Method.check_setup)
    unused_views_ok = True

    def __init__(self, backbone: nn.Module, channels: int, image_size: int, loss: str, noise_dim: int,
                 generator_width: int, optimizers: Mapping, shown_images: int) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise SslrunError(f"method.loss={loss!r} is not a GAN loss; use one of: {', '.join(LOSSES)}.")
        missing = [k for k in ("generator", "discriminator") if k not in optimizers]
        if missing:
            raise SslrunError(f"method=gan needs method.optimizers.{missing[0]} (an optimizer group, as in "
                              "conf/method/gan.yaml); it was removed or renamed.")
        self.backbone = backbone
        self.head = nn.Linear(backbone.feat_dim, 1)
        self.generator = decoder(noise_dim, channels, image_size, generator_width)
        self.loss_kind, self.noise_dim, self.optimizer_cfgs = loss, noise_dim, optimizers
        self.pixels = PixelRange()
        self.register_buffer("fixed_noise", torch.randn(shown_images, noise_dim,
                                                        generator=torch.Generator().manual_seed(0)))

    def param_groups(self) -> list[dict]:
        return []  # no main optimizer: the two networks have their own

    def named_optimizers(self) -> dict[str, tuple[Mapping, list[dict]]]:
        disc = [p for m in (self.backbone, self.head) for p in m.parameters()]
        return {"discriminator": (self.optimizer_cfgs["discriminator"], [{"params": disc}]),
                "generator": (self.optimizer_cfgs["generator"], [{"params": list(self.generator.parameters())}])}

    def on_fit_start(self, info: FitInfo) -> None:
        self.pixels.fit(info)

    def discriminate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images [B, C, H, W] -> (features [B, feat_dim], logits [B])."""
        feats = self.backbone(x)
        return feats, self.head(feats).squeeze(1)

    def training_step(self, views: list[torch.Tensor], index: torch.Tensor, step: StepFn,
                      state: TrainState) -> dict[str, torch.Tensor]:
        # The generator makes pixels in [-1, 1]; the discriminator sees them normalised like the real views,
        # the input the probes will give its backbone.
        real = views[0]
        fake = self.pixels.to_normalised(self.generator(torch.randn(real.shape[0], self.noise_dim, device=real.device)))
        feats, d_real = self.discriminate(real)
        _, d_fake = self.discriminate(fake.detach())  # no gradient into the generator on D's step
        loss_d = discriminator_loss(d_real, d_fake, self.loss_kind)
        step("discriminator", loss_d)
        loss_g = generator_loss(self.discriminate(fake)[1], self.loss_kind)
        step("generator", loss_g)
        loss_d, loss_g = loss_d.detach(), loss_g.detach()
        return {"loss": loss_d + loss_g, "loss_d": loss_d, "loss_g": loss_g, "z": feats.detach()}

    def forward(self, views: list[torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        raise SslrunError("method=gan owns its training step (training_step); the engine calls that, not forward.")

    def figures(self) -> dict[str, torch.Tensor]:
        """``samples``: the generator (BN in eval mode) on fixed noise."""
        return {"samples": self.pixels.to_unit(in_eval_mode(self.generator, self.generator, self.fixed_noise))}
