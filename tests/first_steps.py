"""A run's first optimizer steps through the real engine, recorded: for tests that check a recipe (its optimizer,
lr schedule, method hooks and views) without its hundreds of epochs.

``FirstSteps`` is the engine's ``Pretrainer`` stopping after ``steps`` steps at a step boundary (as
``trainer.max_minutes`` stops a run; then ``run`` evaluates), writing its final checkpoint only when
``checkpoint`` is set (a checkpoint of wide heads and their optimizer state is tens of MB; every method's
checkpoint and resume are tested in tests/engine/test_exact_resume.py). Put it in place of
``sslrun.run.Pretrainer`` (pytest's ``monkeypatch.setattr``) and call ``sslrun.run.run``: every check and build
of a user's run happens, the schedule keeps the config's epochs, and ``FirstSteps.last`` is the trainer to read.
"""

from __future__ import annotations

import math

import torch

from sslrun.engine.trainer import Pretrainer


class FirstSteps(Pretrainer):
    """A ``Pretrainer`` that records each step and stops after ``steps`` of them.

    ``records[i]`` holds step i's ``progress`` (the fraction of the budget the schedules read), ``loss``, the
    ``views`` it trained on ([B, C, H, W] shapes, in order), ``backbone_grad`` (the L2 norm of the gradient the
    loss gave the backbone's parameters; 0 when none reached them) and ``groups``: per optimizer name, each
    parameter group's ``(base_lr, lr, fixed_lr)`` as the step used them. ``before`` is the method's tensors
    (parameters and buffers) just before the first step, after ``on_fit_start`` and ``on_epoch_start``.
    """

    steps = 2
    checkpoint = False
    last: FirstSteps | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        FirstSteps.last = self
        self.records: list[dict] = []
        self.before: dict[str, torch.Tensor] | None = None
        make_views = self.augment

        def recorded(images: torch.Tensor, gen: torch.Generator) -> list[torch.Tensor]:
            views = make_views(images, gen)
            self.records[-1]["views"] = [tuple(v.shape) for v in views]
            return views

        self.augment = recorded

    def _step(self, images: torch.Tensor, index: torch.Tensor) -> tuple[dict, float]:
        if self.before is None:
            self.before = {k: v.detach().clone() for k, v in self.method.state_dict().items()
                           if isinstance(v, torch.Tensor)}  # not a module's extra state (DINO's schedule)
        self.records.append({})
        out, lr = super()._step(images, index)
        grads = [p.grad for p in self.method.backbone.parameters() if p.grad is not None]
        self.records[-1].update(
            progress=self.state.progress, loss=out["loss"].item(),
            backbone_grad=torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item() if grads else 0.0,
            groups={name: [(g["base_lr"], g["lr"], g.get("fixed_lr", False)) for g in o.optimizer.param_groups]
                    for name, o in self.optimizers.items()})
        return out, lr

    def _checkpoint(self) -> None:
        if self.checkpoint:
            super()._checkpoint()

    def _should_stop(self, signals) -> str | None:
        return "max_minutes" if self.state.step >= self.steps else super()._should_stop(signals)


def warmup_cosine(progress: float, warmup_frac: float, min_factor: float, start_factor: float) -> float:
    """The lr factor the recipes state (solo-learn's ``warmup_cosine``, SimCLR's and BYOL's schedule), written
    out here as the test's oracle: linear from ``start_factor`` to 1 over the first ``warmup_frac`` of training,
    then half a cosine from 1 down to ``min_factor`` at the end. ``progress`` and ``warmup_frac`` are fractions."""
    if progress < warmup_frac:
        return start_factor + (1 - start_factor) * progress / warmup_frac
    return min_factor + (1 - min_factor) * (1 + math.cos(math.pi * (progress - warmup_frac) / (1 - warmup_frac))) / 2
