"""The one door to ``torch.distributed``: rank, world size, collectives, and a gather that keeps gradients.

Every function is a no-op (or the identity) in a single process, so a method calls them unconditionally
and reads the same in one process and under DDP. Nothing else in sslrun imports ``torch.distributed``.

Start-up (:func:`init_from_env`) reads torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) or, inside a SLURM job step launched by ``srun`` without torchrun, SLURM's (SLURM_PROCID,
SLURM_NTASKS, SLURM_LOCALID, the first host of SLURM_JOB_NODELIST). Backend: NCCL on CUDA, gloo on CPU.

Batch norm under DDP: each process normalises over its own share of the batch unless the method's BN is
converted (``trainer.sync_batchnorm=true``: :func:`convert_sync_batchnorm`). Losses that need global batch
statistics gather them themselves (Barlow Twins' standardisation, NT-Xent's negatives, Sinkhorn's sums,
DINO's centre), but BN inside the backbone and heads does not: without conversion, N processes at global
batch B are not one process at batch B (tests/dist measures the gap: SimCLR's loss and gradients move by
more than 1e-3 at B=8). Most papers' multi-device runs synchronised BN (SimCLR's global BN; the official
SimSiam, Barlow Twins, SwAV, DINO and MoCo v3 code convert to SyncBatchNorm); MoCo v1/v2 and PCL need
per-process BN (Shuffle-BN) and refuse conversion.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
from collections.abc import Callable

import torch
import torch.distributed as tdist
from torch import nn

# submitit's range for a port derived from the job id (TorchDistributedEnvironment): away from well-known ports.
SLURM_PORT_RANGE = (20000, 60000)


def _active() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def _first_host(nodelist: str) -> str:
    """The first host of a SLURM node list ('gpu[03-05,09],cpu1' -> 'gpu03'): ``scontrol`` where it exists."""
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    m = re.match(r"([^,\[]+)(?:\[([^,\]-]+))?", nodelist)
    return m.group(1) + (m.group(2) or "")


def _slurm_env() -> dict[str, str] | None:
    """torchrun-style variables from SLURM's, or None outside a multi-task SLURM step."""
    env = os.environ
    tasks = env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS"))  # the step's own count where srun set it
    if "SLURM_PROCID" not in env or tasks is None or int(tasks) <= 1:
        return None
    job = env.get("SLURM_JOB_ID", "0")
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": tasks, "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": env.get("MASTER_ADDR") or _first_host(env.get("SLURM_JOB_NODELIST", "localhost")),
            "MASTER_PORT": env.get("MASTER_PORT") or str(random.Random(job).randint(*SLURM_PORT_RANGE))}


def init_from_env(device: torch.device) -> bool:
    """Join the process group described by the environment (torchrun, else SLURM); return whether this
    process is one of several. Idempotent. On CUDA, selects the GPU of this process's local rank.

    Args:
        device: where this process trains; ``cuda`` picks NCCL (and ``cuda:<local rank>``), otherwise gloo.
    """
    if _active():
        return world_size() > 1
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        slurm = _slurm_env()
        if slurm is None:
            return False
        os.environ.update(slurm)
    if int(os.environ["WORLD_SIZE"]) <= 1:
        return False
    if device.type == "cuda":
        torch.cuda.set_device(local_rank())
    tdist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return True


def rank() -> int:
    """This process's global rank (0 in one process)."""
    return tdist.get_rank() if _active() else 0


def world_size() -> int:
    """Number of processes (1 in one process)."""
    return tdist.get_world_size() if _active() else 1


def local_rank() -> int:
    """This process's rank on its node (the GPU it drives)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the process that writes files and logs."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        tdist.barrier()


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = [torch.empty_like(x) for _ in range(tdist.get_world_size())]
        tdist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Every rank's loss may depend on this rank's rows: their gradients are summed, then this
        # rank's slice is kept. With DDP's averaging of parameter gradients over N ranks, each
        # parameter then gets the gradient of the mean of the ranks' losses.
        grad = grad.contiguous()
        tdist.all_reduce(grad)
        n = grad.shape[0] // tdist.get_world_size()
        return grad[rank() * n:(rank() + 1) * n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` [n, ...] concatenated in rank order along dim 0 ([N*n, ...]), differentiably.

    The backward all-reduces (sums) the incoming gradient and returns this rank's rows, so under DDP
    (which averages gradients over ranks) the gradients equal those of one process holding the whole
    batch. Every rank must pass the same shape. Identity in one process.
    """
    return _GatherWithGrad.apply(x) if world_size() > 1 else x


@torch.no_grad()
def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` [n, ...] concatenated in rank order along dim 0, without gradient."""
    if world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    tdist.all_gather(out, x.contiguous())
    return torch.cat(out)


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Elementwise sum of ``x`` over ranks (a new tensor; ``x`` is unchanged)."""
    if world_size() == 1:
        return x
    out = x.detach().clone()
    tdist.all_reduce(out)
    return out


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Elementwise mean of ``x`` over ranks (a new tensor, no gradient)."""
    return all_reduce_sum(x) / world_size() if world_size() > 1 else x


@torch.no_grad()
def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum of ``x`` over ranks (a new tensor)."""
    if world_size() == 1:
        return x
    out = x.detach().clone()
    tdist.all_reduce(out, op=tdist.ReduceOp.MAX)
    return out


@torch.no_grad()
def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """``x`` overwritten in place with rank ``src``'s (same shape and dtype on every rank); returns ``x``."""
    if world_size() > 1:
        tdist.broadcast(x, src=src)
    return x


def destroy() -> None:
    """Leave the process group (at the end of a run)."""
    if _active():
        tdist.destroy_process_group()


class _SumWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        tdist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        tdist.all_reduce(grad)  # every rank's output depended on this rank's input
        return grad


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics are taken over the batches of all ranks, on any device
    (torch's ``nn.SyncBatchNorm`` runs on GPUs only): differentiable all-reduces of the per-channel
    count and sum, then of the sum of squared deviations from the global mean. Eval mode and one process are plain batch norm, and the
    state dict is ``nn.BatchNorm*``'s.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"GlobalBatchNorm expects [N, C, ...] input, got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        dims, c = [0] + list(range(2, x.dim())), x.shape[1]
        shape = [1, c] + [1] * (x.dim() - 2)
        xf = x.float()
        count = torch.full((1,), x.numel() / c, device=x.device)
        stats = _SumWithGrad.apply(torch.cat([count, xf.sum(dims)]))
        n, mean = stats[0], stats[1:] / stats[0]
        # Two passes (mean, then squared deviations) rather than E[x^2] - mean^2, which cancels catastrophically
        # when the mean is large against the spread. Biased, as batch norm normalises with.
        centred = xf - mean.view(shape)
        var = _SumWithGrad.apply(centred.square().sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach() * n / (n - 1), m)  # unbiased, as nn.BatchNorm keeps
        out = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every batch-norm layer of ``module`` normalised over the global batch: ``nn.SyncBatchNorm`` when the
    module is on a GPU, :class:`GlobalBatchNorm` otherwise. Parameters and buffers are kept; returns the
    (possibly new) module, like ``nn.SyncBatchNorm.convert_sync_batchnorm``."""
    if any(p.is_cuda for p in module.parameters()):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        # The same Parameter and buffer objects, as torch's conversion: a frozen (momentum) copy stays frozen,
        # and an optimizer built before still holds them.
        for key, value in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            setattr(new, key, value)
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, convert_sync_batchnorm(child))
    return module


def map_sharded(num_rows: int, compute: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """Rows ``[0, num_rows)`` of a row-wise computation, each process computing one contiguous shard.

    ``compute(lo, hi)`` returns rows ``lo..hi-1`` ([hi - lo, ...]); every process gets all ``num_rows`` rows in
    order (feature extraction for evaluation and k-means without doing the work N times). One process:
    ``compute(0, num_rows)``.
    """
    n, w = num_rows, world_size()
    if w == 1:
        return compute(0, n)
    per = -(-n // w)
    lo, hi = min(n, rank() * per), min(n, (rank() + 1) * per)
    part = compute(lo, hi) if hi > lo else compute(0, 1)[:0]  # an empty shard still needs the row shape
    padded = part.new_zeros((per, *part.shape[1:]))
    padded[:hi - lo] = part
    full = all_gather(padded)
    keep = [torch.arange(j * per, j * per + min(n, (j + 1) * per) - min(n, j * per)) for j in range(w)]
    return full[torch.cat(keep).to(full.device)]


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s picklable ``obj`` on every rank (e.g. the run directory rank 0's Hydra chose)."""
    if world_size() == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]
