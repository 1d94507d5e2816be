"""MoCo v1 and v2 (He et al., 2020; Chen et al., 2020): a momentum key encoder, a FIFO queue of negative
keys and InfoNCE. The two versions are one class: v1 is T=0.07 with a linear head, v2 is T=0.2 with a
2-layer MLP head (its stronger augmentation and cosine lr live in other config groups).

Batch norm must not leak through the batch (MoCo sec. 3.3): if a query and its positive key were
normalised with the statistics of the same samples, the model could find the positive by the batch
signature instead of the image, since the queued negatives carry other batches' signatures. The paper
shuffles the key batch across GPUs so that each GPU's BN sees a different subset for keys than for
queries. Here, on one device, BN runs over ``bn_splits`` groups of each batch (split-BN, as the official
CIFAR demo does) and the key batch is shuffled before the key encoder and unshuffled after; under
``torch.distributed`` the key batch is shuffled across processes as in the paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import dist
from ..errors import SslrunError
from .base import Method, TrainState
from .heads import mlp
from .infonce import info_nce
from .momentum import ema_update, momentum_copy
from .queue import FeatureQueue


class SplitBatchNorm(_BatchNorm):
    """BN whose training statistics are taken separately over ``num_splits`` groups of the batch.

    Sample ``i * num_splits + j`` belongs to group j, so the groups become ``num_splits x C`` channels
    of one ``batch_norm`` call (the official CIFAR demo's trick). The running statistics are the
    average over groups; in eval mode this is ordinary BN, so state dicts match ``nn.BatchNorm*``.
    """

    def __init__(self, bn: _BatchNorm, num_splits: int) -> None:
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        self.load_state_dict(bn.state_dict())
        self.num_splits = num_splits

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"SplitBatchNorm expects [N, C, ...] input, got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        s, (n, c) = self.num_splits, x.shape[:2]
        if n % s or n // s < 2:
            raise SslrunError(f"MoCo's split batch norm divides each batch of {n} into method.bn_splits groups "
                              f"({s} per encoder pass), which needs a multiple of {s} with 2 or more images per "
                              "group; set trainer.batch_size to such a multiple, or lower method.bn_splits.")
        # reshape, not view: a channels_last input cannot be regrouped without a copy.
        grouped = x.reshape(n // s, s * c, *x.shape[2:])
        track = self.track_running_stats
        mean = self.running_mean.repeat(s) if track else None
        var = self.running_var.repeat(s) if track else None
        weight = self.weight.repeat(s) if self.affine else None
        bias = self.bias.repeat(s) if self.affine else None
        momentum = 0.0
        if track:
            self.num_batches_tracked.add_(1)
            # momentum=None means a cumulative average, as in nn.BatchNorm.
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        out = F.batch_norm(grouped, mean, var, weight, bias, True, momentum, self.eps)
        if track:
            with torch.no_grad():
                self.running_mean.copy_(mean.view(s, c).mean(0))
                self.running_var.copy_(var.view(s, c).mean(0))
        return out.reshape(x.shape)


def split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every BN layer of ``module`` in place by a :class:`SplitBatchNorm` (same parameters,
    same state-dict keys and parameter order), and return ``module``."""
    for name, child in module.named_children():
        if isinstance(child, _BatchNorm):
            setattr(module, name, SplitBatchNorm(child, num_splits))
        else:
            split_batchnorm(child, num_splits)
    return module


class MoCo(Method):
    """MoCo v1/v2: InfoNCE of a query (view 0) against its key (view 1, momentum encoder) and a queue of past keys.

    Under ``torch.distributed`` the keys of the global batch enter the queue (every process queues the same
    rows, so the queues stay identical) and the key batch is shuffled across processes (Shuffle-BN); each
    query is scored on its own process, so the mean of the processes' losses is the one-process loss.
    Source: He et al., CVPR 2020, Algorithm 1; Chen et al., 2020 (v2); facebookresearch/moco.
    """

    min_batch_reason = "its batch norm statistics need two or more images"

    def __init__(self, backbone: nn.Module, temperature: float = 0.2, proj_layers: int = 2,
                 proj_hidden_dim: int | None = 2048, proj_output_dim: int = 128, queue_size: int = 4096,
                 momentum: float = 0.99, bn_splits: int = 8, symmetric: bool = False) -> None:
        super().__init__()
        # A symmetric step encodes both views in one pass, so it needs twice the groups to keep each
        # BN group at batch/bn_splits samples, as in the demo's per-view passes.
        self.views_per_pass = 2 if symmetric else 1
        if bn_splits > 1:
            # Both encoders, as in the demo: a query normalised over the whole batch would share
            # statistics with every key subset of the batch, while the queued negatives share none.
            split_batchnorm(backbone, bn_splits * self.views_per_pass)
        self.backbone = backbone
        # v2's head has no BN (Linear-ReLU-Linear); with proj_layers=1 it is v1's linear head.
        self.projector = mlp(backbone.feat_dim, proj_hidden_dim, proj_output_dim, proj_layers, hidden_bn=False)
        self.key_backbone = momentum_copy(backbone)
        self.key_projector = momentum_copy(self.projector)
        # Random unit vectors until real keys replace them, as in the official code.
        self.queue = FeatureQueue(queue_size, proj_output_dim, init="randn")
        self.temperature = temperature
        self.momentum = momentum
        self.symmetric = symmetric
        self.equal_large_crops = symmetric  # a symmetric step encodes both views in one pass
        self.bn_splits = bn_splits
        self._new_keys: torch.Tensor | None = None  # this step's keys, queued after the optimizer step

    def check_setup(self, view_sizes: list[int], global_batch: int) -> None:
        super().check_setup(view_sizes, global_batch)
        keys_per_step = global_batch * self.views_per_pass
        if keys_per_step > self.queue.data.shape[0]:
            raise SslrunError(f"{type(self).__name__} queues the {keys_per_step} keys of each step "
                              f"(trainer.batch_size={global_batch}), more than method.queue_size="
                              f"{self.queue.data.shape[0]} holds; set method.queue_size to at least {keys_per_step}.")
        per_process, s = global_batch // dist.world_size(), self.bn_splits
        if s > 1 and (per_process % s or per_process // s < 2):
            raise SslrunError(f"{type(self).__name__}'s split batch norm divides each process's batch of {per_process} "
                              f"(trainer.batch_size={global_batch} over {dist.world_size()} process(es)) into "
                              f"method.bn_splits={s} groups of 2 or more images; set trainer.batch_size to a multiple "
                              f"of {2 * s * dist.world_size()}, or lower method.bn_splits (1 under DDP, where each "
                              "process is a group).")

    def convert_sync_batchnorm(self) -> None:
        raise SslrunError(f"{type(self).__name__} relies on Shuffle-BN: queries and keys must be normalised over "
                          "different images, or the model finds its positive key by the batch statistics (MoCo, sec. "
                          "3.3); batch norm synchronised over all processes would share them. Set "
                          "trainer.sync_batchnorm=false (each process is then its own BN group, as in the paper).")

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector(self.backbone(x)), dim=1)

    def _key(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.key_projector(self.key_backbone(x)), dim=1)

    @torch.no_grad()
    def _shuffled_keys(self, x: torch.Tensor) -> torch.Tensor:
        """Keys of ``x``, computed in a random order (so BN groups differ from the queries') and
        returned in the order of ``x``."""
        if dist.world_size() == 1:
            perm = torch.randperm(x.shape[0], device=x.device)
            return self._key(x[perm])[torch.argsort(perm)]
        # The paper's Shuffle-BN: each process encodes a random slice of the global key batch.
        n, rank = x.shape[0], dist.rank()
        x_all = dist.all_gather(x)
        perm = dist.broadcast(torch.randperm(x_all.shape[0], device=x.device))
        keys_all = dist.all_gather(self._key(x_all[perm.view(-1, n)[rank]]))
        return keys_all[torch.argsort(perm).view(-1, n)[rank]]

    def forward(self, views: list[torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        n, t = views[0].shape[0], self.temperature
        negatives = self.queue.get()
        if self.symmetric:
            # Both views as queries and as keys, in one pass per encoder. The CIFAR demo sums the two
            # directions (it does not average them), and so does this.
            x = torch.cat(views[:2])
            q, k = self._query(x), self._shuffled_keys(x)
            loss = info_nce(q[:n], k[n:], negatives, t) + info_nce(q[n:], k[:n], negatives, t)
        else:
            q, k = self._query(views[0]), self._shuffled_keys(views[1])
            loss = info_nce(q, k, negatives, t)
        # The global batch's keys, queued identically by every process and in one process's order (each view's
        # keys for all images, view after view), so that the queue does not depend on the number of processes.
        d = k.shape[-1]
        gathered = dist.all_gather(k).view(dist.world_size(), self.views_per_pass, n, d)
        self._new_keys = gathered.transpose(0, 1).reshape(-1, d)
        return {"loss": loss, "z": q[:n]}

    def on_after_step(self, state: TrainState) -> None:
        # The paper keeps m constant.
        ema_update(self.key_backbone, self.backbone, self.momentum)
        ema_update(self.key_projector, self.projector, self.momentum)
        # Queued only now: the queue was an input of this step's graph until backward had run.
        if self._new_keys is not None:
            self.queue.push(self._new_keys)
            self._new_keys = None
