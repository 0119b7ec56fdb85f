"""Pre-tokenization shared by BPE training, encoding and file tokenization, and where text may be cut.

Text is first split on special tokens (no merge ever crosses one), then each piece is split into
pre-tokens with the GPT-2 pattern. :func:`pretokenize` gives exactly ``GPT2_REGEX.findall`` at about
twice its speed. Large files are cut at *safe* offsets (:func:`find_safe_boundaries`, the rule and its
proof below), so chunks can be pre-tokenized or encoded independently, by worker processes.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator, Sequence
from typing import BinaryIO

import regex

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_REGEX = regex.compile(GPT2_PATTERN)

# Below this many bytes a file is pre-tokenized (BPE training) or encoded (tokenize_file) in one process.
# Starting a pool is quick (about 30 ms for 2 workers), but cutting the file, shipping tasks and results,
# and workers with cold caches made a pool of 2 no faster than one process up to about 4 MB on the 2-core
# development machine under load from other jobs (tokenize_file: 0.45 s vs 0.54 s at 2 MB, 0.83 s vs
# 0.84 s at 4 MB); on idle cores the crossover is likely lower.
POOL_MIN_BYTES = 4 << 20


def ignore_sigint() -> None:
    """Pool initializer: Ctrl-C reaches the whole process group; only the parent handles it (it stops
    the pool and removes temporary output) instead of every worker printing a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ---------------------------------------------------------------------------------- pre-tokens


def _class(prop: str) -> str:
    """The Basic Multilingual Plane characters of a ``regex`` class as a stdlib ``re`` class body."""
    ranges = []
    for m in regex.finditer(prop + "+", _BMP):
        first, last = re.escape(m.group()[0]), re.escape(m.group()[-1])
        ranges.append(first if m.end() - m.start() == 1 else f"{first}-{last}")
    return "".join(ranges)


# The GPT-2 pattern for the stdlib ``re`` engine, exact on text without characters above U+FFFF: its
# classes are ``regex``'s own \p{L}, \p{N} and \s (so the same Unicode version), listed as ranges. ``re``
# checks a BMP class with one table lookup, but would try hundreds of ranges one by one for classes
# holding characters above U+FFFF (emoji, rare CJK); those characters match nothing here, and text
# around them goes to GPT2_REGEX instead (see :func:`pretokenize`). The alternatives are reordered,
# bare runs first (about 8 % faster), without changing any match: at a given position only the
# alternatives for its character class can match, the contractions still come before other
# punctuation, and the whitespace ones still come after " word" and the like.
_BMP = "".join(map(chr, range(0x10000)))
_L, _N, _S = _class(r"\p{L}"), _class(r"\p{N}"), _class(r"\s")
_O = rf"[^{_S}{_L}{_N}\U00010000-\U0010ffff]"  # neither whitespace, letter nor number
_FAST_BMP = re.compile(
    rf"""[{_L}]+| [{_L}]+|[{_N}]+| [{_N}]+|'(?:[sdmt]|ll|ve|re)|{_O}+| {_O}+|[{_S}]+(?![^{_S}])|[{_S}]+"""
)
del _BMP
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")
_SPACE_THEN_NON_SPACE = re.compile(rf" (?=[^{_S}])")
NON_SPACE_AT = re.compile(rf"[^{_S}]").match  # a character that is not whitespace to the GPT-2 pattern


def pretokenize(text: str, pos: int = 0, endpos: int | None = None) -> list[str]:
    """``GPT2_REGEX.findall(text, pos, endpos)``, faster: the stdlib ``re`` engine for the stretches of text
    without characters above U+FFFF, the ``regex`` pattern for the rest (cut where a space starts a pre-token)."""
    end = len(text) if endpos is None else min(endpos, len(text))
    astral = _ASTRAL.search(text, pos, end)
    if astral is None:  # the common case
        return _FAST_BMP.findall(text, pos, end)
    out: list[str] = []
    while astral is not None:
        # From the last pre-token start before the character to the first one after it: the regex module.
        cut = last_space_cut(text, pos, astral.start())
        after = _SPACE_THEN_NON_SPACE.search(text, astral.end(), end)
        stop = after.start() if after else end
        out += _FAST_BMP.findall(text, pos, cut)
        out += GPT2_REGEX.findall(text, cut, stop)
        pos = stop
        astral = _ASTRAL.search(text, pos, end)
    out += _FAST_BMP.findall(text, pos, end)
    return out


def last_space_cut(text: str, lo: int, hi: int) -> int:
    """The last i in (lo, hi) where a space is followed by a non-space character, else ``lo``.

    A pre-token starts at such a space, and the text before it pre-tokenizes the same alone: the space
    starts a new match, and no match or look-ahead before it reaches past it. So text may be cut there.
    """
    i = hi
    while (i := text.rfind(" ", lo, i)) > lo:
        if _SPACE_THEN_NON_SPACE.match(text, i):
            return i
    return lo


# -------------------------------------------------------------------------------- special tokens


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


# ------------------------------------------------------------------------------------ safe cuts
#
# The rule. A byte offset c of UTF-8 text is a *safe cut* when
#   (a) c is the start of a special-token occurrence, or
#   (b) the byte at c is a line break (\n or \r) and the byte before it is printable, non-space ASCII
#       (! to ~),
# and in both cases no occurrence of any special token starts before c and ends after it.
# Splitting the text at a safe cut and pre-tokenizing the two halves separately (special-token split,
# then the GPT-2 pattern on each piece) gives exactly the pieces and pre-tokens of the whole text, so
# BPE counts and encoded ids are unchanged.
#
# Proof. Special tokens: the split matches occurrences left to right; none straddles c, so every
# occurrence before c lies wholly in the left half and is matched there alike, and the whole text's scan
# reaches c at a piece boundary (a), or inside a piece of ordinary text (b), in which case the right
# half is scanned alike from c. Pre-tokens, for (b): the piece is cut between x (the non-space byte
# before c) and a line break. A GPT-2 pre-token holds whitespace only as all-whitespace runs or as
# one *leading* space, so no pre-token contains x followed by the line break: the match containing x
# ends at c in the whole text and in the left half alike (greedy runs stop at the line break or at the
# end; the contraction alternatives need letters after the apostrophe, and the only look-ahead,
# ``\s+(?!\S)``, never reaches c because x is not whitespace). The pattern has no look-behind, so the
# right half is matched from c exactly as the whole text is. A cut *after* a line break is not safe:
# ``"a \nb"`` gives ``" "``, ``"\n"``, but its prefix ``"a \n"`` gives ``" \n"``.
# Both cut kinds fall on UTF-8 character boundaries (a token's first byte; an ASCII byte).


_BEFORE_LINE_BREAK = re.compile(rb"[\x21-\x7e](?=[\n\r])")  # cut (b): at the end of such a match


class SafeCuts:
    """Finds safe cuts (the rule above) in bytes, for one set of special tokens."""

    def __init__(self, special_tokens: Sequence[str] = ()) -> None:
        self.specials = sorted({t.encode("utf-8") for t in special_tokens}, key=len)
        self.reach = max((len(s) for s in self.specials), default=1) - 1  # bytes a straddle check looks ahead
        longest_first = sorted(self.specials, key=len, reverse=True)
        self._special = re.compile(b"|".join(map(re.escape, longest_first))) if self.specials else None

    def _straddled(self, data: bytes, cut: int) -> bool:
        """Whether a special-token occurrence starts before ``cut`` and ends after it."""
        return any(data.find(s, max(0, cut - len(s) + 1), cut + len(s) - 1) != -1 for s in self.specials)

    def cuts(self, data: bytes, start: int = 0, end: int | None = None) -> list[int]:
        """Safe cuts c with start <= c < end in ``data``, judged from ``data`` alone.

        Only offsets that ``data`` decides are returned: ``data`` must hold ``reach`` bytes after ``end``
        unless it ends where the text does, and the text before ``data[0]`` is taken not to matter
        (true when ``data`` itself starts at a safe cut, or ``start`` is ``reach`` bytes in).
        """
        end = len(data) if end is None else end
        found = [m.end() for m in _BEFORE_LINE_BREAK.finditer(data, max(0, start - 1), end)]
        if self._special is not None:
            for m in self._special.finditer(data, start):  # no endpos: a special token may run past end
                if m.start() >= end:
                    break
                found.append(m.start())
        return sorted({c for c in found if start <= c < end and not self._straddled(data, c)})

    def last(self, data: bytes, final: bool = False) -> int:
        """The last safe cut in ``data`` after offset 0 that later bytes cannot change (``final``: none
        follow), or 0 when there is none; ``data`` must start at a safe cut. Scans backwards in windows."""
        end = len(data) if final else len(data) - self.reach
        window = 1 << 14
        while end > 0:
            found = self.cuts(data, max(1, end - window), end)
            if found:
                return found[-1]
            end -= window
            window *= 2
        return 0

    def next_in_file(self, f: BinaryIO, pos: int, file_size: int, probe: int = 1 << 16) -> int:
        """The first safe cut at or after ``pos`` in file ``f`` (``file_size`` when there is none)."""
        while pos < file_size:
            lo = max(0, pos - self.reach - 1)
            f.seek(lo)
            block = f.read(pos - lo + probe + self.reach)
            ends_file = lo + len(block) >= file_size
            found = self.cuts(block, pos - lo, len(block) if ends_file else len(block) - self.reach)
            if found:
                return lo + found[0]
            pos += probe
        return file_size


def find_safe_boundaries(f: BinaryIO, chunk_bytes: int, special_tokens: Sequence[str] = ()) -> list[int]:
    """Byte offsets (from 0 to the file size) cutting ``f`` into chunks of about ``chunk_bytes`` at safe cuts.

    Pre-tokenizing or encoding each chunk separately gives exactly the result for the whole file. A
    stretch without a safe cut stays one larger chunk.
    """
    f.seek(0, os.SEEK_END)
    file_size = f.tell()
    cutter = SafeCuts(special_tokens)
    bounds = [0]
    while bounds[-1] < file_size:
        target = bounds[-1] + max(1, chunk_bytes)
        if target >= file_size:
            bounds.append(file_size)
            break
        bounds.append(cutter.next_in_file(f, target, file_size))
    return bounds
