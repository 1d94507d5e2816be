"""One run: load data, build the model, pretrain, evaluate, write metrics.json."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from torch.utils.tensorboard import SummaryWriter

from . import dist
from .checkpoint import load_checkpoint, write_text_atomic
from .config_check import check_against_data, check_config
from .data.augment import check_views_fit
from .data.datasets import load_dataset
from .engine.device import resolve_device, resolve_precision
from .engine.resume import check_resumable, finished_message
from .engine.trainer import Pretrainer
from .errors import SslrunError, build_error
from .eval.adapt import tta_table
from .eval.evaluate import evaluate
from .eval.finetune import finetune_eval
from .eval.zero_shot import zero_shot_eval
from .monitor.recorder import write_end_figures
from .report.expected import judge

def _build(node: DictConfig, what: str, **kwargs):
    """``instantiate`` with the config group named in the error when the YAML and the code disagree."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        raise build_error(e, what, node.get("_target_")) from None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def override_keys(overrides: Sequence[str]) -> list[str]:
    """The dotted keys (or group names) that command-line overrides set: ``+dataset.limit_test=5`` -> ``dataset.limit_test``."""
    return [o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o]


def _eval_only_config(cfg: DictConfig, overrides: Sequence[str]) -> tuple[DictConfig, dict]:
    """The checkpoint's whole stored config, with the command line's overrides merged into it key by key.

    ``dataset.limit_test=100`` changes that one key of the stored dataset, ``dataset=mnist`` replaces the group;
    everything not given (backbone, method, the probes' settings, the seed) is what the training run used, so
    eval.only evaluates the checkpoint exactly as its own run did. Keys newer than the checkpoint keep their
    defaults.
    """
    ck = load_checkpoint(cfg.eval.checkpoint, "eval.checkpoint")
    saved = OmegaConf.create(ck.get("config", {}))
    out = cfg.copy()
    OmegaConf.set_struct(out, False)
    for group, node in saved.items():
        # A built group (it has a _target_) is taken whole: another class's keys must not leak into it. The
        # others (trainer, eval, monitor) are merged, so keys newer than the checkpoint keep their defaults.
        is_built = isinstance(node, DictConfig) and "_target_" in node
        out[group] = node if is_built or group not in out else OmegaConf.merge(out[group], node)
    for key in override_keys(overrides):
        if key.startswith("hydra."):
            continue
        if "." not in key and key in cfg:  # a new choice of a whole group
            out[key] = cfg[key]
        else:
            OmegaConf.update(out, key, OmegaConf.select(cfg, key), force_add=True)
    OmegaConf.set_struct(out, True)
    return out, ck


def _checkpoint_backbone(cfg: DictConfig, ck: dict, backbone: torch.nn.Module) -> torch.nn.Module:
    """The evaluated network of an eval-only checkpoint: the backbone, or, for a method that evaluates a network
    of its own (CMC's two Lab encoders, CPC's patch pooling), the method's ``eval_backbone()`` rebuilt from
    the checkpoint's method config. The checkpoint's ``backbone`` entry is that network's state either way."""
    try:
        backbone.load_state_dict(ck["backbone"])
        return backbone
    except RuntimeError as e:
        first_error = str(e).splitlines()[0]
    try:
        network = _build(cfg.method, "method", backbone=backbone).eval_backbone()
        network.load_state_dict(ck["backbone"])
        return network
    except (RuntimeError, SslrunError):
        raise SslrunError(f"The checkpoint {cfg.eval.checkpoint} holds a different network than "
                          f"backbone={cfg.backbone._target_} ({first_error}). Pass the backbone and method it was "
                          "trained with (or drop backbone= / method= to use the checkpoint's).") from None


def _check_backbone_takes(backbone: torch.nn.Module, channels: int, sizes: list[int], fix: str) -> None:
    """One forward of two blank images per size, before any work: images the backbone cannot take (a view smaller
    than its pooling, a checkpoint's backbone trained on other channels) are refused here, naming the size and
    ``fix``, instead of failing with a traceback at the first step."""
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            for size in sizes:
                try:
                    backbone(torch.zeros(2, channels, size, size))
                except RuntimeError as e:
                    raise SslrunError(f"The backbone cannot take {channels}-channel {size}-px images "
                                      f"({str(e).splitlines()[0]}): {fix}") from None
    finally:
        backbone.train(was_training)


def _views_vary(augment: torch.nn.Module, images) -> bool:
    """Whether the augmentation gives two images other views under another random draw (crops, flips, colour)."""
    x = images[:2].to("cpu")
    first, second = (augment(x, torch.Generator().manual_seed(seed)) for seed in (1, 2))
    return any(not torch.equal(a, b) for a, b in zip(first, second))


def _resume_checkpoint(cfg: DictConfig, run_dir: Path) -> tuple[dict | None, Path | None]:
    """The checkpoint this run continues, checked against the config given now, or (None, None)."""
    r = cfg.trainer.resume
    if r == "never":
        return None, None
    path = run_dir / "checkpoints" / "last.pt" if r == "auto" else Path(r)
    if r == "auto" and not path.is_file():
        return None, None
    ck = load_checkpoint(path, "trainer.resume")
    check_resumable(ck, OmegaConf.to_container(cfg, resolve=True), path, bool(cfg.trainer.resume_force))
    done = finished_message(ck, cfg.trainer, path)
    if done:
        raise SslrunError(done)
    return ck, path


def _warn_clamped(cfg: DictConfig, num_train: int, console: Console) -> None:
    """Values the code would silently clamp: say so in one line each."""
    if cfg.eval.knn.enabled and cfg.eval.knn.k > num_train:
        console.print(f"[yellow]eval.knn.k={cfg.eval.knn.k} is larger than the kNN bank ({num_train} train "
                      f"images): every train image votes (k={num_train}).[/yellow]")
    if cfg.monitor.knn_k > min(cfg.monitor.knn_bank_size, num_train):
        console.print(f"[yellow]monitor.knn_k={cfg.monitor.knn_k} is larger than the kNN monitor's bank "
                      f"({min(cfg.monitor.knn_bank_size, num_train)} images): every bank image votes.[/yellow]")


def run(cfg: DictConfig, run_dir: Path, overrides: Sequence[str] = (), console: Console | None = None) -> dict:
    """Pretrain (unless ``eval.only``) and evaluate; return and write the metrics.

    ``overrides`` are the command line's overrides (Hydra's ``overrides.task``); ``eval.only`` merges them
    into the checkpoint's config. The config actually used is written to ``<run_dir>/.hydra/config.yaml``.
    """
    console = console or Console()
    check_config(cfg)
    ck = None
    if cfg.eval.only:
        cfg, ck = _eval_only_config(cfg, overrides)
    resume, resume_path = (None, None) if cfg.eval.only else _resume_checkpoint(cfg, run_dir)
    main = dist.is_main()  # rank 0 owns the run directory: the other processes compute and never write
    if main:
        write_run_config(run_dir, cfg, overrides)
    torch.manual_seed(cfg.trainer.seed)
    device = resolve_device(cfg.trainer.device)
    if dist.init_from_env(device) and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank())
    autocast_dtype = resolve_precision(cfg.trainer.precision, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every batch has the same shapes: let cuDNN pick its fastest kernels
    if device.type == "cpu" and not cfg.eval.only:
        console.print("[dim]No GPU: training on the CPU.[/dim]")
    splits = load_dataset(cfg.dataset)
    if splits.num_classes == 0:
        cfg = _without_label_probes(cfg, console)
    _warn_clamped(cfg, len(splits.train), console)
    backbone = _build(cfg.backbone, "backbone")
    metrics: dict = {"device": device_name(device), "dataset": cfg.dataset.get("name", "?"),
                     "num_classes": splits.num_classes}
    # A resumed run's TensorBoard steps after its checkpoint were written by the killed process: purge them.
    purge = resume["state"]["step"] + 1 if resume else None
    with SummaryWriter(str(run_dir), purge_step=purge) if main else _NoWriter() as writer:
        classifier = None  # a method's own head on its features (supervised, distillation): classifier_top1
        if ck is not None:
            backbone = _checkpoint_backbone(cfg, ck, backbone)
            trained = (ck.get("config") or {}).get("dataset") or {}
            _check_backbone_takes(backbone, splits.channels, [splits.image_size],
                                  f"the checkpoint's backbone was trained on dataset {trained.get('name', '?')} "
                                  f"({trained.get('channels', '?')} channel(s), {trained.get('image_size', '?')} px); "
                                  "evaluate it on images like those (dataset=...).")
            metrics.update(epochs=ck["state"]["epoch"], steps=ck["state"]["step"], checkpoint=str(cfg.eval.checkpoint))
            if cfg.trainer.channels_last:  # the memory format the training run evaluated in: the same numbers
                backbone.to(memory_format=torch.channels_last)
        else:
            check_against_data(cfg, len(splits.pretrain))
            method = _build(cfg.method, "method", backbone=backbone)
            augment = _build(cfg.augmentation, "augmentation", mean=splits.mean, std=splits.std)
            check_views_fit(cfg.augmentation.views, splits.image_size)
            view_sizes = [r.out_size(splits.image_size) for r in augment.recipes for _ in range(r.count)]
            method.check_setup(view_sizes, cfg.trainer.batch_size)
            _check_backbone_takes(backbone, splits.channels, sorted(set(view_sizes)),
                                  "raise augmentation.views.N.size for a view too small, or pick a backbone for "
                                  "small images.")
            method.check_inputs(splits.channels, view_sizes, _views_vary(augment, splits.pretrain.images))
            if resume is not None:
                console.print(f"Resuming {resume_path}.")
            trainer = Pretrainer(method, augment, splits, cfg, device, autocast_dtype, run_dir, writer, console,
                                 resume)
            result = trainer.fit()
            metrics.update(epochs=round(result.epochs, 3), steps=result.steps, seconds=round(result.seconds, 1),
                           imgs_per_s=round(result.imgs_per_s, 1), stopped_by=result.stopped_by,
                           spikes=[vars(s) for s in result.spikes], knn_monitor=result.knn_monitor)
            backbone, classifier = method.eval_backbone(), getattr(method, "classifier", None)
        backbone.to(device)
        console.print("Evaluating: extracting features, kNN, linear probe...")
        t_eval = time.perf_counter()
        results = evaluate(backbone, splits, cfg.eval, device, autocast_dtype, seed=cfg.trainer.seed,
                           classifier=classifier)
        if dist.is_main():  # zero-shot needs the method's text tower: eval.only (a backbone checkpoint) skips it
            if ck is None:
                results.update(zero_shot_eval(method, splits, cfg.eval, device, autocast_dtype))
            if cfg.eval.finetune.enabled:
                shares = ", ".join(f"{f:.0%}" for f in cfg.eval.finetune.fractions)
                console.print(f"Fine-tuning on {shares} of the labels...")
                net = method.finetune_backbone() if ck is None else backbone
                results.update(finetune_eval(net, splits, cfg.eval.finetune, device, autocast_dtype))
        for key, value in results.items():
            writer.add_scalar(f"eval/{key}", value, metrics.get("steps", 0))
        metrics["eval_seconds"] = round(time.perf_counter() - t_eval, 1)
        if cfg.monitor.figures.enabled and main:
            names = "embedding map, retrieval" + (", attention" if hasattr(backbone, "last_attention") else "")
            console.print(f"Drawing figures: {names}...")
            write_end_figures(backbone, splits, cfg, run_dir, writer, device, autocast_dtype, metrics.get("steps", 0))
    metrics.update({k: round(v, 4) for k, v in results.items()})
    if "expected" in cfg:  # an experiment's target: record whether this run reproduced it
        metrics["expected"] = OmegaConf.to_container(cfg.expected)
        metrics["reproduced"] = judge(metrics["expected"], metrics)["reproduced"]  # a band, or a floor
    if main:
        write_text_atomic(run_dir / "metrics.json", json.dumps(metrics, indent=2))
        console.print(results_table(metrics, run_dir))
        if cfg.eval.tta.method != "none":
            console.print(tta_table(metrics))
    return metrics


def _without_label_probes(cfg: DictConfig, console: Console) -> DictConfig:
    """The config for a dataset without class labels (image-caption pairs without a label column)."""
    console.print("[yellow]The dataset has no class labels: the kNN monitor, the kNN and linear probes, fine-tuning, "
                  "zero-shot classification and the figures are skipped.[/yellow]")
    cfg = cfg.copy()
    for key in ("monitor.knn_every", "monitor.knn_every_steps"):
        OmegaConf.update(cfg, key, 0)
    for key in ("eval.knn.enabled", "eval.linear.enabled", "eval.finetune.enabled", "eval.zero_shot.enabled",
                "monitor.figures.enabled"):
        OmegaConf.update(cfg, key, False)
    return cfg


class _NoWriter:
    """The TensorBoard writer of a process that is not rank 0: it accepts everything and writes nothing."""

    def __enter__(self) -> _NoWriter:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def write_run_config(run_dir: Path, cfg: DictConfig, overrides: Sequence[str]) -> None:
    """``.hydra/config.yaml`` and ``overrides.yaml`` as used (after eval.only's merge), written by the run
    itself once it holds the run directory's lock, so a refused second run never overwrites them."""
    out = run_dir / ".hydra"
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.yaml", OmegaConf.to_yaml(cfg))
    write_text_atomic(out / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(list(overrides))))


def results_table(metrics: dict, run_dir: Path) -> Table:
    table = Table(title=f"sslrun results — {run_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    trivial_top5 = metrics.get("num_classes", 10) <= 5
    finetune = sorted((k for k in metrics if k.startswith("finetune_")), key=lambda k: float(k.split("_")[1][:-3]))
    for key in ("knn_top1", "knn_top5", "linear_top1", "linear_top5", "classifier_top1", "zeroshot_top1",
                "zeroshot_top5", *finetune, "epochs", "seconds", "imgs_per_s", "device"):
        if key in metrics:
            value = metrics[key]
            text = f"{value:.4f}" if isinstance(value, float) and key.endswith(("1", "5")) else str(value)
            if trivial_top5 and key.endswith("top5"):
                text += f" (trivial: {metrics['num_classes']} classes)"
            table.add_row(key, text)
    if metrics.get("spikes"):
        table.add_row("gradient spikes", str(len(metrics["spikes"])))
    return table
