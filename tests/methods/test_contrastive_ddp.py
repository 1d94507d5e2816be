"""InvaSpread, SimCLR v2, CMC and CPC v2: 2 processes under DDP with global batch B equal 1 process with batch B
(each step's mean loss, every gradient, and the memory banks and queue), all cases in one spawn."""

from pathlib import Path

import pytest
import torch
from dist.spawn import run_ranks
from methods.contrastive_ddp_cases import CASES, STEPS, run_case

TOL = {"rtol": 1e-4, "atol": 1e-5}  # fp32 sums in another order (losses, banks, queue)


def assert_close_at_scale(got: torch.Tensor, want: torch.Tensor, msg: str) -> None:
    """Equal up to 1e-3 of the tensor's largest entry: fp32 sums in another order, through a few steps of SGD,
    leave entries that are ~0 (a bias before batch norm, whose gradient is 0 in exact arithmetic) noisy."""
    assert (got - want).abs().max() <= 1e-3 * want.abs().max() + 1e-5, msg


@pytest.fixture(scope="module")
def ranks():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield run_ranks(str(Path(__file__).with_name("contrastive_ddp_cases.py")), "worker", world_size=2,
                    cases=list(CASES))
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_equal_one(case, ranks):
    ref, procs = run_case(case), [r[case] for r in ranks]
    for step in range(STEPS):
        mean_loss = sum(p["loss"][step] for p in procs) / len(procs)
        torch.testing.assert_close(mean_loss, ref["loss"][step], **TOL, msg=f"{case}: loss at step {step}")
        for p in procs:  # DDP averaged the gradients: every process holds the one-process gradient
            assert p["grads"][step].keys() == ref["grads"][step].keys()
            for name, g in ref["grads"][step].items():
                assert_close_at_scale(p["grads"][step][name], g, f"{case}: grad of {name}, step {step}")
    for p in procs:
        assert p["state"].keys() == ref["state"].keys()
        for key, value in ref["state"].items():
            torch.testing.assert_close(p["state"][key], value, **TOL, msg=f"{case}: {key}")
