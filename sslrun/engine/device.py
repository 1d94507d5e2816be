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
    """The autocast dtype for ``trainer.precision``, or None for full fp32.

    ``auto`` picks the faster of the two where training is known to be unaffected by the choice (the losses
    run in fp32 under autocast, ``sslrun.methods.losses.in_fp32``):

    * a CUDA GPU with bf16 arithmetic (Ampere and later): bf16, which needs no loss scaling; older GPUs: fp32.
    * a CPU with bf16 matrix units (AMX tiles, Intel Sapphire Rapids and later): bf16, 1.5-1.8x faster than
      fp32 there (BENCHMARKS.md). Elsewhere fp32: without AMX, oneDNN's bf16 paths (AVX512-BF16 dot
      products on AMD Zen 4, emulation on older CPUs) were not faster end to end (BENCHMARKS.md, precision).

    Args:
        name: ``auto``, ``bf16`` or ``fp32``.
        device: where training runs.

    Raises:
        SslrunError: for any other name.
    """
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else None
        return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16_units() else None
    if name == "bf16":
        return torch.bfloat16
    if name == "fp32":
        return None
    raise SslrunError(f"trainer.precision={name!r} is not one of auto, bf16, fp32.")


def cpu_has_bf16_units() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware tiles (AMX, Sapphire Rapids and later)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, so looked up defensively
    return bool(probe and probe())
