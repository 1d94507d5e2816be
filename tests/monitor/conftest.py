import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tests run tiny tensors in-process: one intra-op thread is faster than two that wait on each
    other, much faster on a busy shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
