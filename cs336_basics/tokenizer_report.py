"""How well and how fast tokenizers encode texts: bytes per token, throughput, and the time for the 825 GB Pile.

    uv run python -m cs336_basics.tokenizer_report --tokenizer-dir A [--tokenizer-dir B ...] --text FILE [--text FILE ...]
                                                   [--max-mb 16] [--cores N] [--json]

For every tokenizer x text pair: the compression ratio (UTF-8 bytes / tokens: higher means fewer tokens for the
same text) and the encode throughput (MB/s = bytes / seconds, MB = 1e6 bytes) of one process with a freshly
loaded tokenizer, so its caches start cold as in ``prepare_data.py``. Only the first ``--max-mb`` MB of each text are
read (cut at a character boundary). The Pile estimate, 825e9 bytes / (MB/s x 1e6 x cores), assumes
``prepare_data.py`` spreads the work over this machine's cores with no loss, which is optimistic by the cost of
reading and writing files.

A tokenizer folder holds ``vocab.pkl`` and ``merges.pkl`` (written by ``prepare_data.py --tokenizer-dir``; its
``special_tokens.json`` is used when present), or a Hugging Face ``tokenizer.json``, or GPT-2's ``vocab.json`` and
``merges.txt``.
"""

from __future__ import annotations

import argparse
import codecs
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from cs336_basics.common import UserError, fmt_duration, format_table, one_line, run_command
from cs336_basics.tokenizer import VOCAB_FILE, Tokenizer, load_tokenizer, tokenizer_files

PILE_BYTES = 825e9
DEFAULT_MAX_MB = 16.0
PIECE_CHARS = 1 << 20  # characters handed to the encoder at a time (progress granularity)


@dataclass
class PairResult:
    """One tokenizer on one text."""

    tokenizer: str
    text: str
    bytes: int
    tokens: int
    seconds: float
    bytes_per_token: float
    mb_per_s: float
    pile_seconds: float
    cores: int
    truncated: bool


def available_cores() -> int:
    """CPU cores this process may use (its affinity mask where the OS has one, e.g. in a container)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def pile_seconds(mb_per_s: float, cores: int, total_bytes: float = PILE_BYTES) -> float:
    """Time to encode ``total_bytes`` at ``mb_per_s`` per core on ``cores`` cores (perfect scaling)."""
    return total_bytes / (mb_per_s * 1e6 * cores)


def open_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """A fresh tokenizer from ``directory`` (our pickles, a tokenizer.json, or GPT-2's vocab.json + merges.txt, as
    :func:`~cs336_basics.tokenizer.tokenizer_files` picks); one clear error."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"--tokenizer-dir {directory}: folder not found (prepare_data.py --tokenizer-dir writes one)")
    for path in tokenizer_files(directory) or [directory / VOCAB_FILE]:
        if not path.is_file():
            raise UserError(f"--tokenizer-dir {directory}: {path.name} not found: pass a folder written by "
                            "`prepare_data.py --tokenizer-dir DIR` (or holding a tokenizer.json, or GPT-2's "
                            "vocab.json and merges.txt)")
    try:
        return load_tokenizer(directory)
    except UserError:
        raise
    except Exception as exc:  # unpickling garbage raises anything from EOFError to UnpicklingError
        raise UserError(f"--tokenizer-dir {directory}: cannot load the tokenizer ({type(exc).__name__}: "
                        f"{one_line(exc, 200)}): re-create it with prepare_data.py") from None


def read_text(path: str | os.PathLike, max_bytes: int) -> tuple[str, int, bool]:
    """The first ``max_bytes`` of a UTF-8 file, cut at a character boundary: (text, bytes used, truncated)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:  # read() allocates what it is asked for: never more than the file holds
            data = f.read(min(max_bytes, size) if path.is_file() and size else max_bytes)
    except FileNotFoundError:
        raise UserError(f"--text {path}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"--text {path} is a folder: pass a text file") from None
    except OSError as exc:
        raise UserError(f"--text {path}: cannot read it ({exc.strerror or exc})") from None
    truncated = size > len(data)
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:  # not final when cut: a character cut in half at the end stays in the decoder, left out
        text = decoder.decode(data, final=not truncated)
    except UnicodeDecodeError as exc:
        raise UserError(f"--text {path} is not UTF-8 text (invalid byte at offset {exc.start}): convert it, e.g. "
                        f"`iconv -f latin1 -t utf-8 {path} > {path}.utf8`") from None
    data = data[: len(data) - len(decoder.getstate()[0])]
    if not data:
        raise UserError(f"--text {path} is empty: pass a file with some text" if not size else
                        f"--text {path}: --max-mb {max_bytes / 1e6:g} reads less than one character: raise it")
    return text, len(data), truncated


def _pieces(text: str, bar: tqdm) -> Iterator[str]:
    for start in range(0, len(text), PIECE_CHARS):
        piece = text[start : start + PIECE_CHARS]
        yield piece
        bar.update(len(piece.encode("utf-8")))


def measure(tokenizer_dir: str | os.PathLike, text_path: str | os.PathLike, *, max_mb: float = DEFAULT_MAX_MB,
            cores: int | None = None, progress: bool = False) -> PairResult:
    """Encode the first ``max_mb`` MB of ``text_path`` with a freshly loaded tokenizer from ``tokenizer_dir``."""
    text, n_bytes, truncated = read_text(text_path, int(max_mb * 1e6))
    tokenizer = open_tokenizer(tokenizer_dir)
    cores = cores or available_cores()
    label = f"{Path(tokenizer_dir).name} on {Path(text_path).name}"
    with tqdm(total=n_bytes, unit="B", unit_scale=True, desc=label, disable=not progress, leave=False) as bar:
        t0 = time.perf_counter()
        tokens = sum(1 for _ in tokenizer.encode_iterable(_pieces(text, bar)))
        seconds = max(time.perf_counter() - t0, 1e-9)
    mb_per_s = n_bytes / seconds / 1e6
    return PairResult(str(tokenizer_dir), str(text_path), n_bytes, tokens, seconds, n_bytes / max(tokens, 1),
                      mb_per_s, pile_seconds(mb_per_s, cores), cores, truncated)


def report(results: Sequence[PairResult], max_mb: float) -> str:
    """The printed table and the assumptions behind it."""
    cores = results[0].cores if results else available_cores()
    rows = [[r.tokenizer, r.text + (" (cut)" if r.truncated else ""), f"{r.bytes / 1e6:.3g} MB", f"{r.tokens:,}",
             f"{r.bytes_per_token:.2f}", f"{r.mb_per_s:.2f}", fmt_duration(r.pile_seconds)] for r in results]
    table = format_table(["tokenizer", "text", "read", "tokens", "bytes/token", "MB/s", f"Pile on {cores} cores"],
                         rows, right=[False, False, True, True, True, True, True])
    notes = [f"MB/s: one process, freshly loaded tokenizer (cold cache), at most the first {max_mb:g} MB (1e6 bytes) of each text"
             + (" ((cut) = the file is longer)" if any(r.truncated for r in results) else "") + ".",
             f"Pile: 825 GB / (MB/s x {cores} cores), assuming prepare_data.py scales perfectly over this machine's cores."]
    return table + "\n\n" + "\n".join(notes)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cs336_basics.tokenizer_report",
                                     description="Bytes per token and encode throughput of tokenizers on texts.")
    parser.add_argument("--tokenizer-dir", action="append", required=True, metavar="DIR",
                        help="folder with vocab.pkl and merges.pkl (repeat for several tokenizers)")
    parser.add_argument("--text", action="append", required=True, metavar="FILE",
                        help="UTF-8 text file (repeat for several texts)")
    parser.add_argument("--max-mb", type=float, default=DEFAULT_MAX_MB,
                        help=f"read at most this many MB (1e6 bytes) of each text (default {DEFAULT_MAX_MB:g})")
    parser.add_argument("--cores", type=int, default=None,
                        help="cores for the Pile estimate (default: the cores this process may use)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run(args: argparse.Namespace) -> None:
    """Measure every tokenizer on every text and print the table."""
    if not 0 < args.max_mb < math.inf:
        raise UserError(f"--max-mb must be a number above 0, got {args.max_mb:g}")
    if args.cores is not None and args.cores < 1:
        raise UserError(f"--cores must be at least 1, got {args.cores}")
    for directory in args.tokenizer_dir:  # every input is checked before the first long encode
        open_tokenizer(directory)
    for path in args.text:
        read_text(path, int(args.max_mb * 1e6))
    results = [measure(d, t, max_mb=args.max_mb, cores=args.cores, progress=not args.no_progress)
               for d in args.tokenizer_dir for t in args.text]
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        print(report(results, args.max_mb))


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (see cs336_basics.common)."""
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
