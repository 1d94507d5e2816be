"""SwAV (Caron et al., 2020): predict the Sinkhorn codes of each large crop from every other crop.

Follows the official main_swav.py: l2-normalised embeddings scored against l2-normalised prototypes,
codes from :func:`~sslrun.methods.sinkhorn.sinkhorn` (no gradient), a queue of past large-crop embeddings
prepended to the Sinkhorn input once it is full, prototypes frozen for the first iterations, multi-crop.

Under ``torch.distributed`` Sinkhorn's sums run over the global batch, and the queue holds the global
batch's embeddings in the order one process would (identical on every process, so a checkpoint from
rank 0 holds it all); each process prepends its own slice of the queue, so that queue and batch enter
the plan once each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import dist
from ..errors import SslrunError
from .base import Method, TrainState
from .heads import mlp
from .losses import in_fp32
from .multicrop import NUM_LARGE_CROPS, encode_by_resolution
from .queue import FeatureQueue
from .sinkhorn import sinkhorn


def swapped_prediction_loss(scores: torch.Tensor, codes: torch.Tensor, temperature: float) -> torch.Tensor:
    """SwAV's loss with multi-crop (eq. 1 and 4): every crop v predicts the codes q_a of every large crop
    a != v through p_v = softmax(scores_v / T); the cross-entropy -sum_k q_a log p_v is averaged over the
    samples, over the V - 1 predicting crops and over the A coded crops.

    ``scores``: [V, B, K] prototype scores of all crops; ``codes``: [A, B, K] codes of the first A crops.
    """
    n_views = scores.shape[0]
    log_p = F.log_softmax(scores / temperature, dim=-1)
    losses = []
    for a, q in enumerate(codes):
        ce = -(q * log_p).sum(-1).mean(-1)  # [V]: each crop predicting q_a
        losses.append((ce.sum() - ce[a]) / (n_views - 1))  # a crop does not predict its own code
    return torch.stack(losses).mean()


class SwAV(Method):
    """SwAV: swapped prediction of Sinkhorn codes over ``num_prototypes`` prototypes, with multi-crop.

    Views: the first two (large crops, one size) are coded; any further small crops only predict.
    Source: Caron et al., NeurIPS 2020; facebookresearch/swav main_swav.py.
    """

    small_crops = True
    min_batch_reason = "Sinkhorn spreads the batch over the prototypes, and batch norm needs two images"

    def __init__(self, backbone: nn.Module, proj_hidden_dim: int = 2048, proj_output_dim: int = 128,
                 num_prototypes: int = 3000, temperature: float = 0.1, sinkhorn_epsilon: float = 0.05,
                 sinkhorn_iters: int = 3, queue_length: int = 3840, queue_start_epoch: int = 50,
                 freeze_prototypes_iters: int = 390) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = mlp(backbone.feat_dim, proj_hidden_dim, proj_output_dim, 2)
        self.prototypes = nn.Linear(proj_output_dim, num_prototypes, bias=False)
        self._normalize_prototypes()
        # One queue per coded crop, as in the official code; saved in checkpoints with the model.
        self.queues = nn.ModuleList(
            [FeatureQueue(queue_length, proj_output_dim) for _ in range(NUM_LARGE_CROPS)] if queue_length > 0 else [])
        self.temperature = temperature
        self.sinkhorn_epsilon = sinkhorn_epsilon
        self.sinkhorn_iters = sinkhorn_iters
        self.queue_start_epoch = queue_start_epoch
        self.freeze_prototypes_iters = freeze_prototypes_iters
        self._epoch = 0
        self._queue_full = False  # cached: a full queue stays full, so its fill level is read only while filling
        self._to_push: torch.Tensor | None = None

    def check_setup(self, view_sizes: list[int], global_batch: int) -> None:
        super().check_setup(view_sizes, global_batch)
        length = self.queues[0].data.shape[0] if len(self.queues) else 0
        if 0 < length < global_batch:
            raise SslrunError(f"SwAV's queue keeps the large crops of past batches, but method.queue_length={length} "
                              f"is shorter than one batch (trainer.batch_size={global_batch}); set method.queue_length "
                              f"to a multiple of {global_batch} (the paper: 3840 at batch 256), or 0 for no queue.")

    # ---- forward -----------------------------------------------------------------------------
    @in_fp32
    def _scores(self, z: torch.Tensor) -> torch.Tensor:
        # Cosine scores in fp32 even under bf16 autocast: they are divided by T = 0.1 for the loss and
        # by epsilon = 0.05 inside Sinkhorn's exp, which would magnify bf16 rounding into noisy codes.
        return self.prototypes(z)

    def _queue_on(self) -> bool:
        return len(self.queues) > 0 and self._epoch >= self.queue_start_epoch

    def _queue_ready(self) -> bool:
        """The queue is used once it is full (the official code: once its last row is non-zero)."""
        if not self._queue_full and self._queue_on():
            self._queue_full = all(int(q.filled) == q.data.shape[0] for q in self.queues)
        return self._queue_full

    @torch.no_grad()
    def _codes(self, large_scores: torch.Tensor) -> torch.Tensor:
        """Sinkhorn codes [A, B, K] of the large crops, with no gradient (they are targets).

        With a full queue, its embeddings scored by today's prototypes are prepended to the batch: the
        equipartition then holds over queue + batch, which matters when the batch is smaller than K.
        """
        n = large_scores.shape[1]
        use_queue = self._queue_ready()
        codes = []
        for i, s in enumerate(large_scores):
            if use_queue:
                s = torch.cat([self._scores(self._queue_slice(self.queues[i].data)), s])
            codes.append(sinkhorn(s, self.sinkhorn_epsilon, self.sinkhorn_iters)[-n:])
        return torch.stack(codes)

    @staticmethod
    def _queue_slice(data: torch.Tensor) -> torch.Tensor:
        """This process's share of the (global) queue: rows [r L / N, (r + 1) L / N)."""
        size, r, world = data.shape[0], dist.rank(), dist.world_size()
        return data[r * size // world:(r + 1) * size // world]

    def forward(self, views: list[torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        n = views[0].shape[0]
        # The projector (its BN included) sees all crops at once, as in the official code.
        z = F.normalize(self.projector(encode_by_resolution(self.backbone, views)).float(), dim=1)
        scores = self._scores(z).view(len(views), n, -1)  # [V, B, K]
        codes = self._codes(scores[:NUM_LARGE_CROPS])
        if self._queue_on():
            # [A, global B, d]: the large crops of every process, in rank order.
            large = z[: NUM_LARGE_CROPS * n].detach().view(NUM_LARGE_CROPS, n, -1)
            self._to_push = dist.all_gather(large.transpose(0, 1).contiguous()).transpose(0, 1)
        loss = swapped_prediction_loss(scores, codes, self.temperature)
        return {"loss": loss, "z": z[:n], "codes": codes}

    # ---- hooks -------------------------------------------------------------------------------
    @torch.no_grad()
    def _normalize_prototypes(self) -> None:
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def on_epoch_start(self, state: TrainState) -> None:
        self._epoch = state.epoch

    def on_after_backward(self, state: TrainState) -> None:
        # As the official code: no gradient at all, so the optimizer skips the prototypes (no momentum, no decay).
        if state.step < self.freeze_prototypes_iters:
            self.prototypes.weight.grad = None

    def on_after_step(self, state: TrainState) -> None:
        # Prototypes back on the unit sphere after each step. The official code normalises at the start of
        # each iteration, i.e. the same point (only the step changes them); doing it here keeps forward free
        # of in-place parameter writes, which torch.compile and evaluation-time forwards would not expect.
        self._normalize_prototypes()
        # The batch enters the queue after its codes were computed, so it is never coded against itself twice.
        if self._to_push is not None:
            for queue, z in zip(self.queues, self._to_push):
                queue.push(z)
            self._to_push = None
