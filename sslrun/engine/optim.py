"""Optimizer and learning-rate schedule from the ``optimizer`` config group."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..errors import SslrunError, build_error
from ..methods.base import Method

# Keys of the optimizer group that the engine handles; everything else goes to the optimizer class.
SCHEDULE_KEYS = ("lr", "weight_decay", "scale_lr", "warmup_epochs", "warmup_start_factor", "min_lr_factor",
                 "exclude_bias_norm")


def effective_lr(cfg: DictConfig, batch_size: int) -> float:
    """The base lr, scaled linearly with the batch (lr x batch/256, Goyal et al.) when ``scale_lr``."""
    return cfg.lr * batch_size / 256 if cfg.scale_lr else cfg.lr


def _split_decay(params: list[nn.Parameter]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    # Biases and norm scales are the 1-d tensors; decaying them hurts and the papers exclude them.
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return decay, no_decay


def build_optimizer(cfg: DictConfig, groups: list[dict], batch_size: int, key: str = "optimizer"
                    ) -> torch.optim.Optimizer:
    """Build the optimizer over a method's parameter groups.

    Each group gets ``base_lr`` (what the schedule multiplies); groups marked ``fixed_lr`` keep it. ``key`` is
    where ``cfg`` sits in the run's config (``optimizer``, ``method.optimizers.<name>``), for the error message.

    Raises:
        SslrunError: when the optimizer class refuses the config (a key it does not take, a bad value).
    """
    lr = effective_lr(cfg, batch_size)
    out = []
    for group in groups:
        params = [p for p in group["params"] if p.requires_grad]
        extra = {k: v for k, v in group.items() if k != "params"}
        extra.setdefault("fixed_lr", False)
        parts = _split_decay(params) if cfg.exclude_bias_norm else (params, [])
        for plist, wd, excluded in ((parts[0], cfg.weight_decay, False), (parts[1], 0.0, True)):
            if plist:
                out.append({"params": plist, "lr": lr, "base_lr": lr, "weight_decay": wd, **extra,
                            **({"lars_exclude": True} if excluded and _is_lars(cfg) else {})})
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in SCHEDULE_KEYS}
    try:
        return instantiate(kwargs, out, lr=lr, weight_decay=cfg.weight_decay)
    except InstantiationException as e:
        raise build_error(e, key, kwargs.get("_target_")) from None


@dataclass
class NamedOptimizer:
    """One of a run's optimizers and the ``optimizer``-group config its lr schedule follows."""

    optimizer: torch.optim.Optimizer
    cfg: DictConfig


def build_optimizers(main_cfg: DictConfig, method: Method, batch_size: int) -> dict[str, NamedOptimizer]:
    """The run's optimizers by name: ``main`` (the ``optimizer`` group over ``method.param_groups()``, left out
    when those hold no trainable parameter) and each of ``method.named_optimizers()``.

    Raises:
        SslrunError: when a method names an optimizer ``main`` or has no trainable parameter at all.
    """
    out: dict[str, NamedOptimizer] = {}
    groups = method.param_groups()
    if any(p.requires_grad for g in groups for p in g["params"]):
        out["main"] = NamedOptimizer(build_optimizer(main_cfg, groups, batch_size), main_cfg)
    for name, (cfg, named_groups) in method.named_optimizers().items():
        if name == "main":
            raise SslrunError(f"{type(method).__name__}.named_optimizers() names an optimizer 'main', the name of the "
                              "one the optimizer group builds; rename it.")
        cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
        out[name] = NamedOptimizer(build_optimizer(cfg, named_groups, batch_size, f"method.optimizers.{name}"), cfg)
    if not out:
        raise SslrunError(f"{type(method).__name__} has no trainable parameter for any optimizer; check that its "
                          "param_groups() or named_optimizers() return the networks it trains.")
    return out


def set_schedules(optimizers: dict[str, NamedOptimizer], progress: float, epochs: int) -> float:
    """Each optimizer's lr at ``progress`` (fraction of the budget) from its own group's warmup and cosine keys;
    returns the first optimizer's lr (the one the logs show)."""
    lrs = []
    for named in optimizers.values():
        c = named.cfg
        warmup_frac = min(1.0, c.warmup_epochs / epochs)
        lrs.append(set_lr(named.optimizer, lr_factor(min(1.0, progress), warmup_frac, c.min_lr_factor,
                                                     c.warmup_start_factor)))
    return lrs[0]


def _is_lars(cfg: DictConfig) -> bool:
    return cfg.get("_target_", "").endswith("LARS")


def lr_factor(progress: float, warmup_frac: float, min_factor: float, start_factor: float = 0.0) -> float:
    """Linear warmup from ``start_factor`` over ``warmup_frac`` of training, then cosine decay to ``min_factor``."""
    if warmup_frac > 0 and progress < warmup_frac:
        return start_factor + (1 - start_factor) * progress / warmup_frac
    t = (progress - warmup_frac) / max(1e-12, 1 - warmup_frac)
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    """Apply the schedule factor to every group not marked ``fixed_lr``; return the first group's lr."""
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] if g.get("fixed_lr") else g["base_lr"] * factor
    return optimizer.param_groups[0]["lr"]
