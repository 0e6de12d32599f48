"""Devices: ``--device`` names to ``torch.device``, the bf16 autocast every stage uses on CUDA, and
the numeric precision of a Trans-Net fit (``--precision``).

Precisions (``PRECISIONS``), on CUDA:

- ``fp32``: IEEE float32 everywhere; TF32 is switched **off** for cuDNN convolutions (PyTorch leaves
  it on by default) and for matmuls. The paper-faithful choice: the original code trained in plain
  float32 (2019, before TF32 existed).
- ``tf32``: float32 storage, TF32 tensor-core math in convolutions and matmuls (10-bit mantissa).
- ``bf16``: bf16 autocast for the forward pass (TF32 for what autocast keeps in float32).

On the CPU every choice computes in float32 (autocast and TF32 are CUDA features);
``effective_precision`` says so, and fits record both the asked and the effective precision.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from common.errors import UserError

PRECISIONS = ("fp32", "tf32", "bf16")


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``; a clear error otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}; valid: auto, cpu, cuda, cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but no CUDA device is available; use --device cpu")
    return dev


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA when ``amp``; a no-op context on the CPU or with ``amp=False``."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise UserError(f"unknown --precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    return precision


def effective_precision(device: torch.device, precision: str) -> str:
    """What the arithmetic really is: ``precision`` on CUDA, ``fp32`` on every other device."""
    check_precision(precision)
    return precision if device.type == "cuda" else "fp32"


def tf32_mode(precision: str) -> str:
    """PyTorch's ``fp32_precision`` value for float32 convolutions and matmuls under ``precision``:
    ``ieee`` (TF32 off) for ``fp32``, ``tf32`` for ``tf32`` and ``bf16``."""
    return "ieee" if check_precision(precision) == "fp32" else "tf32"


@contextlib.contextmanager
def cuda_float32_flags(mode: str) -> Iterator[None]:
    """Set cuDNN convolutions' and CUDA matmuls' ``fp32_precision`` to ``mode`` (``ieee`` | ``tf32``)
    inside the block and put the previous values back afterwards. Only PyTorch's per-backend
    ``fp32_precision`` flags are touched (mixing them with the legacy ``allow_tf32`` flags is an error
    in PyTorch). The flags are process-wide; they matter only to CUDA kernels."""
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = (conv.fp32_precision, matmul.fp32_precision)
    conv.fp32_precision = matmul.fp32_precision = mode
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved


@contextlib.contextmanager
def float32_math(device: torch.device, precision: str) -> Iterator[None]:
    """Inside the block, float32 convolutions and matmuls on CUDA use IEEE float32 (``fp32``: TF32
    off, although PyTorch's default lets cuDNN convolutions use it) or TF32 (``tf32``, ``bf16``). A
    no-op off CUDA, where float32 is always IEEE."""
    mode = tf32_mode(precision)
    if device.type != "cuda":
        yield
        return
    with cuda_float32_flags(mode):
        yield


def precision_autocast(device: torch.device, precision: str):
    """The forward-pass context of ``precision``: bf16 autocast for ``bf16`` on CUDA, else a no-op."""
    return autocast(device, check_precision(precision) == "bf16")
