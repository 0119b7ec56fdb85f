"""Choosing the torch device and its precision: ``auto`` picks cuda, then mps, then cpu; a named device must exist."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

from cs336_basics.common import UserError


class DeviceError(UserError):
    """The requested device does not exist here; the message is one line saying why."""


def check_device(device: torch.device) -> None:
    """Raise DeviceError for a device this machine does not have (instead of a deep CUDA traceback later)."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("CUDA is not available on this machine (use the cpu, or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"only {torch.cuda.device_count()} CUDA device(s) exist on this machine: use cuda:0 "
                              f"to cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("MPS is not available on this machine (use the cpu, or auto)")


def pick_device(name: str = "auto", *, allow_mps: bool = True) -> torch.device:
    """``auto`` -> cuda, then mps (when allowed), then cpu; otherwise the named device, checked to exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if allow_mps and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    check_device(device)
    return device


def autocast_for(device: torch.device, dtype: str = "auto") -> tuple[Callable[[], AbstractContextManager], str]:
    """The precision rule for every forward pass: a factory of autocast contexts, and a label for logs.

    ``auto`` is bfloat16 autocast on CUDA GPUs that support it (float32 weights and optimizer) and float32
    elsewhere; ``bfloat16`` on a GPU without bf16 support is a DeviceError.
    """
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype == "float32":
        return nullcontext, "float32"
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceError("this GPU has no bfloat16 support: use float32 (training.dtype=float32)")
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), "bfloat16 autocast (float32 weights)"
