"""SimCLR v2 (Chen, Kornblith, Swersky, Norouzi & Hinton, NeurIPS 2020, "Big Self-Supervised Models are Strong
Semi-Supervised Learners"): SimCLR with a deeper projector, fine-tuning from its first layer, and MoCo's memory.

Three changes to SimCLR:
- the projection head g has 3 layers (Linear-BN-ReLU twice, then Linear) instead of 2;
- fine-tuning starts from the first layer of that head, not from the backbone's output:
  :meth:`SimCLRv2.finetune_backbone` is backbone -> Linear -> BN -> ReLU, the official TF2 code's
  ``ft_proj_selector=1`` (google-research/simclr, ``tf2/model.py``: ``hiddens_list[1]``);
- "the memory mechanism from MoCo": a momentum copy of the network whose outputs are queued and serve as extra
  negatives of the NT-Xent loss (``queue_length`` > 0; 0 turns it off). The positives and in-batch negatives stay
  the online network's, as in SimCLR; the queued outputs of the last batches are only negatives.
The probes (kNN, linear) read the backbone, as for every other method.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import dist
from ..errors import SslrunError
from .base import Method, TrainState
from .heads import mlp
from .losses import nt_xent
from .momentum import ema_update, momentum_copy
from .queue import FeatureQueue


class SimCLRv2(Method):
    """SimCLR v2: backbone -> 3-layer projector, NT-Xent between the two views of each image, optionally with a
    queue of a momentum network's outputs as extra negatives.

    Args:
        backbone: the encoder (``feat_dim`` features).
        temperature: T of NT-Xent (the paper: 0.1).
        proj_hidden_dim, proj_output_dim: widths of the projector's hidden layers and output.
        proj_layers: layers of the projector (the paper: 3).
        queue_length: rows of the memory of past momentum outputs (0 = no memory network, SimCLR v1's loss with
            a deeper head).
        queue_momentum: EMA momentum of the memory network (MoCo's m).

    Source: Chen et al., NeurIPS 2020; official code google-research/simclr (tf2).
    """

    min_batch_reason = "the other images of the batch are its negatives"

    def __init__(self, backbone: nn.Module, temperature: float, proj_hidden_dim: int, proj_output_dim: int,
                 proj_layers: int, queue_length: int, queue_momentum: float) -> None:
        super().__init__()
        if proj_layers < 2:
            raise SslrunError(f"SimCLR v2 fine-tunes from the projector's first layer, so it needs a projector of 2 "
                              f"or more layers, but method.proj_layers={proj_layers}; set it to 3 (the paper's).")
        self.backbone = backbone
        self.projector = mlp(backbone.feat_dim, proj_hidden_dim, proj_output_dim, proj_layers)
        self.temperature = temperature
        self.queue_momentum = queue_momentum
        self.queue: FeatureQueue | None = None
        if queue_length > 0:
            self.memory_backbone = momentum_copy(backbone)
            self.memory_projector = momentum_copy(self.projector)
            self.queue = FeatureQueue(queue_length, proj_output_dim)
        self._new_keys: torch.Tensor | None = None  # this step's memory outputs, queued after the optimizer step

    def check_setup(self, view_sizes: list[int], global_batch: int) -> None:
        super().check_setup(view_sizes, global_batch)
        if self.queue is not None and self.queue.data.shape[0] < 2 * global_batch:
            raise SslrunError(f"SimCLR v2's memory queues both views of every image, {2 * global_batch} rows per step "
                              f"at trainer.batch_size={global_batch}, but method.queue_length="
                              f"{self.queue.data.shape[0]}; set method.queue_length to at least {2 * global_batch} "
                              "(or 0 for no memory).")

    def forward(self, views: list[torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        n = views[0].shape[0]
        x = torch.cat(views[:2])
        z = self.projector(self.backbone(x))
        z1, z2 = z[:n], z[n:]
        if self.queue is None:
            return {"loss": nt_xent(z1, z2, self.temperature), "z": z1}
        # Until it has filled once, the queue holds only the rows written so far (none at the first step).
        negatives = self.queue.get()
        loss = nt_xent(z1, z2, self.temperature, negatives if negatives.shape[0] else None)
        with torch.no_grad():
            keys = F.normalize(self.memory_projector(self.memory_backbone(x)), dim=1)
        # All first views, then all second views, in rank order: the queue one process would hold.
        world = dist.world_size()
        self._new_keys = dist.all_gather(keys).view(world, 2, n, -1).transpose(0, 1).reshape(2 * world * n, -1)
        return {"loss": loss, "z": z1}

    def on_after_step(self, state: TrainState) -> None:
        if self.queue is None:
            return
        ema_update(self.memory_backbone, self.backbone, self.queue_momentum)
        ema_update(self.memory_projector, self.projector, self.queue_momentum)
        # Queued only now, so that no image is its own negative within the step that made it.
        if self._new_keys is not None:
            self.queue.push(self._new_keys)
            self._new_keys = None

    def finetune_backbone(self) -> nn.Module:
        """The network fine-tuning starts from: the backbone and the projector's first layer (Linear, BN, ReLU),
        image -> [N, ``proj_hidden_dim``] features (its ``feat_dim``). Shares its modules with the method."""
        net = nn.Sequential(self.backbone, *self.projector[:3])
        net.feat_dim = self.projector[0].out_features
        return net
