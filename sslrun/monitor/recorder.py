"""What a run records while it trains, and the figures it draws at its start and end.

The trainer calls ``TrainingMonitor`` at a few points of its loop:
  after backward   gradient magnitudes per layer and spike flags, on the device; ``on_spike`` clips or skips
  after the step   the step's row is buffered on the device; at log steps the buffer goes to the host in
                   one sync: TensorBoard scalars, spike events, the non-finite-loss check, collapse, rank
  every N steps / at epoch end   the kNN monitor on fixed subsets, and collapse/rank of backbone features
``write_end_figures`` draws the 2-D map, retrieval and attention figures from the final backbone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from .. import dist
from ..data.augment import normalize
from ..data.image_set import DatasetSplits, ImageSet
from ..errors import SslrunError
from ..eval.features import extract_features
from ..eval.knn import knn_predict, topk_accuracy
from ..methods.base import TrainState
from .collapse import collapse_std, effective_rank
from .figures import (
    attention_figure,
    augmentation_preview,
    embedding_map,
    retrieval_figure,
    save_figure,
    save_image_grid,
)
from .grads import LayerGrads
from .maps import pca_2d, tsne_2d
from .spikes import Spike, SpikeDetector, spike_events

ON_SPIKE = ("log", "skip", "clip")
MAPS = {"tsne": "t-SNE", "pca": "PCA"}
BANK_SEED, QUERY_SEED = 2, 3  # offsets from trainer.seed: the monitor's subsets are the same in every run


def fixed_subset(images: ImageSet, size: int, seed: int) -> ImageSet:
    """The first ``size`` images of a seeded permutation: a larger size extends a smaller one."""
    return images.subset(torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:size])


def check_monitor_config(m: DictConfig) -> None:
    if m.on_spike not in ON_SPIKE:
        raise SslrunError(f"monitor.on_spike={m.on_spike!r} is not a valid choice; use one of: {', '.join(ON_SPIKE)}.")
    if m.figures.map not in MAPS:
        raise SslrunError(f"monitor.figures.map={m.figures.map!r} is not a valid choice; "
                          f"use one of: {', '.join(MAPS)}.")
    if not (m.layer_depth == "auto" or (isinstance(m.layer_depth, int) and m.layer_depth > 0)):
        raise SslrunError(f"monitor.layer_depth={m.layer_depth!r} must be auto or a positive integer.")


class TrainingMonitor:
    """Owns every TensorBoard tag pretraining writes, the spike events and the kNN-monitor records."""

    def __init__(self, method: nn.Module, splits: DatasetSplits, cfg: DictConfig, device: torch.device,
                 autocast_dtype: torch.dtype | None, writer: SummaryWriter, run_dir: Path,
                 on_non_finite: Callable[[int, float], None]) -> None:
        m = cfg.monitor
        check_monitor_config(m)
        self.m, self.cfg, self.method, self.splits = m, cfg, method, splits
        self.device, self.autocast_dtype, self.writer, self.run_dir = device, autocast_dtype, writer, run_dir
        self.on_non_finite = on_non_finite
        self.log_every = cfg.trainer.log_every
        self.grads = LayerGrads(method, method.backbone, m.layer_depth)
        self.detector = SpikeDetector(m.spike_factor, m.spike_window, m.spike_min_history)
        self.bank = fixed_subset(splits.train, m.knn_bank_size, cfg.trainer.seed + BANK_SEED)
        self.queries = fixed_subset(splits.test, m.knn_query_size, cfg.trainer.seed + QUERY_SEED)
        self.spikes: list[Spike] = []
        self.knn_records: list[dict] = []
        self.last = {"loss": math.nan, "lr": 0.0, "ips": 0.0}  # for the progress bar
        self._pending: list[tuple[int, torch.Tensor, float, dict[str, torch.Tensor]]] = []
        self._row: torch.Tensor | None = None
        self._next_rank = 0
        self._last_knn: dict | None = None
        self.main = dist.is_main()
        self._flushed = False  # the first step is flushed at once, so the progress bar shows a loss from the start
        self.restart_clock()

    # ---- per step, on the device ----------------------------------------------------------
    def after_backward(self) -> bool:
        """Read this step's gradient magnitudes; on a spike clip them (``on_spike=clip``). Returns whether
        the optimizer should step: False only for ``on_spike=skip`` on a spike."""
        stats = self.grads()
        spike, median = self.detector.update(stats.linf)
        if self.m.on_spike == "clip":
            cap = self.m.spike_factor * median / stats.linf.clamp_min(torch.finfo(torch.float32).tiny)
            self.grads.scale_(torch.where(spike, cap, torch.ones_like(cap)))
        self._row = torch.cat([stats.flat, median, spike.float()])
        if self.m.on_spike == "skip":
            return not bool(spike.any())  # the optimizer step is a host decision: one sync per step
        return True

    def after_step(self, state: TrainState, loss: torch.Tensor, z: torch.Tensor, lr: float,
                   terms: dict[str, torch.Tensor] | None = None) -> bool:
        """Buffer the step and its extra scalar ``terms`` (logged as train/<key>); flush at log steps, run
        the step kNN monitor when due. Returns whether it logged."""
        if not self.main:  # rank 0 records; the others only take part in after_backward (same grads everywhere)
            return False
        terms = {k: v.detach().float() for k, v in (terms or {}).items()}
        self._pending.append((state.step, torch.cat([loss.detach().float().reshape(1), self._row]), lr, terms))
        logged = state.step % self.log_every == 0 or not self._flushed
        if logged:
            self.flush(z)
        if self.m.knn_every_steps and state.step % self.m.knn_every_steps == 0:
            self.knn(state, "monitor/knn_top1_steps")
        return logged

    def end_epoch(self, state: TrainState, z: torch.Tensor) -> None:
        if not self.main:
            return
        self.flush(z)
        if self.m.knn_every and state.epoch % self.m.knn_every == 0:
            self.knn(state, "monitor/knn_top1")
        self.method_figures(state)

    def method_figures(self, state: TrainState) -> None:
        """The method's own image grids (``Method.figures()``: reconstructions, samples), per epoch."""
        if not self.m.figures.enabled:
            return
        t0 = time.perf_counter()
        for name, images in self.method.figures().items():
            save_image_grid(images, self.run_dir, name, self.writer, state.step)
        self._excluded += time.perf_counter() - t0

    def restart_clock(self) -> None:
        """Images/s counts training only: call after work that is not (checkpoints)."""
        self._t_log = time.perf_counter()
        self._excluded = 0.0  # seconds of monitor work inside the current interval

    # ---- log steps: one host sync ----------------------------------------------------------
    def flush(self, z: torch.Tensor | None = None) -> None:
        """Move the buffered per-step rows to the host (one sync), check them, write them out."""
        if not self._pending:
            return
        self._flushed = True
        steps = [p[0] for p in self._pending]
        lrs = [p[2] for p in self._pending]
        rows = torch.stack([p[1] for p in self._pending]).cpu()
        term_keys = [(step, k) for step, *_, terms in self._pending for k in terms]
        term_values = torch.stack([t for *_, terms in self._pending for t in terms.values()]).tolist() \
            if term_keys else []
        self._pending.clear()
        loss = rows[:, 0]
        bad = (~torch.isfinite(loss)).nonzero()
        if len(bad):
            self.on_non_finite(steps[bad[0, 0]], loss[bad[0, 0]].item())
        n = len(self.grads)
        fixed, l2, linf, median, flags = rows[:, 1:].split([len(LayerGrads.fixed), n, n, n, n], dim=1)
        events = spike_events(steps, self.grads.layers, linf, median, flags)
        w = self.writer
        for i, step in enumerate(steps):
            w.add_scalar("train/loss", loss[i].item(), step)
            w.add_scalar("train/lr", lrs[i], step)
            for name, value in zip(LayerGrads.fixed, fixed[i].tolist()):
                w.add_scalar(f"grad/{name}", value, step)
            now = [e for e in events if e.step == step]
            if now:
                w.add_text("grad/spike_events", "  \n".join(
                    f"step {step}: {e.layer} inf-norm {e.value:.4g} = {e.ratio:.1f} x running median" for e in now),
                    step)
            self.spikes.extend(now)
            w.add_scalar("grad/spikes", len(self.spikes), step)
        for (step, key), value in zip(term_keys, term_values):
            w.add_scalar(f"train/{key}", value, step)
        self._write_layers(steps[-1], l2, linf, median)
        if z is not None:
            w.add_scalar("collapse/std", collapse_std(z).item(), steps[-1])
            w.add_scalar("collapse/std_ref", 1 / math.sqrt(z.shape[1]), steps[-1])
            if self.m.rank_every and steps[-1] >= self._next_rank:
                w.add_scalar("rank/rankme_z", effective_rank(z).item(), steps[-1])
                self._next_rank = (steps[-1] // self.m.rank_every + 1) * self.m.rank_every
        now = time.perf_counter()
        ips = len(steps) * self.cfg.trainer.batch_size / max(1e-9, now - self._t_log - self._excluded)
        w.add_scalar("perf/imgs_per_s", ips, steps[-1])
        self._t_log, self._excluded = now, 0.0
        self.last = {"loss": loss[-1].item(), "lr": lrs[-1], "ips": ips}

    def _write_layers(self, step: int, l2: torch.Tensor, linf: torch.Tensor, median: torch.Tensor) -> None:
        """Per layer, the peak over the log interval (every step when trainer.log_every=1): one point per
        layer and log step keeps TensorBoard writing off the step time, and a spike inside the interval
        still shows. ``rel`` is the inf-norm over the layer's running median (once it has one)."""
        rel = torch.where(median > 0, linf / median, math.nan)
        rel_peak = rel.nan_to_num(-math.inf).amax(0)
        for j, layer in enumerate(self.grads.layers):
            self.writer.add_scalar(f"grad/{layer}/l2", l2[:, j].max().item(), step)
            self.writer.add_scalar(f"grad/{layer}/linf", linf[:, j].max().item(), step)
            if math.isfinite(rel_peak[j].item()):
                self.writer.add_scalar(f"grad/{layer}/rel", rel_peak[j].item(), step)

    # ---- monitor points: kNN, collapse and rank of backbone features -------------------------
    def knn(self, state: TrainState, tag: str) -> None:
        """kNN top-1 of the fixed query subset against the fixed train bank, with the collapse std and
        RankMe of the query features; computed once per step even when both schedules fall on it."""
        t0 = time.perf_counter()
        if self._last_knn is None or self._last_knn["step"] != state.step:
            m, s = self.m, self.splits
            bank_f, query_f = (extract_features(self.method.eval_backbone(), subset.images, s.mean, s.std, self.device,
                                                self.cfg.eval.batch_size, self.autocast_dtype)
                               for subset in (self.bank, self.queries))
            scores = knn_predict(bank_f, self.bank.labels, query_f, s.num_classes, m.knn_k, m.knn_temperature)
            self._last_knn = {"epoch": state.epoch, "step": state.step,
                              "knn_top1": topk_accuracy(scores, self.queries.labels, (1,))[1],
                              "std_backbone": collapse_std(query_f).item(), "rankme": effective_rank(query_f).item(),
                              "feat_dim": query_f.shape[1]}
        r = self._last_knn
        w = self.writer
        w.add_scalar(tag, r["knn_top1"], state.step)
        w.add_scalar("collapse/std_backbone", r["std_backbone"], state.step)
        w.add_scalar("collapse/std_backbone_ref", 1 / math.sqrt(r["feat_dim"]), state.step)
        w.add_scalar("rank/rankme", r["rankme"], state.step)
        self.knn_records.append({**{k: v for k, v in r.items() if k != "feat_dim"}, "epoch": state.epoch,
                                 "schedule": "epoch" if tag == "monitor/knn_top1" else "steps"})
        self._excluded += time.perf_counter() - t0

    # ---- figures -------------------------------------------------------------------------------
    def preview(self, images: torch.Tensor, views: Sequence[torch.Tensor]) -> None:
        """The augmentation preview grid: a few images of the first batch and their views."""
        f = self.m.figures
        if not f.enabled or not self.main:
            return
        t0 = time.perf_counter()
        n = min(f.preview_images, images.shape[0])
        fig = augmentation_preview(images[:n], [v[:n] for v in views], self.splits.mean, self.splits.std,
                                   f.cell_inches)
        save_figure(fig, self.run_dir, "augmentations", self.writer, 0, f.dpi)
        self._excluded += time.perf_counter() - t0

    # ---- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"detector": self.detector.state_dict(), "spikes": [asdict(s) for s in self.spikes],
                "knn_monitor": self.knn_records, "next_rank": self._next_rank}

    def load_state_dict(self, state: dict) -> None:
        self.detector.load_state_dict(state["detector"])
        self.spikes = [Spike(**s) for s in state["spikes"]]
        self.knn_records = state["knn_monitor"]
        self._next_rank = state["next_rank"]


@torch.no_grad()
def write_end_figures(backbone: nn.Module, splits: DatasetSplits, cfg: DictConfig, run_dir: Path,
                      writer: SummaryWriter | None, device: torch.device,
                      autocast_dtype: torch.dtype | None = None, step: int = 0) -> list[Path]:
    """The figures of the final backbone: a 2-D map of test embeddings coloured by class, test images with
    their nearest train neighbours, and for ViTs (a ``last_attention`` method) the last layer's CLS
    attention per head with DINO's mass mask. Images come from the kNN monitor's fixed subsets."""
    m, f = cfg.monitor, cfg.monitor.figures
    if not f.enabled:
        return []
    check_monitor_config(m)
    seed = cfg.trainer.seed
    bank = fixed_subset(splits.train, m.knn_bank_size, seed + BANK_SEED)
    tests = fixed_subset(splits.test, max(f.map_points, f.retrieval_queries, f.attention_images), seed + QUERY_SEED)
    bank_f, test_f = (extract_features(backbone, s.images, splits.mean, splits.std, device, cfg.eval.batch_size,
                                       autocast_dtype) for s in (bank, tests))
    paths = []

    def save(fig, name: str) -> None:
        paths.append(save_figure(fig, run_dir, name, writer, step, f.dpi))

    pts = test_f[:f.map_points]
    points = tsne_2d(pts, f.tsne_perplexity, seed=seed) if f.map == "tsne" else pca_2d(pts)
    save(embedding_map(points, tests.labels[:len(pts)], splits.classes,
                       f"{MAPS[f.map]} of {len(pts)} test embeddings ({splits.name}), coloured by class",
                       f.map_inches), "embedding_map")
    q, k = min(f.retrieval_queries, len(tests)), min(f.retrieval_k, len(bank))
    sims = F.normalize(test_f[:q], dim=1) @ F.normalize(bank_f, dim=1).T
    idx = sims.topk(k, dim=1).indices.cpu()
    save(retrieval_figure(tests.images[:q], tests.labels[:q], bank.images[idx], bank.labels[idx], splits.classes,
                          f.cell_inches), "retrieval")
    if hasattr(backbone, "last_attention"):
        a = min(f.attention_images, len(tests))
        was_training = backbone.training
        backbone.eval()
        x = normalize(tests.images[:a].to(device), splits.mean, splits.std)
        attn = backbone.last_attention(x).float()
        backbone.train(was_training)
        save(attention_figure(tests.images[:a], attn, f.attention_keep, f.cell_inches), "attention")
    return paths
