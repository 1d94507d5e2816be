"""The benchmark scripts run at toy sizes, so that they cannot rot between the days a GPU is lent."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
HAS_LIGHTLY = importlib.util.find_spec("lightly") is not None


def _import_scripts(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench_vs_reference

    return bench_vs_reference


def _run(cmd: list[str], record: Path, **env) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "BENCH_RECORD": str(record), **env})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_record_row_starts_a_section_then_extends_its_table(monkeypatch, tmp_path):
    bvr = _import_scripts(monkeypatch)
    path = tmp_path / "B.md"
    path.write_text("# Benchmarks\n\n### Other\n| date | x | commit |\n|---|---|---|\n| d | 1 | c |\n")
    monkeypatch.setenv("BENCH_RECORD", str(path))
    bvr.record_row("New", ["date", "a", "commit"], ["first"])
    path.write_text(path.read_text() + "\n### Later\ntext\n")
    bvr.record_row("New", ["date", "a", "commit"], ["second"])
    lines = path.read_text().splitlines()
    at = lines.index("### New")
    assert lines[at + 1:at + 3] == ["| date | a | commit |", "|---|---|---|"]
    assert re.fullmatch(r"\| \d{4}-\d\d-\d\d \| first \| .+ \|", lines[at + 3])
    assert "| second |" in lines[at + 4]  # inside its own table, before the section that follows
    assert lines[at + 6] == "### Later"
    assert lines[:6] == ["# Benchmarks", "", "### Other", "| date | x | commit |", "|---|---|---|", "| d | 1 | c |"]


@pytest.mark.skipif(not HAS_LIGHTLY, reason="the reference needs lightly (pip install -e '.[bench]')")
def test_the_reference_views_follow_the_workload_recipe(monkeypatch):
    bvr = _import_scripts(monkeypatch)
    from lightly.transforms import SimCLRTransform, SwaVTransform
    from PIL import Image

    from sslrun.data.augment import ViewRecipe
    from sslrun.errors import SslrunError

    image = Image.new("RGB", (32, 32), (120, 30, 200))
    two = bvr.lightly_transform([ViewRecipe(count=2, scale=(0.2, 1.0))], 32, [0.5] * 3, [0.25] * 3)
    assert isinstance(two, SimCLRTransform)
    assert [tuple(v.shape) for v in two(image)] == [(3, 32, 32)] * 2
    multi = bvr.lightly_transform([ViewRecipe(count=2, scale=(0.14, 1.0)), ViewRecipe(count=3, size=18,
                                                                                      scale=(0.05, 0.14))],
                                  32, [0.5] * 3, [0.25] * 3)
    assert isinstance(multi, SwaVTransform)
    assert [tuple(v.shape) for v in multi(image)] == [(3, 32, 32)] * 2 + [(3, 18, 18)] * 3
    with pytest.raises(SslrunError, match="solarisation"):
        bvr.lightly_transform([ViewRecipe(count=2, solarize_p=0.2)], 32, [0.5] * 3, [0.25] * 3)


@pytest.mark.slow
def test_bench_gpu_runs_every_step_at_toy_size(tmp_path):
    """`BENCH_TOY=1 scripts/bench_gpu.sh`: every figure the GPU run records, here on the CPU in seconds."""
    record = tmp_path / "B.md"
    proc = _run(["bash", "scripts/bench_gpu.sh"], record, BENCH_TOY="1", BENCH_REFERENCE="1" if HAS_LIGHTLY else "0")
    rows = [line for line in record.read_text().splitlines() if line.startswith("| 20")]
    for method in ("simclr", "byol", "swav", "dino"):
        row = next(r for r in rows if f"| {method} epoch" in r)
        assert float(re.search(r"\| ([\d.]+) s \(", row).group(1)) > 0, row
    evaluation = next(r for r in rows if "| evaluation" in r)
    assert 0 <= float(re.search(r"kNN top-1 ([\d.]+)", evaluation).group(1)) <= 1
    assert ("| SimCLR, sslrun / lightly-style reference" in record.read_text()) == HAS_LIGHTLY
    assert "failed" not in proc.stdout + record.read_text()


@pytest.mark.slow
def test_bench_vs_reference_compares_a_variant_and_records_it(tmp_path):
    record = tmp_path / "B.md"
    proc = _run([sys.executable, "scripts/bench_vs_reference.py", "trainer.precision=fp32", "dataset.num_train=128",
                 "trainer.batch_size=32", "trainer.log_every=1", "trainer.epochs=1", "--workload", "cnn28", "--seconds", "0",
                 "--rounds", "1", "--record", "--variant", "trainer.precision=bf16"], record)
    assert re.search(r"sslrun [\d.]+ images/s, with trainer.precision=bf16 [\d.]+ images/s", proc.stdout)
    row = record.read_text().splitlines()[-1]
    assert "cnn28, batch 32, fp32" in row and "--variant trainer.precision=bf16" in row


@pytest.mark.slow
def test_profile_step_splits_a_step_into_its_phases(tmp_path):
    record = tmp_path / "B.md"
    proc = _run([sys.executable, "scripts/profile_step.py", "dataset=synthetic", "dataset.num_train=128",
                 "backbone=small_cnn", "backbone.width=8", "trainer.batch_size=32", "trainer.epochs=1",
                 "--seconds", "0", "--record"], record)
    phases = dict(re.findall(r"^\s+(views|forward|backward|optimizer|monitors|method hooks|other)\s+(-?[\d.]+) ms",
                             proc.stdout, re.MULTILINE))
    assert set(phases) == {"views", "forward", "backward", "optimizer", "monitors", "method hooks", "other"}
    assert all(float(phases[p]) > 0 for p in ("views", "forward", "backward", "optimizer", "monitors"))
    assert "Where a step's time goes" in record.read_text()
