"""The training monitor: on_spike behaviour, the tags and figures a run writes, the SimSiam collapse."""

import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image
from rich.console import Console
from runner import FAST, ROOT
from tensorboard.backend.event_processing.event_accumulator import (
    IMAGES,
    SCALARS,
    EventAccumulator,
)
from torch.utils.tensorboard import SummaryWriter

from sslrun.data.augment import normalize
from sslrun.data.datasets import load_dataset
from sslrun.engine.trainer import Pretrainer
from sslrun.errors import SslrunError
from sslrun.methods.base import TrainState
from sslrun.monitor.plot import load_run
from sslrun.monitor.recorder import TrainingMonitor
from sslrun.run import run

QUIET = Console(quiet=True)
SPIKE_AT = 8  # the step (0-based) whose gradient is multiplied by INJECT
INJECT = 1e4


def config(*overrides: str):
    fast = [o for o in FAST if not o.startswith("backbone")] if "backbone=vit_tiny" in overrides else FAST
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[*fast, *overrides])


def scalars(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance={SCALARS: 0, IMAGES: 0})
    acc.Reload()
    return acc


def raise_non_finite(step: int, value: float) -> None:
    raise AssertionError(f"non-finite loss {value} at step {step}")


def tiny_simsiam(cfg):
    """The method, one fixed batch of 16 images, and a function that builds its monitor on a writer."""
    torch.manual_seed(0)
    splits = load_dataset(cfg.dataset)
    method = instantiate(cfg.method, backbone=instantiate(cfg.backbone))
    x = normalize(splits.pretrain.images[:16], splits.mean, splits.std)

    def monitor_on(writer: SummaryWriter, run_dir: Path) -> TrainingMonitor:
        return TrainingMonitor(method, splits, cfg, torch.device("cpu"), None, writer, run_dir, raise_non_finite)

    return method, x, monitor_on


def monitored_steps(tmp_path: Path, on_spike: str, steps: int = 12):
    """A tiny SimSiam, the same batch every step and no optimizer (so every step's gradient is the same),
    except step SPIKE_AT, whose gradient is INJECT times larger. Yields per step: the gradients before
    the monitor, after it, and whether it let the optimizer step."""
    cfg = config("method=simsiam", f"monitor.on_spike={on_spike}", "monitor.spike_min_history=4",
                 "monitor.spike_window=10", "trainer.log_every=1000")
    method, x, monitor_on = tiny_simsiam(cfg)
    with SummaryWriter(str(tmp_path)) as writer:
        monitor = monitor_on(writer, tmp_path)
        state = TrainState()
        records = []
        for i in range(steps):
            method.zero_grad(set_to_none=True)
            out = method([x, x.flip(-1)], torch.arange(16))
            out["loss"].backward()
            if i == SPIKE_AT:
                for p in method.parameters():
                    if p.grad is not None:
                        p.grad.mul_(INJECT)
            before = [p.grad.clone() for p in monitor.grads.params]
            take = monitor.after_backward()
            after = [p.grad.clone() for p in monitor.grads.params]
            state.step += 1
            monitor.after_step(state, out["loss"], out["z"].detach(), 0.1)
            records.append((before, after, take))
        monitor.flush()
    return monitor, records


def test_on_spike_log_records_one_event_per_layer_and_changes_nothing(tmp_path):
    monitor, records = monitored_steps(tmp_path, "log")
    assert all(take for _, _, take in records)
    assert all(all(torch.equal(b, a) for b, a in zip(before, after)) for before, after, _ in records)
    assert {s.step for s in monitor.spikes} == {SPIKE_AT + 1}  # none invented on the steady steps
    assert sorted(s.layer for s in monitor.spikes) == sorted(monitor.grads.layers)  # every layer spiked
    assert all(s.ratio == pytest.approx(INJECT, rel=1e-3) for s in monitor.spikes)
    # The events reach TensorBoard (text) and read back the same, as sslrun-plot reads an unfinished run.
    assert {(s["step"], s["layer"]) for s in load_run(tmp_path, "x").spikes} == {(s.step, s.layer) for s in
                                                                                monitor.spikes}


def test_on_spike_skip_skips_exactly_the_spiking_step(tmp_path):
    _, records = monitored_steps(tmp_path, "skip")
    assert [i for i, (_, _, take) in enumerate(records) if not take] == [SPIKE_AT]
    before, after, _ = records[SPIKE_AT]
    assert all(torch.equal(b, a) for b, a in zip(before, after))  # skipping leaves the gradients alone


def test_on_spike_clip_scales_each_layer_to_factor_times_median(tmp_path):
    monitor, records = monitored_steps(tmp_path, "clip")
    factor = monitor.m.spike_factor
    steady, _, _ = records[SPIKE_AT - 1]
    before, after, take = records[SPIKE_AT]
    assert take and all(torch.equal(b, a) for b, a in zip(*records[SPIKE_AT - 1][:2]))  # steady steps untouched
    layer_of = monitor.grads._layer_of
    for j in range(len(monitor.grads)):
        idx = [k for k, lj in enumerate(layer_of) if lj == j]
        linf = max(after[k].abs().max().item() for k in idx)
        median = max(steady[k].abs().max().item() for k in idx)  # every steady step had the same gradient
        assert linf == pytest.approx(factor * median, rel=1e-4)
        for k in idx:  # one factor per layer: the direction is kept
            assert torch.allclose(after[k], before[k] * (factor / INJECT), rtol=1e-4, atol=1e-12)


def test_trainer_skips_the_optimizer_step_on_a_spike(tmp_path):
    cfg = config("method=simsiam", "monitor.on_spike=skip", "monitor.spike_min_history=3", "trainer.epochs=3",
                 "monitor.knn_every=0", "monitor.figures.enabled=false", "optimizer.warmup_epochs=0")
    torch.manual_seed(0)
    splits = load_dataset(cfg.dataset)
    method = instantiate(cfg.method, backbone=instantiate(cfg.backbone))
    augment = instantiate(cfg.augmentation, mean=splits.mean, std=splits.std)
    snapshots = {}

    def inject(state: TrainState) -> None:
        if state.step == SPIKE_AT:
            for p in method.parameters():
                if p.grad is not None:
                    p.grad.mul_(INJECT)
        snapshots[state.step] = [p.detach().clone() for p in method.parameters()]

    def after_step(state: TrainState) -> None:  # state.step counts the step just done
        changed = any(not torch.equal(a, p) for a, p in zip(snapshots[state.step - 1], method.parameters()))
        snapshots[state.step - 1] = changed

    method.on_after_backward, method.on_after_step = inject, after_step
    with SummaryWriter(str(tmp_path)) as writer:
        result = Pretrainer(method, augment, splits, cfg, torch.device("cpu"), None, tmp_path, writer, QUIET).fit()
    assert snapshots[SPIKE_AT] is False  # the spiking step left every parameter as it was
    assert snapshots[SPIKE_AT - 1] is True and snapshots[SPIKE_AT + 1] is True
    assert SPIKE_AT + 1 in {s.step for s in result.spikes}


def test_bad_on_spike_names_the_key_and_choices(tmp_path):
    with pytest.raises(SslrunError, match=r"monitor.on_spike='sometimes'.*log, skip, clip"):
        monitored_steps(tmp_path, "sometimes", steps=1)


VIT = ["backbone=vit_tiny", "backbone.depth=1", "backbone.embed_dim=16", "backbone.num_heads=2",
       "backbone.patch_size=8", "method=simsiam", "method.proj_output_dim=32", "method.pred_hidden_dim=16",
       "optimizer=adamw"]
NEW_TAGS = {"collapse/std_backbone", "collapse/std_backbone_ref", "rank/rankme", "rank/rankme_z",
            "monitor/knn_top1_steps"}
OLD_TAGS = {"train/loss", "train/lr", "grad/l2_total", "grad/linf/first_layer", "grad/linf/last_layer",
            "grad/spikes", "collapse/std", "collapse/std_ref", "monitor/knn_top1", "perf/imgs_per_s"}


def test_a_vit_run_writes_every_tag_and_figure(tmp_path):
    cfg = config(*VIT, "trainer.epochs=2", "monitor.knn_every_steps=3", "monitor.rank_every=2",
                 "monitor.figures.map=pca", "monitor.figures.retrieval_k=3", "monitor.figures.retrieval_queries=2",
                 "monitor.figures.attention_images=2", "monitor.figures.preview_images=2")
    metrics = run(cfg, tmp_path, console=QUIET)
    acc = scalars(tmp_path)
    tags = set(acc.Tags()["scalars"])
    assert OLD_TAGS | NEW_TAGS <= tags
    for layer in ("backbone.patch_embed", "backbone.blocks.0", "backbone.norm", "projector", "predictor"):
        assert {f"grad/{layer}/l2", f"grad/{layer}/linf"} <= tags
    assert "grad/backbone.blocks.0/rel" not in tags  # 8 steps: shorter than the spike detector's history
    assert [e.step for e in acc.Scalars("monitor/knn_top1_steps")] == [3, 6]
    assert [e.step for e in acc.Scalars("monitor/knn_top1")] == [4, 8]
    assert [e.step for e in acc.Scalars("rank/rankme_z")] == [1, 2, 4, 6, 8]  # first log step, then every 2
    assert all(1 <= e.value <= 16 for e in acc.Scalars("rank/rankme"))  # at most the feature dimension
    figures = {"augmentations", "embedding_map", "retrieval", "attention"}
    assert set(acc.Tags()["images"]) == {f"figures/{f}" for f in figures}
    for name in figures:
        with Image.open(tmp_path / "figures" / f"{name}.png") as im:
            im.verify()
    records = metrics["knn_monitor"]
    assert [(r["step"], r["schedule"]) for r in records] == [(3, "steps"), (4, "epoch"), (6, "steps"), (8, "epoch")]
    assert all(0 <= r["knn_top1"] <= 1 and r["rankme"] >= 1 and r["std_backbone"] >= 0 for r in records)
    assert json.loads((tmp_path / "metrics.json").read_text())["knn_monitor"] == records


def test_resume_keeps_spikes_and_monitor_records(tmp_path):
    base = ("method=simsiam", "monitor.figures.enabled=false", "monitor.spike_min_history=2",
            "monitor.spike_factor=1.01")
    first = run(config(*base), tmp_path, console=QUIET)  # factor ~1: steady training still flags a few steps
    second = run(config(*base, "trainer.epochs=2"), tmp_path, console=QUIET)
    assert second["spikes"][:len(first["spikes"])] == first["spikes"] and len(second["spikes"]) > len(first["spikes"])
    assert second["knn_monitor"][0] == first["knn_monitor"][0] and len(second["knn_monitor"]) == 2


COLLAPSE = ["dataset.num_train=512", "dataset.image_size=16", "augmentation=minimal", "method=simsiam",
            "method.proj_output_dim=64", "method.pred_hidden_dim=16", "trainer.epochs=15", "trainer.log_every=8",
            # SimSiam's official code decays every weight (BN included); with a high lr the ablation's collapse
            # takes ~100 steps instead of thousands.
            "optimizer.lr=4.0", "optimizer.weight_decay=2e-3", "optimizer.exclude_bias_norm=false",
            "eval.knn.enabled=false", "eval.linear.enabled=false", "monitor.knn_every=0",
            "monitor.figures.enabled=false"]


@pytest.mark.slow
def test_simsiam_without_stop_gradient_collapses_and_with_it_does_not(tmp_path):
    final = {}
    for sg in ("true", "false"):
        run(config(*COLLAPSE, f"method.stop_gradient={sg}"), tmp_path / sg, console=QUIET)
        acc = scalars(tmp_path / sg)
        ref = acc.Scalars("collapse/std_ref")[-1].value  # 1/sqrt(d): outputs spread over the sphere
        final[sg] = (acc.Scalars("collapse/std")[-1].value / ref, acc.Scalars("train/loss")[-1].value)
    assert final["true"][0] > 0.8  # the paper's Fig. 2: with stop-gradient the std stays near 1/sqrt(d)
    assert final["false"][0] < 0.2 and final["false"][1] < -0.95  # without: a constant output, loss -> -1
    assert math.isfinite(final["true"][1])


def test_extra_scalar_outputs_are_logged_as_train_terms(tmp_path):
    # A method's extra loss terms (PCL's proto_nce) reach TensorBoard at their own steps, and only where given.
    method, x, monitor_on = tiny_simsiam(config("method=simsiam", "trainer.log_every=3"))
    with SummaryWriter(str(tmp_path)) as writer:
        monitor = monitor_on(writer, tmp_path)
        state = TrainState()
        for i in range(7):
            out = method([x, x.flip(-1)], torch.arange(16))
            out["loss"].backward()
            monitor.after_backward()
            state.step += 1
            terms = {"proto_nce": torch.tensor(10.0 + state.step)} if state.step >= 3 else {}
            monitor.after_step(state, out["loss"], out["z"].detach(), 0.1, terms)
        monitor.flush()
    logged = [(e.step, e.value) for e in scalars(tmp_path).Scalars("train/proto_nce")]
    assert logged == [(s, 10.0 + s) for s in range(3, 8)]
