"""A convolutional autoencoder baseline: the backbone encodes, a DCGAN-style decoder reconstructs, and the backbone's
features are the representation the probes judge."""

from __future__ import annotations

import torch
from torch import nn

from .base import FitInfo, Method
from .generative import PixelRange, ShownBatch, decoder, in_eval_mode


def reconstruction_error(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Squared error summed over an image's pixels, averaged over the batch (the tutorials' ``MSE(reduction='sum')
    / batch``), in float32. Shape: ``recon`` and ``x`` [B, C, H, W] in [-1, 1] -> scalar."""
    return (recon.float() - x.float()).square().flatten(1).sum(1).mean()


class Autoencoder(Method):
    """Reconstruct the first view's pixels (in [-1, 1]) from the backbone's features.

    Args:
        backbone: the encoder (``feat_dim`` features: the representation).
        channels, image_size: the images' shape (the decoder's output).
        decoder_width: the decoder's narrowest channel count (its widest is 4x).
        shown_images: how many images the reconstruction figure shows.

    ``forward`` returns ``loss`` = ``reconstruction_error`` (per image, summed over pixels of [-1, 1] values) and
    ``z`` = backbone features [B, feat_dim]. Source: the conv autoencoder of the project's generative-baselines
    reference (summarised in ``shared/reference/generative_baselines.md``), with the configured backbone as encoder.
    """

    num_large_crops = 1      # only the first view is used (checked by Method.check_setup)
    unused_views_ok = True

    def __init__(self, backbone: nn.Module, channels: int, image_size: int, decoder_width: int,
                 shown_images: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder(backbone.feat_dim, channels, image_size, decoder_width)
        self.pixels = PixelRange()
        self.shown = ShownBatch(shown_images)

    def on_fit_start(self, info: FitInfo) -> None:
        self.pixels.fit(info)

    def forward(self, views: list[torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.pixels.to_signed(views[0])
        self.shown.keep(views[0])
        feats = self.backbone(views[0])
        return {"loss": reconstruction_error(self.decoder(feats), x), "z": feats}

    def figures(self) -> dict[str, torch.Tensor]:
        """``reconstructions``: the latest batch's first images (top row) over their reconstructions."""
        if not self.shown.images.numel():
            return {}
        v = self.shown.images
        recon = in_eval_mode(self, lambda: self.decoder(self.backbone(v)))
        return {"reconstructions": torch.cat([self.pixels.to_unit(self.pixels.to_signed(v)), self.pixels.to_unit(recon)])}
