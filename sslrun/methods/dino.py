"""DINO (Caron et al., 2021): self-distillation with no labels.

The student (all crops) matches the centred, sharpened output of an EMA teacher (the two global crops).
Follows the official main_dino.py: the DINO head, centring with momentum, the teacher-temperature warm-up,
the last layer frozen during the first epoch(s) and per-parameter gradient clipping. Under
``torch.distributed`` the centre moves by the teacher's mean over the global batch (all-reduced, as the
official ``update_center``); every other term of the loss is per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from .. import dist
from .base import FitInfo, Method, TrainState
from .momentum import cosine_momentum, ema_update, momentum_copy
from .multicrop import NUM_LARGE_CROPS, encode_by_resolution

TRUNC_NORMAL_STD = 0.02  # the official head's init (trunc_normal_, std .02, zero biases)
CLIP_EPS = 1e-6          # the official clip_gradients: coef = clip / (norm + 1e-6)


class DINOHead(nn.Module):
    """MLP (GELU, optional BN) -> bottleneck -> l2-normalise -> weight-normalised Linear to ``out_dim``.

    With ``norm_last_layer`` the weight-norm gain is frozen at 1: the logits are cosines to ``out_dim``
    unit prototypes, which the paper finds stabilises training.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, use_bn: bool = False, norm_last_layer: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(dim, hidden_dim)] + ([nn.BatchNorm1d(hidden_dim)] if use_bn else []) + [nn.GELU()]
            dim = hidden_dim
        layers.append(nn.Linear(dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=TRUNC_NORMAL_STD)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        gain = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            gain.fill_(1.0)
        gain.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The logits in fp32 even under bf16 autocast: they are divided by a teacher temperature of 0.04,
        # which would magnify bf16 rounding 25-fold.
        x = F.normalize(self.mlp(x).float(), dim=-1)
        with torch.autocast(x.device.type, enabled=False):
            return self.last_layer(x)


def dino_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, center: torch.Tensor,
              student_temp: float, teacher_temp: float) -> torch.Tensor:
    """Cross-entropy H(P_t, P_s) averaged over every (teacher crop, student crop) pair of different crops.

    ``student_out``: [V, B, K] logits of all crops; ``teacher_out``: [G, B, K] logits of the G global crops,
    which are the first G student crops (so pair (i, i) is the same view and is skipped, as in the paper).
    P_t = softmax((t - center) / teacher_temp), without gradient; P_s = softmax(s / student_temp).
    """
    n_views, n_global = student_out.shape[0], teacher_out.shape[0]
    log_p_s = F.log_softmax(student_out / student_temp, dim=-1)
    p_t = F.softmax((teacher_out - center) / teacher_temp, dim=-1).detach()
    total = student_out.new_zeros(())
    for i, q in enumerate(p_t):
        ce = -(q * log_p_s).sum(-1).mean(-1)  # [V]: each student crop against teacher crop i
        total = total + ce.sum() - ce[i]
    return total / (n_global * (n_views - 1))


def teacher_temperature(epoch: float, warmup_temp: float, temp: float, warmup_epochs: float) -> float:
    """Linear warm-up from ``warmup_temp`` to ``temp`` over ``warmup_epochs`` epochs, then constant.

    ``epoch`` is fractional (progress x epochs), so the ramp is per step rather than the official per-epoch
    ``np.linspace`` (which reaches ``temp`` one epoch earlier, at epoch ``warmup_epochs - 1``).
    """
    if epoch >= warmup_epochs:
        return temp
    return warmup_temp + (temp - warmup_temp) * epoch / warmup_epochs


def update_center(center: torch.Tensor, batch_mean: torch.Tensor, momentum: float) -> torch.Tensor:
    """c <- m * c + (1 - m) * mean of the teacher outputs over the batch (both global crops)."""
    return center * momentum + batch_mean * (1 - momentum)


@torch.no_grad()
def clip_per_parameter(params: list[nn.Parameter], max_norm: float) -> None:
    """The official ``clip_gradients``: each parameter's gradient is rescaled to norm <= ``max_norm`` on its
    own (not the global norm of ``clip_grad_norm_``); batched, without a host sync."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        norms = torch._foreach_norm(grads)
        torch._foreach_mul_(grads, [torch.clamp(max_norm / (n + CLIP_EPS), max=1.0) for n in norms])


class DINO(Method):
    """DINO: a student (all crops) matches the centred, sharpened output of an EMA teacher (the two large crops).

    Views: the first two (large crops, one size) go through the teacher; any further small crops only
    through the student. Source: Caron et al., ICCV 2021; facebookresearch/dino main_dino.py.
    """

    small_crops = True

    def __init__(self, backbone: nn.Module, out_dim: int = 4096, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 head_layers: int = 3, use_bn_in_head: bool = False, norm_last_layer: bool = True,
                 student_temp: float = 0.1, teacher_temp: float = 0.07, warmup_teacher_temp: float = 0.04,
                 warmup_teacher_temp_epochs: int = 30, center_momentum: float = 0.9, base_momentum: float = 0.9995,
                 final_momentum: float = 1.0, freeze_last_layer: int = 1, clip_grad: float = 3.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = DINOHead(backbone.feat_dim, out_dim, hidden_dim, bottleneck_dim, head_layers, use_bn_in_head,
                             norm_last_layer)
        self.teacher_backbone = momentum_copy(backbone)
        self.teacher_head = momentum_copy(self.head)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.student_temp = student_temp
        self.teacher_temp = teacher_temp
        self.warmup_teacher_temp = warmup_teacher_temp
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.center_momentum = center_momentum
        self.base_momentum = base_momentum
        self.final_momentum = final_momentum
        self.freeze_last_layer = freeze_last_layer
        self.clip_grad = clip_grad
        self._epochs = 1          # set by on_fit_start; turns progress into epochs for the temperature
        self._progress = 0.0      # of the last step seen by a hook: the schedule lags the engine by <= 1 step
        self._batch_mean: torch.Tensor | None = None

    def current_teacher_temp(self) -> float:
        return teacher_temperature(self._progress * self._epochs, self.warmup_teacher_temp, self.teacher_temp,
                                   self.warmup_teacher_temp_epochs)

    def forward(self, views: list[torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        n = views[0].shape[0]
        with torch.no_grad():
            teacher = self.teacher_head(self.teacher_backbone(torch.cat(views[:NUM_LARGE_CROPS])))
        student = self.head(encode_by_resolution(self.backbone, views))
        # This loss uses the old centre; it moves in on_after_step by the global batch's mean.
        self._batch_mean = dist.all_reduce_mean(teacher.mean(0, keepdim=True))
        loss = dino_loss(student.view(len(views), n, -1), teacher.view(NUM_LARGE_CROPS, n, -1), self.center,
                         self.student_temp, self.current_teacher_temp())
        return {"loss": loss, "z": student[:n]}

    # ---- hooks -------------------------------------------------------------------------------
    def eval_backbone(self) -> nn.Module:
        return self.teacher_backbone  # the paper evaluates the teacher: it is the better network

    def on_fit_start(self, info: FitInfo) -> None:
        self._epochs = info.epochs

    def on_epoch_start(self, state: TrainState) -> None:
        self._progress = state.progress

    def get_extra_state(self) -> dict:
        """The schedule's position is Python state: kept in the state dict so a resume mid-epoch is exact."""
        return {"progress": self._progress}

    def set_extra_state(self, state: dict) -> None:
        self._progress = state["progress"]

    def on_after_backward(self, state: TrainState) -> None:
        if self.clip_grad:
            clip_per_parameter([p for p in self.parameters() if p.requires_grad], self.clip_grad)
        # No gradient at all (as the official cancel_gradients_last_layer): the optimizer skips the layer.
        if state.epoch < self.freeze_last_layer:
            for p in self.head.last_layer.parameters():
                p.grad = None

    @torch.no_grad()
    def on_after_step(self, state: TrainState) -> None:
        self._progress = state.progress
        if self._batch_mean is not None:
            self.center.copy_(update_center(self.center, self._batch_mean, self.center_momentum))
            self._batch_mean = None
        m = cosine_momentum(self.base_momentum, state.progress, self.final_momentum)
        ema_update(self.teacher_backbone, self.backbone, m)
        ema_update(self.teacher_head, self.head, m)
