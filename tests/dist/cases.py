"""The methods' DDP cases: N gloo processes with global batch B against one process with batch B.

Each case builds a tiny method from its YAML from the same seed, feeds it the same global views (each rank
its contiguous share, as the engine does: rank r takes rows [r B/N, (r + 1) B/N)), wrapped in
``DistributedDataParallel`` with the engine's settings, and runs the engine's hook order for a few SGD
steps. :func:`run_case` records every step's loss, gradients and the method's state, in one process or on
a rank; the tests compare the two.
"""

from __future__ import annotations

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from runner import method_config
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sslrun import dist
from sslrun.backbones.small_cnn import SmallCNN
from sslrun.methods.base import FitInfo, Method, TrainState

# Two steps: the second runs on state the first updated (queues, bank, centre, EMA teachers). A small lr keeps
# the float noise of the first step (~1e-7, sums in another order) from moving a ReLU input across 0.
B, STEPS, NUM_SAMPLES, LR = 8, 2, 32, 0.01
HEAD = {"proj_hidden_dim": 16, "proj_output_dim": 8}
# Per method: its YAML's keys made tiny, and whether its heads hold batch norm (then the processes
# convert it to global batch norm, as trainer.sync_batchnorm=true does).
CASES: dict[str, tuple[dict, bool]] = {
    "simclr": (HEAD, True),
    "barlow": (HEAD, True),
    "byol": ({**HEAD, "pred_hidden_dim": 16}, True),
    "simsiam": ({**HEAD, "pred_hidden_dim": 8}, True),
    "mocov3": ({**HEAD, "pred_hidden_dim": 16}, True),
    "swav": ({**HEAD, "num_prototypes": 6, "queue_length": 8, "queue_start_epoch": 0,
              "freeze_prototypes_iters": 0}, True),
    "dino": ({"out_dim": 12, "hidden_dim": 16, "bottleneck_dim": 8, "freeze_last_layer": 0,
              "warmup_teacher_temp_epochs": 1}, False),
    "mocov2": ({**HEAD, "queue_size": 32, "bn_splits": 1}, False),
    "mocov2_symmetric": ({**HEAD, "queue_size": 32, "bn_splits": 1, "symmetric": True}, False),
    "pcl": ({**HEAD, "queue_size": 32, "bn_splits": 1, "num_clusters": [4, 6], "warmup_epochs": 0,
             "kmeans_iters": 5, "kmeans_max_points_per_centroid": None}, False),
    "deepcluster": ({"num_clusters": 4, "pca_dim": 4}, False),
    "deepclusterv2": ({**HEAD, "num_prototypes": [3, 4, 3]}, True),
    "instdisc": ({"proj_output_dim": 8, "nce_k": 16}, False),
    "instdisc_softmax": ({"proj_output_dim": 8, "loss": "softmax", "nce_k": None}, False),
}
# Cases whose state changes at epoch starts: epochs of this many steps, with on_epoch_start between them
# (DeepCluster V2 clusters the first epoch's bank at the second's start and trains on it).
EPOCH_STEPS = {"deepclusterv2": 1}
# Batch norm in the backbone too: with global BN the processes agree; without it they do not.
BN_CASES = {"simclr_cnn_syncbn": ("simclr", True), "simclr_cnn_local_bn": ("simclr", False),
            "mocov2_shuffle_bn": ("mocov2", False)}  # MoCo's Shuffle-BN: local BN on purpose


class TinyConvNet(nn.Module):
    """A backbone without batch norm that takes any crop size (a conv, then a fixed 2x2 average pool)."""

    feat_dim = 16

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                 nn.Linear(32, self.feat_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build(case: str) -> tuple[Method, bool]:
    """The case's method (same weights on every process) and whether it needs global batch norm."""
    name, sync, backbone = case, None, None
    if case in BN_CASES:
        name, sync = BN_CASES[case]
        backbone = SmallCNN(in_channels=3, width=4, feat_dim=16, pool_size=2)
    name = name.removesuffix("_symmetric").removesuffix("_softmax")
    overrides, head_bn = CASES.get(case, CASES.get(name))
    torch.manual_seed(0)
    node = OmegaConf.merge(method_config(name), overrides)
    method = instantiate(node, backbone=backbone or TinyConvNet())
    return method, head_bn if sync is None else sync


def global_batch(case: str, step: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Step ``step``'s views (two 12-px large crops, and six 6-px small crops for multi-crop) and indices."""
    g = torch.Generator().manual_seed(100 + step)
    multicrop = case in ("swav", "dino", "deepclusterv2")
    views = [torch.randn(B, 3, 12, 12, generator=g) for _ in range(2)]
    views += [torch.randn(B, 3, 6, 6, generator=g) for _ in range(6 if multicrop else 0)]
    return views, torch.randperm(NUM_SAMPLES, generator=g)[:B]


def dataset() -> torch.Tensor:
    """The un-augmented pretraining set that map_dataset embeds (k-means)."""
    return torch.randn(NUM_SAMPLES, 3, 12, 12, generator=torch.Generator().manual_seed(7))


def state_of(method: Method) -> dict[str, torch.Tensor]:
    """Everything a step may change: parameters and buffers, and the clusterings kept outside the state dict."""
    state = {k: v.detach().clone() for k, v in method.state_dict().items() if torch.is_tensor(v)}  # not extra state
    for i, (centroids, phi, assign) in enumerate(getattr(method, "clusterings", [])):
        state.update({f"clustering{i}.centroids": centroids, f"clustering{i}.phi": phi,
                      f"clustering{i}.assign": assign})
    for key in ("pseudo_labels", "sample_weights"):
        if hasattr(method, key):
            state[key] = getattr(method, key).clone()
    return state


def run_case(case: str) -> dict:
    """Train the case for STEPS steps on this process's share of each global batch (all of it in one
    process); return each step's loss and gradients and the final state."""
    method, sync = build(case)
    world, r = dist.world_size(), dist.rank()
    if world > 1 and sync:
        method.convert_sync_batchnorm()
    model = DistributedDataParallel(method, broadcast_buffers=False) if world > 1 else method
    data = dataset()
    per_epoch = EPOCH_STEPS.get(case, STEPS)
    method.on_fit_start(FitInfo(num_samples=NUM_SAMPLES, steps_per_epoch=per_epoch, total_steps=STEPS,
                                epochs=STEPS // per_epoch,
                                map_dataset=lambda fn: fn(data)))
    torch.manual_seed(1 + r)  # processes draw differently from here on: what must agree is broadcast
    method.on_epoch_start(TrainState())
    torch.manual_seed(2)  # the same global stream again (negative sampling, key shuffling)
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=LR)
    state, out = TrainState(), {"loss": [], "grads": []}
    rows = slice(r * B // world, (r + 1) * B // world)
    for step in range(STEPS):
        if step and step % per_epoch == 0:
            method.on_epoch_start(TrainState(epoch=step // per_epoch, step=step, progress=step / STEPS))
        views, index = global_batch(case, step)
        result = model([v[rows] for v in views], index[rows])
        opt.zero_grad(set_to_none=True)
        result["loss"].backward()
        method.on_after_backward(state)
        out["grads"].append({n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None})
        out["loss"].append(result["loss"].detach())
        opt.step()
        state.step, state.progress = state.step + 1, (step + 1) / STEPS
        method.on_after_step(state)
    out["state"] = state_of(method)
    return out


def worker(cases: list[str]) -> dict:
    """On each rank: the collectives' checks (test_dist.py), then every case in turn (one spawn for all)."""
    from dist.test_dist import collectives

    return {"collectives": collectives(), **{case: run_case(case) for case in cases}}
