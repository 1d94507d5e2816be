"""The contract between the engine and a method.

A method is an ``nn.Module`` that owns the backbone, its heads and any state (momentum encoders,
queues, prototypes). The engine calls ``forward(views, index)`` and the optional hooks below; it never
branches on a method's name, and a method never reads the trainer's config.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .. import dist
from .requirements import check_batch, check_views

# ``step(name, loss)``: backpropagate ``loss`` and step optimizer ``name`` (see ``Method.training_step``).
StepFn = Callable[[str, torch.Tensor], None]


@dataclass
class FitInfo:
    """What a method may need to know about the run before training starts."""

    num_samples: int          # images in the pretraining set (memory banks, k-means)
    steps_per_epoch: int
    total_steps: int
    epochs: int
    # Runs a function over the un-augmented pretraining images in index order, batched, and
    # concatenates its outputs (PCL and DeepCluster cluster the whole set with it).
    map_dataset: Callable[[Callable[[torch.Tensor], torch.Tensor]], torch.Tensor] | None = None
    # The pretraining set's labels [num_samples] in index order (-1 = unlabeled): the supervised baseline and
    # distillation's label term read them by the batch's ``index``.
    labels: torch.Tensor | None = None
    # The per-channel mean and std the views were normalised with (generative models map views to [-1, 1]).
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    # The pretraining images' captions in index order (dataset=imagetext), or None: CLIP tokenises them once
    # and reads them by the batch's ``index``.
    captions: list[str] | None = None


@dataclass
class TrainState:
    """Where training is; passed to every hook."""

    step: int = 0             # optimizer steps done so far
    epoch: int = 0
    # Fraction of the training budget used: steps/total, or wall-clock/max_minutes when that is
    # larger. Every schedule (lr, EMA momentum, temperatures) follows it, so a time-bounded run
    # still anneals to its end.
    progress: float = 0.0


class Method(nn.Module):
    """Base class: subclasses set ``self.backbone`` and implement ``forward``.

    ``forward(views, index)`` returns a dict with at least ``loss`` (a scalar) and ``z`` (the projector
    output of the first view, read by the collapse monitor); any other scalar in it (a loss term, such as
    PCL's ``proto_nce``) is logged as ``train/<key>``. ``views`` is a list of normalised image batches, large
    crops first; ``index`` holds the dataset indices of the batch.
    """

    backbone: nn.Module

    # What the method needs of the run, checked by ``check_setup`` before training. A subclass sets those
    # that differ; a new method must state them (the defaults are a two-view method such as SimCLR's).
    min_batch_size: int = 2           # global batch
    min_batch_reason: str = "batch norm needs two or more images per batch"
    num_large_crops: int = 2          # views it uses at full size, the first ones the augmentation makes
    equal_large_crops: bool = True    # its loss pairs the large crops (or one pass takes them): one size
    small_crops: bool = False         # it uses any further (multi-crop) views, each no larger than the large ones
    unused_views_ok: bool = False     # further views are allowed and ignored (one-view methods)

    def forward(self, views: list[torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def check_setup(self, view_sizes: list[int], global_batch: int) -> None:
        """Refuse, before training, a batch or views this method cannot learn from correctly.

        Args:
            view_sizes: the output crop size (px) of every view, in the order the augmentation makes them.
            global_batch: images per step over all processes (``trainer.batch_size``).

        Raises:
            SslrunError: naming the method, the key to change (``trainer.batch_size``,
                ``augmentation.views.N.count`` / ``.size``, ``backbone.patch_size``), its value and the fix.
        """
        name = type(self).__name__
        check_batch(self, name, global_batch)
        check_views(self, name, view_sizes)

    def check_inputs(self, channels: int, view_sizes: list[int], views_vary: bool) -> None:
        """Refuse, before training, inputs the method cannot use: images that a network it brings besides the
        backbone cannot take (distillation: a teacher trained on other images), or random views where it relies on
        the images as they are. The backbone itself is checked by the runner.

        Args:
            channels: channels of the dataset's images.
            view_sizes: the output crop size (px) of every view.
            views_vary: whether the augmentation gives an image different views from one draw to the next.

        Raises:
            SslrunError: naming the network, what it takes and the fix.
        """

    def convert_sync_batchnorm(self) -> None:
        """Normalise every batch-norm layer over the global batch (``trainer.sync_batchnorm``), in place."""
        for child_name, child in self.named_children():
            setattr(self, child_name, dist.convert_sync_batchnorm(child))

    def param_groups(self) -> list[dict]:
        """Optimizer parameter groups; a group with ``fixed_lr: True`` is kept at the base lr."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def eval_backbone(self) -> nn.Module:
        """The network the kNN monitor and the final probes evaluate (DINO: the teacher, as in the paper)."""
        return self.backbone

    def finetune_backbone(self) -> nn.Module:
        """The network fine-tuning starts from (image -> features, with a ``feat_dim``): ``eval_backbone()`` unless
        a method says otherwise (SimCLR v2: the backbone and the projector's first layer)."""
        return self.eval_backbone()

    def params_to_reset(self) -> list[nn.Parameter]:
        """Parameters ``on_epoch_start`` re-initialised, whose optimizer state (momentum) must be cleared."""
        return []

    def on_fit_start(self, info: FitInfo) -> None:
        """Called once before the first step (allocate memory banks, queues)."""

    def on_epoch_start(self, state: TrainState) -> None:
        """Called at the start of every epoch (k-means, temperature schedules)."""

    def on_after_backward(self, state: TrainState) -> None:
        """Called between backward and the optimizer step (freeze a layer, clip gradients)."""

    def on_after_step(self, state: TrainState) -> None:
        """Called after every optimizer step (EMA/momentum update, queue push, normalise prototypes)."""

    def named_optimizers(self) -> dict[str, tuple[Mapping, list[dict]]]:
        """Optimizers beside the main one (which the ``optimizer`` group builds over ``param_groups()``, and
        which is left out when those hold no parameter): name -> (an ``optimizer``-group config, its parameter
        groups). Each has its own lr schedule and checkpoint state (a GAN's generator and discriminator,
        distillation's hint regressor)."""
        return {}

    def training_step(self, views: list[torch.Tensor], index: torch.Tensor, step: StepFn,
                      state: TrainState) -> dict[str, torch.Tensor]:
        """Override to own the step (a GAN's discriminator step, then its generator step). The engine then calls
        this instead of ``forward`` + backward + step, having zeroed every optimizer's gradients; the method
        calls ``step(name, loss)`` once per update, which backpropagates ``loss``, runs ``on_after_backward``,
        averages gradients across processes and steps optimizer ``name`` (``"main"`` for the main one). The
        gradient monitor reads the first such backward of each training step. Returns what ``forward`` does."""
        raise NotImplementedError

    def figures(self) -> dict[str, torch.Tensor]:
        """Image batches [N, C, H, W] in [0, 1] to show at the end of each epoch (reconstructions, samples):
        the monitor writes each as a grid to TensorBoard and ``<run dir>/figures/<name>.png``."""
        return {}

    @classmethod
    def owns_step(cls) -> bool:
        """Whether the method overrides ``training_step``."""
        return cls.training_step is not Method.training_step
