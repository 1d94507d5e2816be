"""trainer.precision=auto picks bf16 only where the hardware multiplies bf16 natively."""

import pytest
import torch

from sslrun.engine import device as dev
from sslrun.errors import SslrunError

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("amx, expected", [(True, torch.bfloat16), (False, None)])
def test_auto_on_cpu_follows_the_amx_probe(monkeypatch, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert dev.resolve_precision("auto", CPU) is expected


def test_a_torch_without_the_private_probe_means_fp32(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert dev.cpu_has_bf16_units() is False
    assert dev.resolve_precision("auto", CPU) is None


@pytest.mark.parametrize("bf16_gpu, expected", [(True, torch.bfloat16), (False, None)])
def test_auto_on_cuda_is_bf16_where_the_gpu_has_it(monkeypatch, bf16_gpu, expected):
    asked = {}

    def supported(including_emulation=True):
        asked["emulation"] = including_emulation
        return bf16_gpu

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert dev.resolve_precision("auto", CUDA) is expected
    assert asked["emulation"] is False  # emulated bf16 (pre-Ampere) is slower than fp32


@pytest.mark.parametrize("amx", [True, False])
def test_explicit_choices_win_over_the_hardware(monkeypatch, amx):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert dev.resolve_precision("bf16", CPU) is torch.bfloat16
    assert dev.resolve_precision("fp32", CPU) is None


def test_an_unknown_precision_names_the_choices():
    with pytest.raises(SslrunError, match="auto, bf16, fp32"):
        dev.resolve_precision("fp16", CPU)
