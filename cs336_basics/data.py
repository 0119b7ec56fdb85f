"""Token files and random training batches."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from cs336_basics.device import DeviceError, check_device


def load_tokens(path: str | os.PathLike) -> np.memmap:
    """Memory-map a token file written by prepare_data (``.bin``), read-only.

    The dtype (uint16 or uint32) comes from the sidecar metadata (``<path>.json``) when present, else uint16.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token file not found: {path}")
    from cs336_basics.tokenize_data import metadata_path, read_metadata

    dtype, expected = np.dtype(np.uint16), None
    if metadata_path(path).is_file():
        meta = read_metadata(path)
        dtype, expected = np.dtype(meta["dtype"]), int(meta["num_tokens"])
        if dtype not in (np.uint16, np.uint32):
            raise ValueError(f"unsupported token dtype {dtype} in the metadata of {path} (expected uint16 or uint32)")
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise ValueError(f"{path} has {size} bytes, not a whole number of {dtype.name} tokens")
    if expected is not None and size // dtype.itemsize != expected:
        raise ValueError(f"{path} holds {size // dtype.itemsize} tokens but its metadata says {expected}; "
                         "the file is incomplete or stale: re-create it with prepare_data.py")
    if size == 0:
        return np.zeros(0, dtype=dtype)  # np.memmap cannot map an empty file
    return np.memmap(path, dtype=dtype, mode="r")


def get_batch(dataset: npt.NDArray, batch_size: int, context_length: int, device: str | torch.device,
              generator: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``batch_size`` windows of ``context_length + 1`` tokens; return int64 (inputs, next-token targets).

    Start positions are uniform over every valid start 0 .. len(dataset) - context_length - 1. ``generator`` makes
    the draw reproducible (train.py keeps one per rank); without it np.random is used. Tensors land on ``device``
    (pinned memory and a non-blocking copy for CUDA).
    """
    device = torch.device(device)
    try:
        check_device(device)
    except DeviceError as exc:
        raise DeviceError(f"device {device} requested but {exc}") from None
    n_starts = len(dataset) - context_length
    if n_starts < 1:
        raise ValueError(f"dataset of {len(dataset)} tokens is too short for context_length {context_length} "
                         f"(needs at least {context_length + 1})")
    if generator is not None:
        starts = generator.integers(0, n_starts, size=batch_size)
    else:
        starts = np.random.randint(0, n_starts, size=batch_size)
    windows = np.asarray(dataset[np.add.outer(starts, np.arange(context_length + 1))], dtype=np.int64)
    tokens = torch.from_numpy(windows)
    if device.type == "cuda":
        tokens = tokens.pin_memory().to(device, non_blocking=True)
    elif device.type != "cpu":
        tokens = tokens.to(device)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
