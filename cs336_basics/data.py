"""The ``.bin`` token format (writer's metadata, reader, checks) and random training batches.

A token file ``train.bin`` holds token ids back to back (``uint16`` when every id fits, i.e. at most 65,536 vocab
entries, else ``uint32``), so ``np.memmap(path, dtype=np.uint16)`` reads it. Beside it ``train.bin.json`` records
how it was made: ``format_version``, ``dtype``, ``vocab_size``, ``num_tokens``, ``special_tokens``, ``source``
({"name", "size_bytes"}) and ``tokenizer_sha256``.

The checks that a token file fits a model (:func:`check_token_file`, :func:`check_same_tokenizer`) are pure
functions of the metadata and the file size, so local training, evaluation and the Modal pre-flight (which sees
the volume's listing, not the file) apply the same rules with the same messages.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from cs336_basics.common import UserError
from cs336_basics.fileio import atomic_output

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 1
METADATA_SUFFIX = ".json"  # data/train.bin -> data/train.bin.json
METADATA_KEYS = ("dtype", "vocab_size", "num_tokens", "special_tokens", "tokenizer_sha256")
TOKEN_DTYPES = ("uint16", "uint32")


class DataError(UserError):
    """A problem with the user's data files or paths; the message is one line saying how to fix it."""


# ----------------------------------------------------------------------------- format


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding ids ``0 .. vocab_size - 1``."""
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 32:
        return np.dtype(np.uint32)
    raise ValueError(f"vocab_size {vocab_size:,} does not fit in uint32 token ids")


def metadata_path(bin_path: str | os.PathLike) -> Path:
    """``data/train.bin`` -> ``data/train.bin.json``."""
    bin_path = Path(bin_path)
    return bin_path.with_name(bin_path.name + METADATA_SUFFIX)


def make_metadata(*, vocab_size: int, num_tokens: int, special_tokens: list[str], source_name: str,
                  source_bytes: int, tokenizer_sha256: str | None) -> dict[str, Any]:
    """The metadata of a token file, as the writer records it."""
    return {
        "format_version": FORMAT_VERSION,
        "dtype": token_dtype(vocab_size).name,
        "vocab_size": int(vocab_size),
        "num_tokens": int(num_tokens),
        "special_tokens": list(special_tokens),
        "source": {"name": source_name, "size_bytes": int(source_bytes)},
        "tokenizer_sha256": tokenizer_sha256,
    }


def write_metadata(bin_path: str | os.PathLike, metadata: dict[str, Any]) -> None:
    """Write ``metadata`` beside ``bin_path`` (atomically)."""
    with atomic_output(metadata_path(bin_path)) as tmp:
        tmp.write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")


def parse_metadata(text: str | bytes, where: str) -> dict[str, Any]:
    """Validate the text of a metadata file; ValueError naming ``where`` when it is not one."""
    try:
        meta = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read metadata file {where}: {e}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"metadata file {where} is not a JSON object; re-create it with prepare_data.py")
    missing = [k for k in METADATA_KEYS if k not in meta]
    if missing:
        raise ValueError(f"metadata file {where} lacks keys {missing}; re-create it with prepare_data.py")
    if meta["dtype"] not in TOKEN_DTYPES:
        raise ValueError(f"metadata file {where}: unsupported token dtype {meta['dtype']!r} (expected uint16 or uint32)")
    for key in ("vocab_size", "num_tokens"):
        if isinstance(meta[key], bool) or not isinstance(meta[key], int) or meta[key] < 0:
            raise ValueError(f"metadata file {where}: {key} must be a non-negative integer, got {meta[key]!r}")
    return meta


def read_metadata(bin_path: str | os.PathLike) -> dict[str, Any]:
    """The metadata beside a ``.bin`` file.

    Raises FileNotFoundError when it is missing, ValueError when it is unreadable or incomplete.
    """
    path = metadata_path(bin_path)
    if not path.is_file():
        raise FileNotFoundError(f"no metadata file {path} beside {bin_path} (re-create it with prepare_data.py)")
    try:
        text = path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read metadata file {path}: {e.strerror or e}") from None
    return parse_metadata(text, str(path))


def tokenizer_sha256(vocab_path: str | os.PathLike, merges_path: str | os.PathLike) -> str:
    """sha256 of the bytes of vocab.pkl followed by merges.pkl: identifies the tokenizer a .bin was made with."""
    h = hashlib.sha256()
    for p in (vocab_path, merges_path):
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def load_tokens(path: str | os.PathLike) -> np.ndarray:
    """Memory-map a token file written by prepare_data (``.bin``), read-only.

    The dtype (uint16 or uint32) comes from the metadata beside it when present, else uint16; the file size must
    agree with the metadata's token count.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token file not found: {path}")
    dtype, expected = np.dtype(np.uint16), None
    if metadata_path(path).is_file():
        meta = read_metadata(path)
        dtype, expected = np.dtype(meta["dtype"]), int(meta["num_tokens"])
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise ValueError(f"{path} has {size} bytes, not a whole number of {dtype.name} tokens")
    if expected is not None and size // dtype.itemsize != expected:
        raise ValueError(f"{path} holds {size // dtype.itemsize} tokens but its metadata says {expected}; "
                         "the file is incomplete or stale: re-create it with prepare_data.py")
    if size == 0:
        return np.zeros(0, dtype=dtype)  # np.memmap cannot map an empty file
    return np.memmap(path, dtype=dtype, mode="r")


# ----------------------------------------------------------------------------- checks


def check_token_file(
    label: str,
    meta: dict[str, Any] | None,
    size_bytes: int,
    *,
    vocab_size: int,
    min_tokens: int,
    config_hint: str,
    redo: str,
    vocab_fix: str | None = None,
    too_short: str = "(model.context_length + 1): use more data or a smaller model.context_length",
    what: str = "config model.vocab_size",
) -> int:
    """Check a token file fits a model from its metadata and size alone; return its token count.

    ``label`` names the file in messages; ``min_tokens`` is the fewest tokens usable (context_length + 1 to
    train); ``config_hint`` says where model.vocab_size is set (e.g. "in config.yaml"); ``redo`` is the command
    that re-creates the file. ``vocab_fix`` (formatted with ``n``, the file's vocab size), ``too_short`` and ``what``
    (whose vocab_size) replace the training wording for other uses (evaluation). Without metadata only the size is
    checked (as uint16).
    Raises DataError.
    """
    if meta is not None and int(meta["vocab_size"]) != vocab_size:
        n = int(meta["vocab_size"])
        fix = (vocab_fix or "set model.vocab_size: {n} " + config_hint + " or pass model.vocab_size={n}, or "
               "re-tokenize the data with --vocab-size " + str(vocab_size)).format(n=n)
        raise DataError(f"vocab_size mismatch: {what}={vocab_size} but {label} was tokenized with a {n}-token vocab: "
                        f"{fix}")
    itemsize = np.dtype(meta["dtype"]).itemsize if meta is not None else 2
    if size_bytes % itemsize:
        raise DataError(f"{label} has {size_bytes} bytes, not a whole number of {itemsize}-byte tokens: "
                        f"the file is damaged; re-create it: {redo}")
    num_tokens = size_bytes // itemsize
    if meta is not None and num_tokens != int(meta["num_tokens"]):
        raise DataError(
            f"{label} is {size_bytes:,} bytes but its metadata says {int(meta['num_tokens']):,} {meta['dtype']} tokens "
            f"({int(meta['num_tokens']) * itemsize:,} bytes): the file is incomplete or stale; re-create it: {redo}"
        )
    if num_tokens < min_tokens:
        raise DataError(f"{label} holds {num_tokens:,} tokens, fewer than the {min_tokens:,} needed {too_short}")
    return num_tokens


def open_token_file(path: str | os.PathLike, *, not_found: str, **checks: Any) -> tuple[np.ndarray, dict[str, Any] | None]:
    """Memory-map a ``.bin`` file after :func:`check_token_file` (``checks`` are its keyword arguments); return the
    tokens and the metadata (None for a bare ``.bin``, read as uint16). Raises DataError, ``not_found`` when the
    file is missing."""
    path = Path(path)
    if not path.is_file():
        raise DataError(not_found)
    try:
        meta = read_metadata(path)
    except FileNotFoundError:
        meta = None
    except ValueError as exc:
        raise DataError(str(exc)) from None
    size = path.stat().st_size
    check_token_file(str(path), meta, size, **checks)
    dtype = np.dtype(meta["dtype"]) if meta is not None else np.dtype(np.uint16)
    return (np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype=dtype)), meta


def check_same_tokenizer(train: dict[str, Any] | None, val: dict[str, Any] | None, train_label: str,
                         val_label: str, redo: str) -> None:
    """DataError when the two files' metadata record different tokenizers (a file that records none passes)."""
    hashes = {m.get("tokenizer_sha256") for m in (train, val) if m is not None} - {None}
    if len(hashes) > 1:
        raise DataError(f"{train_label} and {val_label} were tokenized with different tokenizers: {redo}")


def sampled_max_token(tokens: np.ndarray, chunks: int = 16, chunk_len: int = 1 << 16) -> int:
    """Largest token id in ``chunks`` evenly spaced slices (all of a small file): a cheap corruption check."""
    n = len(tokens)
    if n <= chunks * chunk_len:
        return int(tokens.max())
    starts = np.linspace(0, n - chunk_len, chunks).astype(np.int64)
    return max(int(tokens[s : s + chunk_len].max()) for s in starts)


# ----------------------------------------------------------------------------- batches


def get_batch(dataset: npt.NDArray, batch_size: int, context_length: int, device: str | torch.device,
              generator: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``batch_size`` windows of ``context_length + 1`` tokens; return int64 (inputs, next-token targets).

    Start positions are uniform over every valid start 0 .. len(dataset) - context_length - 1. ``generator`` makes
    the draw reproducible (train.py keeps one per rank); without it np.random is used. Tensors land on ``device``
    (pinned memory and a non-blocking copy for CUDA).
    """
    import torch  # here, not at the top: the format functions above serve prepare_data without torch

    from cs336_basics.device import DeviceError, check_device

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
