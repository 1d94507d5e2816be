"""Every method whose loss couples the samples of a batch: 2 processes under DDP with global batch B equal
1 process with batch B (issue 9) — each step's loss (mean over the processes), every parameter's gradient,
and the state the hooks update (queues, memory bank, centre, prototypes, clusterings, BN statistics).

The processes run in one spawn (conftest.py); the one-process reference runs here, from the same seed.
Batch norm: where a method's networks hold BN, the processes convert it to global BN (trainer.sync_batchnorm);
without it each process normalises over its own half and the two differ (the last test shows by how much).
"""

from __future__ import annotations

import faiss
import pytest
import torch
from dist.cases import CASES, STEPS, B, build, global_batch, run_case

# fp32 sums in another order (2 processes of 1 thread against 1 process) differ in the last bits; batch norm
# over 8 images and Barlow Twins' squared correlations magnify that to ~1e-5 of a tensor's largest entry.
# A bias just before batch norm has a true gradient of 0 and holds only that noise: gradients are also
# allowed an absolute error of ATOL times the largest gradient entry of the step.
REL, ATOL = 1e-4, 1e-5


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float = 1e-7) -> None:
    """Equal up to REL of the tensor's largest entry (its small entries carry the noise of its large ones)."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    scale = expected.abs().max().item() if expected.numel() else 0.0
    assert err <= REL * scale + atol, f"{what}: max error {err:.3g} at scale {scale:.3g}"


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", [*CASES, "simclr_cnn_syncbn"])
def test_two_processes_equal_one(case, ranks, one_thread):
    ref = run_case(case)
    procs = [r[case] for r in ranks]
    for step in range(STEPS):
        mean_loss = sum(p["loss"][step] for p in procs) / len(procs)
        assert_close(mean_loss, ref["loss"][step], f"{case}: loss at step {step}")
        for p in procs:  # DDP averaged the gradients: every process holds the one-process gradient
            assert p["grads"][step].keys() == ref["grads"][step].keys()
            largest = max(g.abs().max().item() for g in ref["grads"][step].values())
            for name, g in ref["grads"][step].items():
                assert_close(p["grads"][step][name], g, f"{case}: gradient of {name} at step {step}", ATOL * largest)
    for p in procs:
        assert p["state"].keys() == ref["state"].keys()
        for key, value in ref["state"].items():
            assert_close(p["state"][key], value, f"{case}: state {key}")


def test_without_global_batchnorm_the_processes_differ(ranks, one_thread):
    """The documented difference: BN over each process's half (trainer.sync_batchnorm=false) is not BN over the
    batch, so the loss and the gradients move away from the one-process run's."""
    ref = run_case("simclr_cnn_local_bn")  # in one process BN is over the whole batch either way
    procs = [r["simclr_cnn_local_bn"] for r in ranks]
    loss_gap = abs(sum(p["loss"][0] for p in procs) / 2 - ref["loss"][0])
    grad_gap = max((procs[0]["grads"][0][n] - g).abs().max() for n, g in ref["grads"][0].items())
    assert loss_gap > 1e-3 and grad_gap > 1e-3


def test_moco_shuffle_bn_encodes_the_keys_in_random_halves_of_the_global_batch(ranks, one_thread):
    """MoCo's Shuffle-BN across processes (He et al., 2020, sec. 3.3): each process's key encoder normalises a
    random half of the global key batch (one permutation, drawn on rank 0 and broadcast), and every process
    queues all keys in batch order. Rebuilt here: the permutation from the same seed, BN over each half."""
    method, _ = build("mocov2_shuffle_bn")
    views, _ = global_batch("mocov2_shuffle_bn", 0)
    torch.manual_seed(2)  # run_case's seed before the first step; the permutation is its first draw
    perm = torch.randperm(B)
    with torch.no_grad():
        halves = [method._key(views[1][perm[h * B // 2:(h + 1) * B // 2]]) for h in range(2)]
    keys = torch.cat(halves)[torch.argsort(perm)]
    for r in ranks:  # the queue's first B rows are the first step's keys
        assert_close(r["mocov2_shuffle_bn"]["state"]["queue.data"][:B], keys, "queued keys")
    with torch.no_grad():  # not what one process's BN over the whole batch gives
        assert (method._key(views[1]) - keys).abs().max() > 1e-3
