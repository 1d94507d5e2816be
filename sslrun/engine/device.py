"""Resolve the trainer's ``device`` and ``precision`` keys."""

from __future__ import annotations

import torch

from ..errors import SslrunError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SslrunError(f"trainer.device={name} was asked for, but PyTorch sees no CUDA GPU on this machine. "
                          "Use trainer.device=auto (or cpu) to run on the CPU.")
    return device


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full fp32. ``auto`` is bf16 on GPU (no loss scaling needed), fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if name == "bf16":
        return torch.bfloat16
    if name == "fp32":
        return None
    raise SslrunError(f"trainer.precision={name!r} is not one of auto, bf16, fp32.")


def cpu_has_bf16_units() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX tiles, Sapphire Rapids and later).

    There, bf16 autocast trains 1.5-1.8x faster than fp32 (BENCHMARKS.md); elsewhere it is emulated and slower.
    """
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, so looked up defensively
    return bool(probe and probe())
