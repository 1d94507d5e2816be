"""End to end under torchrun: two gloo processes train one model into one run directory (issue 9)."""

import json
import subprocess
import sys

import pytest
from runner import FAST


@pytest.mark.slow
def test_torchrun_two_processes_write_one_run_directory(tmp_path):
    # No hydra.run.dir: each process composes its own ${now}; they must still share rank 0's folder.
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "sslrun.cli", *FAST, "method=simclr", "trainer.epochs=2"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[:4000]
    runs = [p.parent for p in (tmp_path / "outputs").rglob("metrics.json")]
    assert len(runs) == 1 and not [d for d in (tmp_path / "outputs").glob("*/*") if d not in runs]
    run = runs[0]
    assert len(list(run.glob("events.out.tfevents.*"))) == 1 and (run / "checkpoints" / "last.pt").is_file()
    m = json.loads((run / "metrics.json").read_text())
    assert m["steps"] == 2 * (256 // 64) and 0 <= m["knn_top1"] <= 1  # the global batch: 4 steps per epoch
    assert proc.stdout.count("sslrun results") == 1  # one process reports
