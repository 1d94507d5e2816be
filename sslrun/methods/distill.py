"""Knowledge distillation from an earlier sslrun run into any student backbone.

Losses, each with its own weight (0 = off), combinable:
  soft targets   Hinton et al. 2015: T^2 KL(softmax(t/T) || softmax(s/T)), plus cross-entropy on labels
  label          cross-entropy on the labels (``label_weight``)
  cosine         hidden representation: 1 - cos(student features, teacher features pooled to the same width)
  hint           FitNets (Romero et al. 2015): MSE between a trainable regressor on the student's feature map and
                 the teacher's; the regressor has its own named optimizer (``method.optimizers.regressor``)
  embed          label-free: the student (through a linear head) matches the teacher's normalised embedding
                 (``embed_queue = 0``), or its similarity distribution over a queue of teacher embeddings (SEED,
                 Fang et al. 2021)
The teacher is rebuilt from its checkpoint's stored config (``sslrun.checkpoint.load_checkpoint``), frozen, kept in
eval mode and outside the module tree, so it is in no optimizer and not saved again in the student's checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

from ..checkpoint import load_checkpoint
from ..errors import SslrunError
from .base import FitInfo, Method
from .losses import in_fp32
from .queue import FeatureQueue
from .supervised import LabelsByIndex, classifier_head


@in_fp32
def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. 2015: T^2 * mean over the batch of sum_c p_t (log p_t - log p_s), p = softmax(logits / T).

    The T^2 factor keeps the soft targets' gradient magnitudes comparable to the hard-label loss's as T varies.

    Args:
        student_logits, teacher_logits: [B, num_classes].
        temperature: T > 0 (the PyTorch tutorial's CIFAR-10 recipe: 2).
    Returns: a scalar, nats per sample.
    """
    log_ps = F.log_softmax(student_logits / temperature, dim=1)
    log_pt = F.log_softmax(teacher_logits / temperature, dim=1)
    return (log_pt.exp() * (log_pt - log_ps)).sum(1).mean() * temperature ** 2


def pool_to_width(x: torch.Tensor, width: int) -> torch.Tensor:
    """Average-pool features [B, D] along the feature axis to [B, width] (D = 2 width: pairs averaged)."""
    return x if x.shape[1] == width else F.adaptive_avg_pool1d(x.unsqueeze(1), width).squeeze(1)


@in_fp32
def cosine_feature_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Hidden-representation loss: mean of 1 - cos(s, t) (``CosineEmbeddingLoss`` with target +1), the wider of
    [B, Ds] and [B, Dt] average-pooled to the narrower's width."""
    width = min(student.shape[1], teacher.shape[1])
    return (1 - F.cosine_similarity(pool_to_width(student, width), pool_to_width(teacher, width), dim=1)).mean()


@in_fp32
def seed_loss(student: torch.Tensor, teacher: torch.Tensor, queue: torch.Tensor, t_student: float,
              t_teacher: float) -> torch.Tensor:
    """SEED (Fang et al. 2021): cross-entropy between the teacher's and the student's softmax similarity to
    [queue of teacher embeddings; the teacher's own embedding]. ``student``, ``teacher`` [B, D] and ``queue``
    [K, D], all L2-normalised; temperatures unitless (SEED: 0.2 student, 0.01 teacher)."""
    s_sim = torch.cat([student @ queue.T, (student * teacher).sum(1, keepdim=True)], 1)
    t_sim = torch.cat([teacher @ queue.T, torch.ones_like(s_sim[:, :1])], 1)
    return -(F.softmax(t_sim / t_teacher, 1) * F.log_softmax(s_sim / t_student, 1)).sum(1).mean()


def checkpoint_path(path: str | Path) -> Path:
    """A run directory means its ``checkpoints/last.pt``."""
    p = Path(path).expanduser()
    return p / "checkpoints" / "last.pt" if p.is_dir() else p


class Teacher(nn.Module):
    """A frozen network rebuilt from an sslrun checkpoint: its backbone from ``ck['config']['backbone']`` and, when
    its method saved a ``classifier`` (method=supervised, method=distill), that head from the method's
    ``num_classes``, ``hidden_dim`` and ``dropout`` keys. Always in eval mode; no parameter requires grad."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        path = checkpoint_path(path)
        ck = load_checkpoint(path, "method.teacher")
        cfg = ck.get("config") or {}
        if "backbone" not in cfg:
            raise SslrunError(f"The teacher checkpoint {path} stores no config, so its backbone cannot be rebuilt; "
                              "point method.teacher at a checkpoint written by this version of sslrun.")
        self.path, self.trained_on = path, dict(cfg.get("dataset") or {})  # for messages
        self.backbone = instantiate(cfg["backbone"])
        self.backbone.load_state_dict(ck["backbone"])
        head = {k[len("classifier."):]: v for k, v in ck["method"].items() if k.startswith("classifier.")}
        self.classifier: nn.Module | None = None
        if head:
            m = cfg["method"]
            self.classifier = classifier_head(self.backbone.feat_dim, m["num_classes"], m["hidden_dim"], m["dropout"])
            self.classifier.load_state_dict(head)
        self.feat_dim = self.backbone.feat_dim
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)  # frozen: dropout off and BN statistics fixed, whatever the caller asks


class TeacherCache:
    """The frozen teacher's outputs per pretraining image, kept after the first time an image is seen, so that a
    run whose views are the images as they are (``augmentation=none``, the tutorial's recipe) runs the teacher
    once per image instead of once per epoch: in eval mode, with no gradient, its output is a function of the
    image alone. Each image's input is fingerprinted (a fixed random projection of its pixels); a different
    input for a cached image means the views are augmented, and is refused rather than answered from the cache.

    Memory: ``num_samples`` x the outputs' widths in fp32, allocated on the first batch (CIFAR-10 with the
    tutorial's hint loss: 50,000 x (2,048 + 2,048 + 10) floats, 0.8 GB).
    """

    AUGMENTED = ("method.cache_teacher=true keeps the teacher's output per image, but the views are augmented: an "
                 "image comes back with different pixels. Use augmentation=none (the images as they are), or set "
                 "method.cache_teacher=false to run the teacher on every view.")

    def __init__(self, num_samples: int) -> None:
        self.num_samples = num_samples
        self.outputs: dict[str, torch.Tensor] = {}
        self.fingerprint: torch.Tensor | None = None  # [num_samples]; NaN = not cached yet
        self.projection: torch.Tensor | None = None

    def __call__(self, teach, x: torch.Tensor, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """``teach(x)``'s outputs for the batch ``x`` [B, C, H, W] of images ``index`` [B], from the cache where
        filled. Raises SslrunError when a cached image arrives with different pixels."""
        flat = x.detach().float().flatten(1)
        if self.fingerprint is None:  # the first batch gives the size and the device
            g = torch.Generator().manual_seed(0)
            self.projection = torch.randn(flat.shape[1], generator=g).to(x.device)
            self.fingerprint = torch.full((self.num_samples,), float("nan"), device=x.device)
        fp = (flat * self.projection).sum(1)  # position-weighted: a flip or a crop changes it
        stored = self.fingerprint[index]
        hit = ~stored.isnan()
        changed = hit & ~torch.isclose(fp, stored, rtol=1e-4, atol=1e-3)
        any_changed, n_miss = torch.stack([changed.any().long(), (~hit).sum()]).tolist()  # one host sync per step
        if any_changed:
            raise SslrunError(self.AUGMENTED)
        if n_miss:
            miss = ~hit
            fresh = teach(x[miss])
            if not self.outputs:
                self.outputs = {k: torch.zeros(self.num_samples, *v.shape[1:], device=v.device)
                                for k, v in fresh.items()}
            for k, store in self.outputs.items():
                store[index[miss]] = fresh[k].float()
            self.fingerprint[index[miss]] = fp[miss]
        return {k: store[index] for k, store in self.outputs.items()}


class Distill(Method):
    """A student backbone (and classifier) trained from a frozen teacher's outputs.

    Args:
        backbone: the student's backbone (any).
        teacher: an sslrun run directory or checkpoint.
        num_classes, hidden_dim, dropout: the student's classifier (as ``method=supervised``); built when the
            soft-target or label loss is on.
        temperature: T of the soft targets.
        soft_weight, label_weight, cosine_weight, hint_weight, embed_weight: the loss weights (0 = off).
        embed_queue: 0 = the direct normalised-embedding loss (2 - 2 cos); K > 0 = SEED over K teacher embeddings.
        embed_temperature_student, embed_temperature_teacher: SEED's temperatures.
        cache_teacher: keep the teacher's outputs per image after its first epoch (``TeacherCache``); only for
            un-augmented views, which it checks.
        optimizers: named optimizer groups; ``regressor`` trains the hint regressor (used when ``hint_weight > 0``).

    ``forward`` returns ``loss`` (the weighted sum), each active term by name (``soft``, ``label``, ``cosine``,
    ``hint``, ``embed``; logged as ``train/<name>``) and ``z`` = the student's features.
    Errors: an ``SslrunError`` when no loss is on, when the soft-target loss has a teacher without a classifier,
    when the hint loss has a backbone without ``feature_map``, and when the teacher's classes differ from the
    student's. Only the first view is used. Source: the PyTorch knowledge-distillation tutorial (CIFAR-10), Hinton
    et al. 2015, FitNets, SEED.
    """

    num_large_crops = 1      # only the first view is used (checked by Method.check_setup)
    unused_views_ok = True

    def __init__(self, backbone: nn.Module, teacher: str, num_classes: int, hidden_dim: int, dropout: float,
                 temperature: float, soft_weight: float, label_weight: float, cosine_weight: float,
                 hint_weight: float, embed_weight: float, embed_queue: int, embed_temperature_student: float,
                 embed_temperature_teacher: float, cache_teacher: bool, optimizers: Mapping) -> None:
        super().__init__()
        self.weights = {"soft": soft_weight, "label": label_weight, "cosine": cosine_weight, "hint": hint_weight,
                        "embed": embed_weight}
        if not any(w > 0 for w in self.weights.values()):
            raise SslrunError("method=distill has every loss weight at 0; set at least one of method.soft_weight, "
                              "label_weight, cosine_weight, hint_weight or embed_weight above 0.")
        if teacher is None:
            raise SslrunError("method=distill needs method.teacher=<run dir or checkpoints/last.pt> of an earlier "
                              "sslrun run (e.g. a method=supervised run for soft targets).")
        self.backbone = backbone
        # Outside the module tree (object.__setattr__): in no optimizer, not in state_dict, not moved by .to().
        object.__setattr__(self, "teacher", Teacher(teacher))
        t = self.teacher
        self.temperature, self.num_classes = temperature, num_classes
        self.classifier = (classifier_head(backbone.feat_dim, num_classes, hidden_dim, dropout)
                           if soft_weight > 0 or label_weight > 0 else None)
        if soft_weight > 0:
            if t.classifier is None:
                raise SslrunError(f"method.soft_weight={soft_weight} needs a teacher with a classifier, but {teacher} "
                                  "holds none (train the teacher with method=supervised), or use the cosine, hint or "
                                  "embed losses, which need only the teacher's features.")
            t_classes = t.classifier[-1].out_features
            if t_classes != num_classes:
                raise SslrunError(f"The teacher predicts {t_classes} classes but method.num_classes={num_classes}; "
                                  f"set method.num_classes={t_classes}.")
        self.targets = LabelsByIndex()
        self.regressor, self.optimizer_cfgs = None, optimizers
        if hint_weight > 0:
            for who, net in (("student", backbone), ("teacher", t.backbone)):
                if not hasattr(net, "feature_map") or not hasattr(net, "map_channels"):
                    raise SslrunError(f"method.hint_weight needs the {who}'s feature map, but {type(net).__name__} has "
                                      "no feature_map() and map_channels; use backbone=kd_lightnn / kd_deepnn, or the cosine loss.")
            if "regressor" not in optimizers:
                raise SslrunError("method.hint_weight needs method.optimizers.regressor (conf/method/distill.yaml).")
            # FitNets' regressor: conv3x3 from the student's map channels to the teacher's (tutorial: 16 -> 32).
            self.regressor = nn.Conv2d(backbone.map_channels, t.backbone.map_channels, 3, padding=1)
        self.embed_head = nn.Linear(backbone.feat_dim, t.feat_dim) if embed_weight > 0 else None
        self.queue = FeatureQueue(embed_queue, t.feat_dim, init="randn") if embed_weight > 0 and embed_queue > 0 else None
        self.embed_temps = (embed_temperature_student, embed_temperature_teacher)
        self.cache_teacher = cache_teacher
        self.teacher_cache: TeacherCache | None = None  # built in on_fit_start, when the set's size is known

    def check_inputs(self, channels: int, view_sizes: list[int], views_vary: bool) -> None:
        """One forward of the teacher on two blank first views: a teacher trained on images of other channels (or a
        size its head cannot take) is refused here, naming its training data, not at the first step. The teacher
        cache with random views is refused here too, not when the second epoch meets a cached image."""
        if self.cache_teacher and views_vary:
            raise SslrunError(TeacherCache.AUGMENTED)
        t = self.teacher
        try:
            self._teach(torch.zeros(2, channels, view_sizes[0], view_sizes[0], device=next(t.parameters()).device))
        except RuntimeError as e:
            data = t.trained_on
            raise SslrunError(
                f"The teacher {t.path} cannot take this run's {channels}-channel {view_sizes[0]}-px views "
                f"({str(e).splitlines()[0]}). It was trained on dataset {data.get('name', '?')} "
                f"({data.get('channels', '?')} channel(s), {data.get('image_size', '?')} px): distil on images like "
                "those (dataset=..., augmentation views of that size), or train a teacher on this dataset.") from None

    def param_groups(self) -> list[dict]:
        regressor = {id(p) for p in self.regressor.parameters()} if self.regressor is not None else set()
        return [{"params": [p for p in self.parameters() if p.requires_grad and id(p) not in regressor]}]

    def named_optimizers(self) -> dict[str, tuple[Mapping, list[dict]]]:
        if self.regressor is None:
            return {}
        return {"regressor": (self.optimizer_cfgs["regressor"], [{"params": list(self.regressor.parameters())}])}

    def on_fit_start(self, info: FitInfo) -> None:
        if self.weights["label"] > 0:
            self.targets.fit(info, self.num_classes, "method.label_weight > 0")
        if self.cache_teacher:
            self.teacher_cache = TeacherCache(info.num_samples)

    @torch.no_grad()
    def _teach(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        t = self.teacher
        if next(t.parameters()).device != x.device:
            t.to(x.device)
        out = {}
        if self.weights["hint"] > 0:
            out["map"] = t.backbone.feature_map(x)
            out["feat"] = t.backbone.from_feature_map(out["map"])
        else:
            out["feat"] = t.backbone(x)
        if self.weights["soft"] > 0:
            out["logits"] = t.classifier(out["feat"])
        return out

    def forward(self, views: list[torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        x = views[0]
        teacher = self.teacher_cache(self._teach, x, index) if self.teacher_cache is not None else self._teach(x)
        if self.regressor is not None:
            s_map = self.backbone.feature_map(x)
            feats = self.backbone.from_feature_map(s_map)
        else:
            feats = self.backbone(x)
        terms: dict[str, torch.Tensor] = {}
        logits = self.classifier(feats).float() if self.classifier is not None else None
        if self.weights["label"] > 0:
            y = self.targets(index)
            terms["label"] = F.cross_entropy(logits, y, ignore_index=-1, reduction="sum") / (y >= 0).sum().clamp_min(1)
        if self.weights["soft"] > 0:
            terms["soft"] = soft_target_loss(logits, teacher["logits"], self.temperature)
        if self.weights["cosine"] > 0:
            terms["cosine"] = cosine_feature_loss(feats, teacher["feat"])
        if self.weights["hint"] > 0:
            hint = self.regressor(s_map)
            target = F.adaptive_avg_pool2d(teacher["map"], hint.shape[-2:])
            terms["hint"] = F.mse_loss(hint.float(), target.float())
        if self.weights["embed"] > 0:
            s = F.normalize(self.embed_head(feats).float(), dim=1)
            t = F.normalize(teacher["feat"].float(), dim=1)
            if self.queue is None:
                terms["embed"] = (2 - 2 * (s * t).sum(1)).mean()
            else:
                terms["embed"] = seed_loss(s, t, self.queue.data.clone(), *self.embed_temps)  # a copy: push() writes in place
                self.queue.push(t)  # after use: the current batch is its own positive, not a negative
        loss = sum(self.weights[k] * v for k, v in terms.items())
        return {"loss": loss, "z": feats, **{k: v.detach() for k, v in terms.items()}}
