import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny in-process runs (``pytestmark = pytest.mark.usefixtures("one_thread")``): one intra-op
    thread is faster than two that wait on each other, several times faster on a busy shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
