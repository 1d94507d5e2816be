"""One run: load data, build the model, pretrain, evaluate, write metrics.json."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from torch.utils.tensorboard import SummaryWriter

from .config_check import check_against_data, check_config
from .data.datasets import load_dataset
from .checkpoint import load_checkpoint
from .engine.device import cpu_has_bf16_units, resolve_device, resolve_precision
from .engine.trainer import Pretrainer
from .errors import SslrunError
from .eval.evaluate import evaluate
from .monitor.recorder import write_end_figures


def _build(node: DictConfig, what: str, **kwargs):
    """``instantiate`` with the config group named in the error when the YAML and the code disagree."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        raise SslrunError(f"Could not build the {what} from its config ({node.get('_target_')}): {e}. "
                          f"Check the {what} keys you overrode against conf/{what}/.") from e


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _eval_only_config(cfg: DictConfig, overridden: set[str]) -> tuple[DictConfig, dict]:
    """Evaluate a checkpoint with the backbone and dataset it was trained with, unless given on the command line."""
    ck = load_checkpoint(cfg.eval.checkpoint)
    saved = OmegaConf.create(ck.get("config", {}))
    cfg = cfg.copy()
    for group in ("backbone", "dataset"):
        if group not in overridden and group in saved:
            OmegaConf.set_struct(cfg, False)
            cfg[group] = saved[group]
    return cfg, ck


def run(cfg: DictConfig, run_dir: Path, overridden: set[str] = frozenset(), console: Console | None = None) -> dict:
    """Pretrain (unless ``eval.only``) and evaluate; return and write the metrics."""
    console = console or Console()
    check_config(cfg)
    ck = None
    if cfg.eval.only:
        cfg, ck = _eval_only_config(cfg, overridden)
    torch.manual_seed(cfg.trainer.seed)
    device = resolve_device(cfg.trainer.device)
    autocast_dtype = resolve_precision(cfg.trainer.precision, device)
    if device.type == "cpu" and autocast_dtype is None and not cfg.eval.only and cpu_has_bf16_units():
        console.print("[dim]This CPU has bf16 matrix units (AMX): trainer.precision=bf16 trains 1.5-1.8x faster.[/dim]")
    splits = load_dataset(cfg.dataset)
    backbone = _build(cfg.backbone, "backbone")
    t0 = time.perf_counter()
    metrics: dict = {"device": device_name(device)}
    with SummaryWriter(str(run_dir)) as writer:
        if ck is not None:
            try:
                backbone.load_state_dict(ck["backbone"])
            except RuntimeError as e:
                raise SslrunError(f"The checkpoint {cfg.eval.checkpoint} holds a different backbone than "
                                  f"backbone={cfg.backbone._target_} ({str(e).splitlines()[0]}). Pass the backbone "
                                  "it was trained with.") from e
            metrics.update(epochs=ck["state"]["epoch"], checkpoint=str(cfg.eval.checkpoint))
        else:
            check_against_data(cfg, len(splits.pretrain))
            method = _build(cfg.method, "method", backbone=backbone)
            augment = _build(cfg.augmentation, "augmentation", mean=splits.mean, std=splits.std)
            trainer = Pretrainer(method, augment, splits, cfg, device, autocast_dtype, run_dir, writer, console)
            result = trainer.fit()
            metrics.update(epochs=round(result.epochs, 3), steps=result.steps, seconds=round(result.seconds, 1),
                           imgs_per_s=round(result.imgs_per_s, 1), stopped_by=result.stopped_by,
                           spikes=[vars(s) for s in result.spikes], knn_monitor=result.knn_monitor)
            backbone = method.eval_backbone()
        backbone.to(device)
        console.print("Evaluating: extracting features, kNN, linear probe...")
        results = evaluate(backbone, splits, cfg.eval, device, autocast_dtype)
        for key, value in results.items():
            writer.add_scalar(f"eval/{key}", value, metrics.get("steps", 0))
        metrics["eval_seconds"] = round(time.perf_counter() - t0 - metrics.get("seconds", 0.0), 1)
        if cfg.monitor.figures.enabled:
            console.print("Drawing figures: embedding map, retrieval, attention (ViT)...")
            write_end_figures(backbone, splits, cfg, run_dir, writer, device, autocast_dtype, metrics.get("steps", 0))
    metrics.update({k: round(v, 4) for k, v in results.items()})
    if "expected" in cfg:  # an experiment's target: record whether this run reproduced it
        exp = cfg.expected
        metrics["expected"] = OmegaConf.to_container(exp)
        metrics["reproduced"] = bool(metrics.get(exp.metric, float("nan")) >= exp.value - exp.tol)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    console.print(results_table(metrics, run_dir))
    return metrics


def results_table(metrics: dict, run_dir: Path) -> Table:
    table = Table(title=f"sslrun results — {run_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("knn_top1", "knn_top5", "linear_top1", "linear_top5", "epochs", "seconds", "imgs_per_s", "device"):
        if key in metrics:
            value = metrics[key]
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) and key.endswith(("1", "5")) else str(value))
    if metrics.get("spikes"):
        table.add_row("gradient spikes", str(len(metrics["spikes"])))
    return table
