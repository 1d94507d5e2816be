from pathlib import Path

import pytest
from dist.spawn import run_ranks

CASES_FILE = str(Path(__file__).with_name("cases.py"))


@pytest.fixture(scope="session")
def ranks() -> list[dict]:
    """What each of 2 gloo processes returned from cases.worker: every DDP case and the collectives' checks,
    in one spawn (each spawn costs seconds of CPU)."""
    from dist.cases import BN_CASES, CASES

    return run_ranks(CASES_FILE, "worker", world_size=2, cases=[*CASES, *BN_CASES])
