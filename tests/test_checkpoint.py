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
    torch.testing.assert_close(ck.load_checkpoint(path, "trainer.resume")["backbone"]["w"], torch.ones(2))


def test_corrupt_and_foreign_files_give_clear_errors(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SslrunError, match="could not be read"):
        ck.load_checkpoint(bad, "eval.checkpoint")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": 1}, foreign)
    with pytest.raises(SslrunError, match="not an sslrun checkpoint"):
        ck.load_checkpoint(foreign, "eval.checkpoint")


@pytest.mark.parametrize(("key", "fix"), [("trainer.resume", "trainer.resume=never"),
                                          ("method.teacher", "train a teacher first"),
                                          ("eval.checkpoint", "train a model first")])
def test_a_missing_checkpoint_names_the_key_and_its_own_fix(tmp_path, key, fix):
    with pytest.raises(SslrunError, match=rf"No checkpoint at .*missing.pt \({key}\).*{fix}"):
        ck.load_checkpoint(tmp_path / "missing.pt", key)


def test_bytes_overwritten_inside_a_checkpoint_are_refused_not_read_as_weights(tmp_path):
    """A bad copy that keeps the file's size and zip structure: torch.load alone returns altered weights."""
    path = tmp_path / "last.pt"
    ck.save_checkpoint({"backbone": {"w": torch.arange(20000.0)}}, path)
    data = bytearray(path.read_bytes())
    at = data.index(torch.arange(20000.0)[5000:5004].numpy().tobytes())  # inside the tensor's stored bytes
    data[at:at + 64] = bytes(64)
    path.write_bytes(bytes(data))
    assert not torch.equal(torch.load(path, weights_only=False)["backbone"]["w"], torch.arange(20000.0))
    with pytest.raises(SslrunError, match=r"is damaged: its entry .*data/0 fails its CRC check"):
        ck.load_checkpoint(path, "method.teacher")


def test_non_finite_backbone_weights_are_refused(tmp_path):
    path = tmp_path / "last.pt"
    ck.save_checkpoint({"backbone": {"conv.weight": torch.tensor([1.0, float("nan")])}, "method": {}}, path)
    with pytest.raises(SslrunError, match=r"non-finite backbone weights \(conv.weight\)"):
        ck.load_checkpoint(path, "eval.checkpoint")
