"""Run a function in N gloo processes on the CPU and collect what each rank returns.

Each rank is a fresh ``python`` process (as torchrun would start it) with RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT set, so it goes through :func:`sslrun.dist.init_from_env` like a real run. The function is
named by file and attribute (no pickling of test modules): ``run_ranks(__file__, "worker", ...)`` calls
``worker(**kwargs)`` on every rank and returns the ``torch.save``-able results in rank order.
Spawning costs a few seconds of CPU, so a test module should run all its cases in one spawn.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

TESTS = Path(__file__).resolve().parent.parent  # so a case file can import the tests' helpers (runner)

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(file: str, function: str, world_size: int = 2, timeout: float = 300, **kwargs: Any) -> list[Any]:
    """``function(**kwargs)`` from ``file`` on ``world_size`` processes; the list of their return values."""
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(kwargs, Path(tmp) / "kwargs.pt")
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
               "WORLD_SIZE": str(world_size), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
        procs = [subprocess.Popen([sys.executable, __file__, file, function, tmp],
                                  env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for r in range(world_size)]
        logs = []
        try:
            for p in procs:
                logs.append(p.communicate(timeout=timeout)[0])
        finally:
            for p in procs:
                p.kill()
        for r, (p, log) in enumerate(zip(procs, logs)):
            if p.returncode != 0:
                raise AssertionError(f"rank {r} of {world_size} failed ({p.returncode}):\n{log}")
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def _main(file: str, function: str, tmp: str) -> None:
    from sslrun import dist

    torch.set_num_threads(1)
    assert dist.init_from_env(torch.device("cpu"))
    spec = importlib.util.spec_from_file_location("_dist_case", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = getattr(module, function)(**torch.load(Path(tmp) / "kwargs.pt", weights_only=False))
    torch.save(result, Path(tmp) / f"rank{dist.rank()}.pt")
    dist.destroy()


if __name__ == "__main__":
    _main(*sys.argv[1:4])
