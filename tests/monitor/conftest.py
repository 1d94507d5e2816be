import pytest


@pytest.fixture(autouse=True)
def _tiny_runs(one_thread):
    """Every test here runs tiny tensors in-process: one intra-op thread (tests/conftest.py)."""
