"""One run per run directory; failed attempts leave nothing behind; the run's output is kept in sslrun.log."""

import pytest
from rich.console import Console

from sslrun.errors import SslrunError
from sslrun.rundir import LOG, RunDirectory


def test_second_run_into_a_locked_directory_is_refused(tmp_path):
    with RunDirectory(tmp_path / "run"):
        with pytest.raises(SslrunError, match="Another sslrun run"):
            with RunDirectory(tmp_path / "run"):
                pass
    with RunDirectory(tmp_path / "run"):  # released at exit: the next run may use it
        pass


def test_a_failed_attempt_leaves_no_empty_directory(tmp_path):
    run_dir = tmp_path / "outputs" / "2026-01-01" / "10-00-00"
    with pytest.raises(SslrunError):
        with RunDirectory(run_dir, Console(record=True)):
            raise SslrunError("bad config")
    assert not run_dir.exists() and not run_dir.parent.exists()


def test_a_failed_attempt_keeps_a_directory_with_files(tmp_path):
    console = Console(record=True, file=open("/dev/null", "w"))
    with pytest.raises(SslrunError):
        with RunDirectory(tmp_path, console):
            (tmp_path / "metrics.json").write_text("{}")
            console.print("step 1")
            raise SslrunError("later failure")
    assert (tmp_path / "metrics.json").is_file() and "step 1" in (tmp_path / LOG).read_text()
