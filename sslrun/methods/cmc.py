"""Contrastive Multiview Coding (Tian, Krishnan & Isola, ECCV 2020): two views of an image, its L and ab channels in
the Lab colour space, each with its own encoder, trained so that the two views of one image agree and those of
different images do not.

Each view v has an encoder (a copy of the backbone config built for 1 or 2 input channels) and a linear map to a
128-d l2-normalised embedding z_v. The paper's two-view objective contrasts each view against the
other: ``L = L(z_L -> z_ab) + L(z_ab -> z_L)`` where ``L(q -> k) = -log exp(q.k+/T) / sum_j exp(q.k_j/T)``
(the softmax form; the official code's ``--softmax``, which its README finds better than the binary NCE
estimator (its ``NCECriterion``, "Eq. (12)"), which is not implemented here). The candidates k_j are
- ``negatives=bank`` (the paper's): one memory bank per view; the positive is the other view's bank entry of the
  image, the negatives ``nce_k`` entries drawn uniformly from it, and after each step the entries of the batch move
  towards the new embeddings with momentum (``NCEAverage`` of HobbitLong/CMC);
- ``negatives=batch``: the other images' embeddings of the other view in the (global) batch.
The representation the probes read is both encoders' features concatenated (the paper's evaluation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from .. import dist
from ..errors import SslrunError
from .base import FitInfo, Method, TrainState
from .infonce import info_nce, info_nce_in_batch
from .lab import rgb_to_lab
from .membank import MemoryBank

# The official code's normalisation of L*, a*, b* to about [-1, 1]: centre and half-range of each channel over the
# sRGB gamut (HobbitLong/CMC, train_CMC.py: mean [(0+100)/2, (-86.183+98.233)/2, (-107.857+94.478)/2], std the
# half-ranges).
_LAB_MEAN = (50.0, (-86.183 + 98.233) / 2, (-107.857 + 94.478) / 2)
_LAB_STD = (50.0, (86.183 + 98.233) / 2, (107.857 + 94.478) / 2)


class LabEncoders(nn.Module):
    """Image -> [L encoder features, ab encoder features]: what CMC's probes evaluate.

    Takes the views as the engine gives them (RGB normalised with the dataset's mean and std), undoes that
    normalisation, converts to Lab (:func:`~sslrun.methods.lab.rgb_to_lab`), rescales each channel as the official
    code does, and encodes L and ab separately. ``mean`` and ``std`` are buffers, set by :meth:`set_normalisation`
    before training, so a checkpoint of this module carries them.

    Shape:
        input: [N, 3, H, W]; output: [N, ``feat_dim``] with ``feat_dim`` = the two encoders' widths summed.
    """

    def __init__(self, encoder_l: nn.Module, encoder_ab: nn.Module) -> None:
        super().__init__()
        self.l, self.ab = encoder_l, encoder_ab
        self.feat_dim = encoder_l.feat_dim + encoder_ab.feat_dim
        self.register_buffer("mean", torch.full((3,), float("nan")))
        self.register_buffer("std", torch.full((3,), float("nan")))
        self.register_buffer("lab_mean", torch.tensor(_LAB_MEAN))
        self.register_buffer("lab_std", torch.tensor(_LAB_STD))

    def set_normalisation(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        """The per-channel mean and std the input images were normalised with."""
        self.mean.copy_(torch.tensor(mean))
        self.std.copy_(torch.tensor(std))

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rescaled L [N, 1, H, W] and ab [N, 2, H, W] channels of normalised RGB images [N, 3, H, W]."""
        rgb = (x.float() * self.std.view(1, 3, 1, 1) + self.mean.view(1, 3, 1, 1)).clamp(0, 1)
        lab = (rgb_to_lab(rgb) - self.lab_mean.view(1, 3, 1, 1)) / self.lab_std.view(1, 3, 1, 1)
        return lab[:, :1].to(x.dtype), lab[:, 1:].to(x.dtype)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The L and ab encoders' features of normalised RGB images."""
        light, colour = self.split(x)
        return self.l(light), self.ab(colour)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.encode(x), dim=1)


class CMC(Method):
    """CMC with the L and ab views of Lab: two encoders, a linear embedding per view, and the symmetric
    contrastive loss between the views over a memory bank or the batch (see the module docstring).

    Args:
        backbone: the backbone built for the dataset (3 channels); unused but for its config's sake (the engine
            builds every method with one): the two encoders are built from ``backbone_config``.
        backbone_config: the backbone group's config (``${backbone}``); built with ``in_channels`` 1 (L) and 2 (ab).
        proj_output_dim: size of each view's l2-normalised embedding (the official ``feat_dim``, 128).
        temperature: T of the softmax (``nce_t``: 0.07 on ImageNet, 0.1 on STL-10 in the official README).
        negatives: ``bank`` (memory banks, the paper's) or ``batch`` (the other images of the batch).
        nce_k: negatives drawn from the bank per step (``nce_k``; the official default 4096).
        bank_momentum: bank[i] <- normalise(m bank[i] + (1 - m) z_i) (``nce_m``, 0.5).

    Raises:
        SslrunError: the dataset is not RGB (Lab needs three colour channels), or ``negatives`` is not a choice.

    Source: Tian, Krishnan & Isola, "Contrastive Multiview Coding", ECCV 2020; official code HobbitLong/CMC
    (``train_CMC.py``, ``NCE/NCEAverage.py``, ``dataset.py: RGB2Lab``).
    """

    num_large_crops = 1      # one crop per image, seen as L and as ab
    unused_views_ok = True   # the augmentation's second view is unused
    min_batch_reason = "batch norm needs two or more images per batch, and negatives=batch contrasts with the others"

    def __init__(self, backbone: nn.Module, backbone_config: DictConfig, proj_output_dim: int, temperature: float,
                 negatives: str, nce_k: int, bank_momentum: float) -> None:
        super().__init__()
        if negatives not in ("bank", "batch"):
            raise SslrunError(f"method.negatives={negatives!r} is not a valid choice; use one of: bank, batch.")
        channels = backbone_config.get("in_channels")
        if channels != 3:
            raise SslrunError(f"CMC's views are the L and ab channels of the Lab colour space, which needs RGB "
                              f"images, but this dataset has {channels} channel(s) (dataset.channels). Use an RGB "
                              "dataset (cifar10, cifar100, stl10, imagefolder, synthetic with dataset.channels=3), "
                              "or another method for grayscale data.")
        self.encoder = LabEncoders(instantiate(backbone_config, in_channels=1),
                                   instantiate(backbone_config, in_channels=2))
        # The engine's gradient monitors read ``backbone``'s layers: the L encoder stands for both.
        self.backbone = self.encoder.l
        self.proj_l = nn.Linear(self.encoder.l.feat_dim, proj_output_dim)
        self.proj_ab = nn.Linear(self.encoder.ab.feat_dim, proj_output_dim)
        self.temperature, self.negatives, self.nce_k, self.bank_momentum = temperature, negatives, nce_k, bank_momentum
        self.bank_l: MemoryBank | None = None
        self.bank_ab: MemoryBank | None = None
        self._pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def on_fit_start(self, info: FitInfo) -> None:
        if info.mean is None or len(info.mean) != 3:
            raise SslrunError(f"CMC needs RGB images to convert to Lab, but the views' normalisation has "
                              f"{0 if info.mean is None else len(info.mean)} channel(s); use an RGB dataset.")
        self.encoder.set_normalisation(info.mean, info.std)
        if self.negatives == "bank":
            device = self.proj_l.weight.device
            dim = self.proj_l.out_features
            self.bank_l = MemoryBank(info.num_samples, dim).to(device)
            self.bank_ab = MemoryBank(info.num_samples, dim).to(device)

    def eval_backbone(self) -> nn.Module:
        return self.encoder

    def forward(self, views: list[torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        # One view per image, as in the paper: L and ab of the same crop.
        h_l, h_ab = self.encoder.encode(views[0])
        z_l = F.normalize(self.proj_l(h_l).float(), dim=1)
        z_ab = F.normalize(self.proj_ab(h_ab).float(), dim=1)
        t = self.temperature
        if self.negatives == "batch":
            loss = (info_nce_in_batch(z_l, z_ab, t, keys_learn=True)
                    + info_nce_in_batch(z_ab, z_l, t, keys_learn=True))
        else:
            # Negatives drawn uniformly and shared by the batch, as InstDisc's bank here does.
            noise = torch.randint(len(self.bank_l), (self.nce_k,), device=z_l.device)
            loss = (info_nce(z_l, self.bank_ab(index), self.bank_ab(noise), t)
                    + info_nce(z_ab, self.bank_l(index), self.bank_l(noise), t))
            # Banks are updated after the optimizer step (they were inputs of this step's graph), with the global
            # batch so that every process keeps the same banks.
            self._pending = (dist.all_gather(index), dist.all_gather(z_l.detach()), dist.all_gather(z_ab.detach()))
        return {"loss": loss, "z": z_l}

    def on_after_step(self, state: TrainState) -> None:
        if self._pending is not None:
            index, z_l, z_ab = self._pending
            self.bank_l.update(index, z_l, self.bank_momentum)
            self.bank_ab.update(index, z_ab, self.bank_momentum)
            self._pending = None
