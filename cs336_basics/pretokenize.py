"""Pre-tokenization shared by BPE training, encoding and file tokenization.

Text is first split on special tokens (no merge ever crosses one), then each piece is split into
pre-tokens with the GPT-2 pattern. Large files are cut into chunks whose boundaries sit on a
special-token occurrence, so chunks can be processed independently by worker processes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import BinaryIO

import regex

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_REGEX = regex.compile(GPT2_PATTERN)


def special_token_regex(special_tokens: Sequence[str]) -> regex.Pattern | None:
    """A regex matching any special token, longest first (so overlapping tokens match the longest)."""
    if not special_tokens:
        return None
    ordered = sorted(set(special_tokens), key=len, reverse=True)
    return regex.compile("|".join(regex.escape(tok) for tok in ordered))


def split_on_special(text: str, special_regex: regex.Pattern | None) -> Iterator[tuple[str, bool]]:
    """Yield (piece, is_special) in order; empty pieces are skipped."""
    if special_regex is None:
        if text:
            yield text, False
        return
    pos = 0
    for m in special_regex.finditer(text):
        if m.start() > pos:
            yield text[pos : m.start()], False
        yield m.group(), True
        pos = m.end()
    if pos < len(text):
        yield text[pos:], False


def find_chunk_boundaries(
    file: BinaryIO, desired_num_chunks: int, split_tokens: Sequence[bytes], *, probe_size: int = 1 << 16
) -> list[int]:
    """Byte offsets that cut ``file`` into about ``desired_num_chunks`` chunks.

    Each inner boundary is moved forward to the start of the next occurrence of one of
    ``split_tokens`` (or to the end of the file), reading only ``probe_size`` bytes at a time, so no
    chunk boundary falls inside a special token or splits text that BPE would treat as one piece.
    Returns sorted, unique offsets starting at 0 and ending at the file size.
    """
    file.seek(0, os.SEEK_END)
    file_size = file.tell()
    if file_size == 0 or desired_num_chunks <= 1 or not split_tokens:
        return [0, file_size]
    chunk_size = max(1, file_size // desired_num_chunks)
    boundaries = [i * chunk_size for i in range(desired_num_chunks)] + [file_size]
    overlap = max(len(t) for t in split_tokens) - 1
    for i in range(1, len(boundaries) - 1):
        pos = boundaries[i]
        while True:
            file.seek(pos)
            block = file.read(probe_size + overlap)
            if not block:
                boundaries[i] = file_size
                break
            hits = [j for j in (block.find(t) for t in split_tokens) if j != -1]
            if hits:
                boundaries[i] = pos + min(hits)
                break
            if len(block) <= overlap:
                boundaries[i] = file_size
                break
            pos += len(block) - overlap
    return sorted(set(boundaries))
