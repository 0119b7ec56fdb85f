"""Tokenize a text file into a flat ``.bin`` array of token ids, in parallel, plus a JSON sidecar.

The ``.bin`` layout and its metadata are defined in :mod:`cs336_basics.data`, which also reads them.

Parallelism: the file is cut into chunks of a few MB at *safe* byte offsets, i.e. offsets where
encoding the two halves separately gives exactly the tokens of encoding the whole text. Worker
processes each read and encode only their byte range; the parent writes the results in file order,
keeping only a bounded number of chunks in flight so memory stays flat for any input size.

Safe cut points (``find_safe_boundaries``), given that encoding first splits on special tokens and
then pre-tokenizes each piece with the GPT-2 pattern:

* the start of a special-token occurrence, or
* just before a line break (``"\\n"`` or ``"\\r"``) whose preceding byte is printable, non-space
  ASCII (``!``..``~``),

in both cases only where no occurrence of any special token spans the offset. Why the line-break
rule is exact: no GPT-2 pre-token holds a non-space character followed by whitespace (the only
whitespace a non-whitespace pre-token has is one *leading* ``" "``), so no pre-token crosses the
cut; the greedy letter/number/punctuation runs that end just before it stop there with or without
the text after it; and because the character before the cut is not whitespace, no ``\\s+(?!\\S)``
match reaches the cut, so the pattern's one look-ahead never sees past it. Cutting *after* a
newline is not safe: in ``"a \\nb"`` the whole text gives ``" "``, ``"\\n"`` while the cut
prefix ``"a \\n"`` gives ``" \\n"``.
"""

from __future__ import annotations

import codecs
import multiprocessing as mp
import os
import re
import signal
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np

from cs336_basics.data import DataError, make_metadata, token_dtype, write_metadata
from cs336_basics.fileio import atomic_output

MAX_CHUNK_BYTES = 8 << 20  # per task: bounds worker memory (~100 MB each) for any input size
MIN_CHUNK_BYTES = 256 << 10
SMALL_INPUT_BYTES = 4 << 20  # below this, encode in-process: a pool costs more than it saves
_PROBE_BYTES = 1 << 16


class Encoder(Protocol):
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


def _cut_regex(special_tokens: Sequence[str]) -> re.Pattern[bytes]:
    """Zero-width matches at candidate cuts: group ``nl`` is a printable byte before a line break (cut
    after that byte), group ``sp`` a special token (cut at its start)."""
    alternatives = [rb"(?=(?P<nl>[\x21-\x7e])[\n\r])"]
    if special_tokens:
        specials = sorted({t.encode("utf-8") for t in special_tokens}, key=len, reverse=True)
        alternatives.append(rb"(?=(?P<sp>" + b"|".join(re.escape(t) for t in specials) + rb"))")
    return re.compile(b"|".join(alternatives))


def _next_safe_cut(f: BinaryIO, start: int, file_size: int, specials: list[bytes], cut_rx: re.Pattern[bytes]) -> int:
    """The first safe cut offset >= ``start`` (or ``file_size`` when there is none)."""
    span = max((len(s) for s in specials), default=1)
    pos = start
    while pos < file_size:
        lo = max(0, pos - span)
        f.seek(lo)
        block = f.read(pos - lo + _PROBE_BYTES + span)
        for m in cut_rx.finditer(block, max(0, pos - lo - 1)):
            if m.start() >= pos - lo + _PROBE_BYTES:
                break
            cut = m.start() + 1 if m.group("nl") is not None else m.start()
            if cut < pos - lo:
                continue
            # Unsafe if some special-token occurrence starts before the cut and ends after it.
            if not any(block.find(s, max(0, cut - len(s) + 1), cut + len(s) - 1) != -1 for s in specials):
                return lo + cut
        pos += _PROBE_BYTES
    return file_size


def find_safe_boundaries(f: BinaryIO, chunk_bytes: int, special_tokens: Sequence[str] = ()) -> list[int]:
    """Byte offsets (from 0 to the file size) cutting ``f`` into chunks of about ``chunk_bytes`` at safe points.

    Encoding each chunk separately and concatenating gives exactly the tokens of encoding the whole
    text (see the module docstring). A stretch with no safe point stays one larger chunk.
    """
    f.seek(0, os.SEEK_END)
    file_size = f.tell()
    specials = sorted({t.encode("utf-8") for t in special_tokens}, key=len)
    cut_rx = _cut_regex(special_tokens)
    bounds = [0]
    while bounds[-1] < file_size:
        target = bounds[-1] + max(1, chunk_bytes)
        if target >= file_size:
            bounds.append(file_size)
            break
        bounds.append(_next_safe_cut(f, target, file_size, specials, cut_rx))
    return bounds


# Worker side: one tokenizer per process, set by the pool initializer.
_worker: dict = {}


def _init_worker(tokenizer: Encoder, path: str, dtype: str) -> None:
    _worker.update(tokenizer=tokenizer, path=path, dtype=np.dtype(dtype))


def _init_pool_worker(tokenizer: Encoder, path: str, dtype: str) -> None:
    # Ctrl-C reaches the whole process group: let only the parent handle it (it terminates the
    # pool and removes the temporary output) instead of every worker printing a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _init_worker(tokenizer, path, dtype)


def _encode_range(bounds: tuple[int, int]) -> np.ndarray:
    start, end = bounds
    path = _worker["path"]
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not valid UTF-8: invalid byte at byte offset {start + e.start:,}") from None
    ids = _worker["tokenizer"].encode(text)
    return np.asarray(ids, dtype=_worker["dtype"])


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
    worker (so workers finish together), between 256 KB and 8 MB each.
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
        parallel = num_workers > 1 and len(ranges) > 1 and input_bytes >= SMALL_INPUT_BYTES

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=input_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="Tokenizing")
    num_tokens = 0
    try:
        with atomic_output(output_path) as tmp, open(tmp, "wb") as out:
            for (start, end), arr in zip(ranges, _encoded_chunks(ranges, tokenizer, input_path, dtype, num_workers, parallel)):
                if arr.size and int(arr.max()) >= vocab_size:
                    raise ValueError(f"token id {int(arr.max())} >= vocab_size {vocab_size}: the tokenizer does not match vocab_size")
                out.write(arr.tobytes())
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
    ranges: list[tuple[int, int]], tokenizer: Encoder, path: Path, dtype: np.dtype, num_workers: int, parallel: bool
) -> Iterator[np.ndarray]:
    """Encoded chunks in file order; with ``parallel``, at most 2 per worker in flight (bounded memory)."""
    if not parallel:
        _init_worker(tokenizer, str(path), dtype.name)
        try:
            for r in ranges:
                yield _encode_range(r)
        finally:
            _worker.clear()
        return
    # The platform default (fork on Linux up to Python 3.13): workers start fast and inherit the
    # tokenizer; spawn/forkserver pickle it (Tokenizer supports that) at a start-up cost.
    ctx = mp.get_context()
    with ctx.Pool(min(num_workers, len(ranges)), _init_pool_worker, (tokenizer, str(path), dtype.name)) as pool:
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
