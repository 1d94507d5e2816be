"""InvaSpread, SimCLR v2, CMC and CPC v2 under DDP: the cases that test_contrastive_ddp.py runs in 2 gloo processes
(global batch B split in halves) and in 1 process (batch B), from the same seed, with the engine's hook order."""

from __future__ import annotations

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from runner import method_config
from torch.nn.parallel import DistributedDataParallel

from sslrun import dist
from sslrun.backbones.small_cnn import SmallCNN
from sslrun.methods.base import FitInfo, TrainState

B, STEPS, NUM_SAMPLES = 8, 3, 32
ENCODER = {"_target_": "sslrun.backbones.small_cnn.SmallCNN", "in_channels": 3, "width": 4, "feat_dim": 16,
           "pool_size": 2}
CASES = {  # case -> (method YAML, its keys made tiny)
    "invaspread": ("invaspread", {"proj_output_dim": 8}),
    "simclrv2": ("simclrv2", {"proj_hidden_dim": 16, "proj_output_dim": 8, "queue_length": 0}),
    "simclrv2_memory": ("simclrv2", {"proj_hidden_dim": 16, "proj_output_dim": 8, "queue_length": 64}),
    "cmc_bank": ("cmc", {"backbone_config": ENCODER, "proj_output_dim": 8, "nce_k": 16}),
    "cmc_batch": ("cmc", {"backbone_config": ENCODER, "proj_output_dim": 8, "negatives": "batch"}),
    "cpc": ("cpc", {"patch_size": 4, "patch_stride": 2, "max_steps": 3, "context_blocks": 2,
                    "context_hidden_dim": 8}),
}


def run_case(case: str) -> dict:
    """STEPS SGD steps on this process's share of each global batch; each step's loss and gradients, and the
    final state (banks, queue)."""
    name, overrides = CASES[case]
    torch.manual_seed(0)
    method = instantiate(OmegaConf.merge(method_config(name), overrides),
                         backbone=SmallCNN(in_channels=3, width=4, feat_dim=16, pool_size=2))
    world, r = dist.world_size(), dist.rank()
    if world > 1:
        method.convert_sync_batchnorm()  # trainer.sync_batchnorm=true: BN over the global batch
    model = DistributedDataParallel(method, broadcast_buffers=False) if world > 1 else method
    method.on_fit_start(FitInfo(NUM_SAMPLES, STEPS, STEPS, 1, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    torch.manual_seed(2)  # the same stream on every process (the banks' negatives)
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.01)
    state, out = TrainState(), {"loss": [], "grads": []}
    rows = slice(r * B // world, (r + 1) * B // world)
    for step in range(STEPS):
        g = torch.Generator().manual_seed(100 + step)
        views = [torch.randn(B, 3, 12, 12, generator=g) for _ in range(2)]
        index = torch.randperm(NUM_SAMPLES, generator=g)[:B]
        result = model([v[rows] for v in views], index[rows])
        opt.zero_grad(set_to_none=True)
        result["loss"].backward()
        out["grads"].append({n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None})
        out["loss"].append(result["loss"].detach())
        opt.step()
        state.step += 1
        method.on_after_step(state)
    out["state"] = {k: v.detach().clone() for k, v in method.state_dict().items() if k.startswith(("bank", "queue"))}
    return out


def worker(cases: list[str]) -> dict:
    return {case: run_case(case) for case in cases}
