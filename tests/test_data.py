"""get_batch sampling and load_tokens dtype handling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cs336_basics.data import get_batch, load_tokens, metadata_path
from cs336_basics.device import DeviceError


def test_get_batch_shapes_dtypes_and_shift():
    data = np.arange(100, dtype=np.uint16)
    x, y = get_batch(data, 8, 10, "cpu", generator=np.random.default_rng(0))
    assert x.shape == y.shape == (8, 10)
    assert x.dtype == y.dtype == torch.int64 and x.device.type == "cpu"
    assert x.is_contiguous() and y.is_contiguous()
    assert torch.equal(y, x + 1)  # consecutive data: targets are inputs shifted by one
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(8, 9, dtype=torch.int64))


def test_get_batch_reaches_every_valid_start_and_no_invalid_one():
    n, ctx = 12, 4
    data = np.arange(n, dtype=np.uint32) + 1000  # values >= 2**16 need no special handling either
    rng = np.random.default_rng(1)
    starts = set()
    for _ in range(60):
        x, y = get_batch(data, 16, ctx, "cpu", generator=rng)
        starts.update((x[:, 0] - 1000).tolist())
        assert int(y.max()) <= 1000 + n - 1
    assert starts == set(range(n - ctx))  # 0 .. len - ctx - 1 inclusive


def test_get_batch_generator_reproducible_and_global_fallback():
    data = np.arange(1000, dtype=np.uint16)
    a = get_batch(data, 4, 8, "cpu", generator=np.random.default_rng(7))
    b = get_batch(data, 4, 8, "cpu", generator=np.random.default_rng(7))
    assert torch.equal(a[0], b[0])
    np.random.seed(3)
    c = get_batch(data, 4, 8, "cpu")
    np.random.seed(3)
    d = get_batch(data, 4, 8, "cpu")
    assert torch.equal(c[0], d[0])


def test_get_batch_from_memmap(tmp_path):
    path = tmp_path / "tokens.bin"
    np.arange(500, dtype=np.uint16).tofile(path)
    data = load_tokens(path)
    assert isinstance(data, np.memmap) and data.dtype == np.uint16 and len(data) == 500
    x, y = get_batch(data, 3, 16, "cpu", generator=np.random.default_rng(0))
    assert torch.equal(y, x + 1)


def test_get_batch_errors():
    data = np.arange(10, dtype=np.uint16)
    with pytest.raises(ValueError, match="too short"):
        get_batch(data, 2, 10, "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            get_batch(data, 2, 4, "cuda:0")
    else:
        with pytest.raises(DeviceError, match="cuda:99"):
            get_batch(data, 2, 4, "cuda:99")


def _write(tmp_path, values, dtype, meta: dict | None):
    path = tmp_path / "train.bin"
    np.asarray(values, dtype=dtype).tofile(path)
    if meta is not None:
        full = {"dtype": np.dtype(dtype).name, "vocab_size": 70000, "num_tokens": len(values),
                "special_tokens": [], "tokenizer_sha256": "0" * 64, **meta}
        metadata_path(path).write_text(json.dumps(full))
    return path


def test_load_tokens_picks_dtype_from_metadata(tmp_path):
    values = [0, 1, 65535, 65536, 69999]
    path = _write(tmp_path, values, np.uint32, {})
    data = load_tokens(path)
    assert data.dtype == np.uint32 and data.tolist() == values


def test_load_tokens_defaults_to_uint16_without_metadata(tmp_path):
    path = _write(tmp_path, [5, 6, 7], np.uint16, None)
    assert load_tokens(path).tolist() == [5, 6, 7]


def test_load_tokens_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        load_tokens(tmp_path / "nope.bin")
    path = _write(tmp_path, [1, 2, 3], np.uint16, {"num_tokens": 4})
    with pytest.raises(ValueError, match="metadata says 4"):
        load_tokens(path)
    path.write_bytes(b"\x00\x01\x02")
    metadata_path(path).unlink()
    with pytest.raises(ValueError, match="whole number"):
        load_tokens(path)


def test_check_same_tokenizer_compares_only_recorded_hashes():
    from cs336_basics.data import DataError, check_same_tokenizer

    a, b = {"tokenizer_sha256": "a" * 64}, {"tokenizer_sha256": "b" * 64}
    check_same_tokenizer(a, {"tokenizer_sha256": "a" * 64}, "train.bin", "val.bin", "redo")
    for unknown in (None, {}, {"tokenizer_sha256": None}):  # no metadata, or metadata that records no tokenizer
        check_same_tokenizer(a, unknown, "train.bin", "val.bin", "redo")
        check_same_tokenizer(unknown, b, "train.bin", "val.bin", "redo")
    with pytest.raises(DataError, match="train.bin and val.bin were tokenized with different tokenizers: redo"):
        check_same_tokenizer(a, b, "train.bin", "val.bin", "redo")
