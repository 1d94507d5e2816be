"""A variational autoencoder baseline (Kingma & Welling, 2014): the encoder's mean is the representation."""

from __future__ import annotations

import torch
from torch import nn

from .ae import reconstruction_error
from .base import FitInfo, Method
from .generative import PixelRange, ShownBatch, decoder, in_eval_mode


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) = -1/2 sum(1 + logvar - mu^2 - exp(logvar)), summed over the latent
    dimensions and averaged over the batch (Kingma & Welling 2014, appendix B), in float32, nats.
    Shape: ``mu``, ``logvar`` [B, D] -> scalar."""
    mu, logvar = mu.float(), logvar.float()
    return (-0.5 * (1 + logvar - mu.square() - logvar.exp()).sum(1)).mean()


class MeanEncoder(nn.Module):
    """The backbone followed by the VAE's mean head: what the probes evaluate, ``latent_dim`` wide."""

    def __init__(self, backbone: nn.Module, mean: nn.Linear) -> None:
        super().__init__()
        self.backbone, self.mean = backbone, mean
        self.feat_dim = mean.out_features
        self.first_layer = f"backbone.{backbone.first_layer}"
        self.last_layer = "mean"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mean(self.backbone(x))


class VAE(Method):
    """Reparameterised Gaussian latent: z = mu + eps * exp(logvar / 2), loss = reconstruction + beta * KL.

    Args:
        backbone: the encoder trunk; linear heads map its features to the latent mean and log-variance.
        channels, image_size: the images' shape (the decoder's output).
        latent_dim: the latent's width (the representation's).
        beta: the KL weight (1 = the ELBO; beta > 1 = beta-VAE, Higgins et al. 2017).
        decoder_width: the decoder's narrowest channel count.
        shown_images: how many images the figures show.

    ``forward`` returns ``loss``, ``reconstruction`` (squared error summed over pixels in [-1, 1], per image),
    ``kl`` (nats per image) and ``z`` = the mean [B, latent_dim]. ``eval_backbone()`` is the ``MeanEncoder``.
    Source: the VAE of ``shared/reference/generative_baselines.md`` (summed MSE + KL, divided by the batch).
    """

    num_large_crops = 1      # only the first view is used (checked by Method.check_setup)
    unused_views_ok = True

    def __init__(self, backbone: nn.Module, channels: int, image_size: int, latent_dim: int, beta: float,
                 decoder_width: int, shown_images: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.mean = nn.Linear(backbone.feat_dim, latent_dim)
        self.logvar = nn.Linear(backbone.feat_dim, latent_dim)
        self.decoder = decoder(latent_dim, channels, image_size, decoder_width)
        self.beta = beta
        self.pixels = PixelRange()
        self.shown = ShownBatch(shown_images)
        self.register_buffer("prior_noise", torch.randn(shown_images, latent_dim,
                                                        generator=torch.Generator().manual_seed(0)))

    def eval_backbone(self) -> nn.Module:
        return MeanEncoder(self.backbone, self.mean)  # built on demand: the module tree holds each part once

    def on_fit_start(self, info: FitInfo) -> None:
        self.pixels.fit(info)

    def forward(self, views: list[torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.pixels.to_signed(views[0])
        self.shown.keep(views[0])
        h = self.backbone(views[0])
        mu, logvar = self.mean(h), self.logvar(h)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        rec, kl = reconstruction_error(self.decoder(z), x), kl_divergence(mu, logvar)
        return {"loss": rec + self.beta * kl, "z": mu, "reconstruction": rec.detach(), "kl": kl.detach()}

    def figures(self) -> dict[str, torch.Tensor]:
        """``reconstructions`` (inputs over the decoded means) and ``samples`` (the decoder on fixed prior draws)."""
        if not self.shown.images.numel():
            return {}
        v = self.shown.images
        recon = in_eval_mode(self, lambda: self.decoder(self.mean(self.backbone(v))))
        samples = in_eval_mode(self, self.decoder, self.prior_noise)
        return {"reconstructions": torch.cat([self.pixels.to_unit(self.pixels.to_signed(v)), self.pixels.to_unit(recon)]),
                "samples": self.pixels.to_unit(samples)}
