"""Tokenize a text file into a flat ``.bin`` array of token ids, in parallel, plus a JSON sidecar.

The ``.bin`` layout and its metadata are defined in :mod:`cs336_basics.data`, which also reads them.

Parallelism: the file is cut into chunks of a few MB at *safe* byte offsets, where encoding the two
halves separately gives exactly the tokens of encoding the whole text (the rule and its proof:
:mod:`cs336_basics.pretokenize`). Worker processes each read and encode only their byte range and send
back a numpy array of ids (2 or 4 bytes per id through the pipe); the parent writes the arrays in file
order, keeping at most two chunks per worker in flight, so memory stays flat for any input size. A
worker keeps its tokenizer, and so its caches, from one chunk to the next.
"""

from __future__ import annotations

import codecs
import multiprocessing as mp
import os
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from cs336_basics.data import DataError, make_metadata, token_dtype, write_metadata
from cs336_basics.fileio import atomic_output
# find_safe_boundaries is also imported from here by callers (and tests) that chunk files.
from cs336_basics.pretokenize import POOL_MIN_BYTES, find_safe_boundaries, ignore_sigint

MAX_CHUNK_BYTES = 4 << 20  # per task: bounds the memory a worker needs besides its caches (~40 MB)
MIN_CHUNK_BYTES = 256 << 10


class Encoder(Protocol):
    """What tokenize_file needs; a ``Tokenizer`` also has ``encode_array`` (ids as a numpy array), used when present."""

    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class TokenizeResult:
    num_tokens: int
    input_bytes: int
    output_bytes: int
    dtype: str
    metadata: dict


def check_text_file(path: str | Path, *, block_bytes: int = 16 << 20) -> int:
    """Check that ``path`` is a readable, non-empty UTF-8 file; return its size in bytes.

    Raises DataError with the byte offset of the first invalid byte, so a multi-GB run fails in
    seconds up front instead of after hours of BPE training.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"input file not found: {path}")
    if not path.is_file():
        raise DataError(f"input path is not a file: {path}")
    try:
        size = path.stat().st_size
        if size == 0:
            raise DataError(f"input file is empty: {path}")
        decoder = codecs.getincrementaldecoder("utf-8")()
        offset = 0  # file offset of the first byte not yet passed to the decoder
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(block_bytes), b""):
                pending = len(decoder.getstate()[0])
                try:
                    decoder.decode(block)
                except UnicodeDecodeError as e:
                    bad = offset - pending + e.start
                    raise DataError(
                        f"{path} is not valid UTF-8: invalid byte 0x{e.object[e.start]:02x} at byte offset {bad:,}; "
                        f"convert it first, e.g. iconv -f latin1 -t utf-8 {path} > fixed.txt "
                        f"(or drop bad bytes: iconv -c -f utf-8 -t utf-8)"
                    ) from None
                offset += len(block)
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                raise DataError(
                    f"{path} is not valid UTF-8: it ends inside a multi-byte character at byte offset "
                    f"{offset - len(decoder.getstate()[0]):,}; the file may be truncated"
                ) from None
    except PermissionError:
        raise DataError(f"cannot read input file (permission denied): {path}") from None
    except OSError as e:
        raise DataError(f"cannot read input file {path}: {e.strerror or e}") from None
    return size


# Worker side: one tokenizer per process, set by the pool initializer.
_worker: dict = {}


def _init_worker(tokenizer: Encoder, path: str, dtype: str, vocab_size: int) -> None:
    _worker.update(tokenizer=tokenizer, path=path, dtype=np.dtype(dtype), vocab_size=vocab_size)


def _init_pool_worker(tokenizer: Encoder, path: str, dtype: str, vocab_size: int) -> None:
    ignore_sigint()
    _init_worker(tokenizer, path, dtype, vocab_size)


def _encode_range(bounds: tuple[int, int]) -> np.ndarray:
    """Worker: the ids of one byte range of the file, as an array of the output dtype."""
    start, end = bounds
    path, tokenizer = _worker["path"], _worker["tokenizer"]
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not valid UTF-8: invalid byte at byte offset {start + e.start:,}") from None
    del data
    encode_array = getattr(tokenizer, "encode_array", None)
    ids = encode_array(text) if encode_array is not None else np.asarray(tokenizer.encode(text))
    if ids.size and int(ids.max()) >= _worker["vocab_size"]:
        raise ValueError(f"token id {int(ids.max())} >= vocab_size {_worker['vocab_size']}: the tokenizer does not match vocab_size")
    return ids.astype(_worker["dtype"], copy=False)


def tokenize_file(
    input_path: str | Path,
    output_path: str | Path,
    tokenizer: Encoder,
    *,
    vocab_size: int,
    special_tokens: Sequence[str] = (),
    tokenizer_hash: str | None = None,
    num_workers: int | None = None,
    chunk_bytes: int | None = None,
    parallel: bool | None = None,
    progress: bool = False,
) -> TokenizeResult:
    """Encode the UTF-8 text file ``input_path`` into ``output_path`` (.bin) and its ``.bin.json`` sidecar.

    The tokens equal ``tokenizer.encode(whole_text)``. ``parallel=None`` uses a process pool of
    ``num_workers`` (default: all CPUs) for inputs over a few MB; both files are written under a
    temporary name and renamed when complete. ``chunk_bytes=None`` picks at least 4 chunks per
    worker (so workers finish together), between 256 KB and 4 MB each.
    """
    input_path, output_path = Path(input_path), Path(output_path)
    dtype = token_dtype(vocab_size)
    num_workers = max(1, num_workers or os.cpu_count() or 1)
    input_bytes = input_path.stat().st_size
    if chunk_bytes is None:
        chunk_bytes = min(MAX_CHUNK_BYTES, max(MIN_CHUNK_BYTES, input_bytes // (4 * num_workers)))
    with open(input_path, "rb") as f:
        bounds = find_safe_boundaries(f, chunk_bytes, special_tokens)
    ranges = list(zip(bounds[:-1], bounds[1:]))
    if parallel is None:
        parallel = num_workers > 1 and len(ranges) > 1 and input_bytes >= POOL_MIN_BYTES

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=input_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="Tokenizing")
    num_tokens = 0
    try:
        with atomic_output(output_path) as tmp, open(tmp, "wb") as out:
            chunks = _encoded_chunks(ranges, tokenizer, input_path, dtype, vocab_size, num_workers, parallel)
            for (start, end), arr in zip(ranges, chunks):
                out.write(arr.data)  # the array's memory, written without a copy
                num_tokens += len(arr)
                if bar is not None:
                    bar.update(end - start)
    finally:
        if bar is not None:
            bar.close()

    metadata = make_metadata(vocab_size=vocab_size, num_tokens=num_tokens, special_tokens=list(special_tokens),
                             source_name=input_path.name, source_bytes=input_bytes, tokenizer_sha256=tokenizer_hash)
    write_metadata(output_path, metadata)
    return TokenizeResult(num_tokens, input_bytes, num_tokens * dtype.itemsize, dtype.name, metadata)


def _encoded_chunks(
    ranges: list[tuple[int, int]],
    tokenizer: Encoder,
    path: Path,
    dtype: np.dtype,
    vocab_size: int,
    num_workers: int,
    parallel: bool,
) -> Iterator[np.ndarray]:
    """Encoded chunks in file order; with ``parallel``, at most 2 per worker in flight (bounded memory)."""
    if not parallel:
        _init_worker(tokenizer, str(path), dtype.name, vocab_size)
        try:
            for r in ranges:
                yield _encode_range(r)
        finally:
            _worker.clear()
        return
    # The platform default (fork on Linux up to Python 3.13): workers start fast and inherit the
    # tokenizer; spawn/forkserver pickle it (Tokenizer supports that) at a start-up cost.
    ctx = mp.get_context()
    with ctx.Pool(min(num_workers, len(ranges)), _init_pool_worker, (tokenizer, str(path), dtype.name, vocab_size)) as pool:
        todo = iter(ranges)
        pending: deque = deque()
        for r in todo:
            pending.append(pool.apply_async(_encode_range, (r,)))
            if len(pending) >= 2 * num_workers:
                break
        while pending:
            arr = pending.popleft().get()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.apply_async(_encode_range, (nxt,)))
            yield arr
