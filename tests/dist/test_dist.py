"""sslrun.dist: the collectives in two gloo processes against the same computation in one process."""

from __future__ import annotations

import torch
from torch import nn

from sslrun import dist

N, B, C = 2, 8, 3  # processes, global batch, channels


def full_batch(seed: int = 0) -> torch.Tensor:
    return torch.randn(B, C, 4, 4, generator=torch.Generator().manual_seed(seed))


def batchnorm_step(bn: nn.Module, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """A loss that couples the samples only through BN; returns the loss and the gradients."""
    x = x.clone().requires_grad_(True)
    loss = (bn(x) * w).square().sum() / B
    loss.backward()
    return loss.detach(), {"x": x.grad, "weight": bn.weight.grad, "bias": bn.bias.grad}


def collectives() -> dict:
    """Run on each of the 2 processes (see conftest.py); the test below checks what they return."""
    r, n = dist.rank(), B // N
    x = full_batch()
    rows = slice(r * n, (r + 1) * n)
    out: dict = {"rank": dist.rank(), "world": dist.world_size(), "main": dist.is_main()}
    # gather_with_grad: loss_r = sum of the gathered rows weighted by rank-dependent weights.
    local = x[rows].clone().requires_grad_(True)
    g = dist.gather_with_grad(local)
    weights = torch.arange(g.numel(), dtype=torch.float32).view_as(g) * (r + 1)
    (g * weights).sum().backward()
    out.update(gathered=g.detach(), gather_grad=local.grad)
    out["all_gather"] = dist.all_gather(torch.tensor([r, 10 * r]))
    out["sum"] = dist.all_reduce_sum(torch.tensor([float(r + 1)]))
    out["mean"] = dist.all_reduce_mean(torch.tensor([float(r + 1)]))
    out["max"] = dist.all_reduce_max(torch.tensor([float(r + 1)]))
    out["broadcast"] = dist.broadcast(torch.tensor([float(r + 5)]), src=1)
    dist.barrier()
    # GlobalBatchNorm over the global batch: each rank holds its rows.
    torch.manual_seed(0)
    bn = dist.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(C)))[0]
    out["bn_type"] = type(bn).__name__
    w = torch.randn(B, C, 4, 4, generator=torch.Generator().manual_seed(1))
    loss, grads = batchnorm_step(bn, x[rows], w[rows])
    out.update(bn_loss=loss, bn_grads={k: v if k == "x" else dist.all_reduce_sum(v) for k, v in grads.items()},
               bn_state={k: v.clone() for k, v in bn.state_dict().items()})
    return out


def test_collectives_and_global_batchnorm_in_two_processes(ranks):
    res = [r["collectives"] for r in ranks]
    x, n = full_batch(), B // N
    assert [o["rank"] for o in res] == [0, 1] and all(o["world"] == N for o in res)
    assert [o["main"] for o in res] == [True, False]
    for o in res:
        assert torch.equal(o["gathered"], x)
        assert torch.equal(o["all_gather"], torch.tensor([0, 0, 1, 10]))
        assert o["sum"].item() == 3 and o["mean"].item() == 1.5 and o["max"].item() == 2
        assert o["broadcast"].item() == 6  # rank 1's value
    # d/d(rows of rank r) of sum_s loss_s: the weights summed over ranks (1 + 2 = 3 times the base weight).
    base = torch.arange(x.numel(), dtype=torch.float32).view_as(x)
    for r, o in enumerate(res):
        assert torch.equal(o["gather_grad"], 3 * base[r * n:(r + 1) * n])
    # Global BN equals BN over the whole batch in one process: loss, input and parameter gradients, running stats.
    torch.manual_seed(0)
    ref_bn = nn.BatchNorm2d(C)
    w = torch.randn(B, C, 4, 4, generator=torch.Generator().manual_seed(1))
    ref_loss, ref_grads = batchnorm_step(ref_bn, x, w)
    assert all(o["bn_type"] == "GlobalBatchNorm" for o in res)
    torch.testing.assert_close(sum(o["bn_loss"] for o in res), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([o["bn_grads"]["x"] for o in res]), ref_grads["x"], rtol=1e-4, atol=1e-6)
    for key in ("weight", "bias"):
        for o in res:
            torch.testing.assert_close(o["bn_grads"][key], ref_grads[key], rtol=1e-4, atol=1e-6)
    for o in res:
        for k, v in ref_bn.state_dict().items():
            torch.testing.assert_close(o["bn_state"][k], v, rtol=1e-5, atol=1e-6)


def test_one_process_is_the_identity():
    x = torch.randn(3, 2, requires_grad=True)
    assert not dist.init_from_env(torch.device("cpu"))  # no RANK/WORLD_SIZE/SLURM: not distributed
    assert dist.rank() == 0 and dist.world_size() == 1 and dist.is_main()
    for fn in (dist.gather_with_grad, dist.all_gather, dist.all_reduce_sum, dist.all_reduce_mean, dist.all_reduce_max,
               dist.broadcast):
        assert fn(x) is x
    bn = dist.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm1d(2)))
    ref = nn.BatchNorm1d(2)
    torch.testing.assert_close(bn(x), ref(x))


def test_conversion_keeps_the_parameters_and_a_frozen_copy_frozen():
    """A momentum encoder's BN must stay without gradient (DDP would wait for one that never comes)."""
    frozen = nn.BatchNorm1d(2).requires_grad_(False)
    weight, mean = frozen.weight, frozen.running_mean
    new = dist.convert_sync_batchnorm(nn.Sequential(frozen))[0]
    assert isinstance(new, dist.GlobalBatchNorm)
    assert new.weight is weight and not new.weight.requires_grad and new.running_mean is mean


def test_slurm_variables_become_torchrun_ones(monkeypatch):
    """Inside an srun step without torchrun: rank, world size and local rank from SLURM, the master on the
    first host of the node list (parsed here without scontrol), a port derived from the job id."""
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[03-05,09],cpu1")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    env = dist._slurm_env()
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")} == {
        "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu03"}
    assert env["MASTER_PORT"] == dist._slurm_env()["MASTER_PORT"]  # every task derives the same port
    assert dist.SLURM_PORT_RANGE[0] <= int(env["MASTER_PORT"]) <= dist.SLURM_PORT_RANGE[1]
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")  # srun's count for this step wins over the allocation's
    assert dist._slurm_env()["WORLD_SIZE"] == "2"
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")  # one task: not distributed
    assert dist._slurm_env() is None
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS")
    monkeypatch.delenv("SLURM_PROCID")  # an allocation's shell, not a task
    assert dist._slurm_env() is None
