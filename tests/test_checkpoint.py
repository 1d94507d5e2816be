import pytest
import torch

from sslrun import checkpoint as ck
from sslrun.errors import SslrunError


def test_atomic_save_keeps_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ck.save_checkpoint({"backbone": {"w": torch.ones(2)}}, path)

    def crash(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(ck.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint({"backbone": {"w": torch.zeros(2)}}, path)
    torch.testing.assert_close(ck.load_checkpoint(path)["backbone"]["w"], torch.ones(2))


def test_corrupt_and_foreign_files_give_clear_errors(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SslrunError, match="could not be read"):
        ck.load_checkpoint(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": 1}, foreign)
    with pytest.raises(SslrunError, match="not an sslrun checkpoint"):
        ck.load_checkpoint(foreign)
    with pytest.raises(SslrunError, match="No checkpoint"):
        ck.load_checkpoint(tmp_path / "missing.pt")
