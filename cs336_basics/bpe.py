"""Byte-level BPE training (GPT-2 style), exact and fast.

The algorithm, in one page:

1. Pre-tokenize. Split the text on special tokens (they never take part in a merge), split each
   remaining piece into GPT-2 pre-tokens ("words") and count every distinct word.
2. Start from the 256 single bytes; each distinct word is a sequence of byte tokens with a count.
3. Until the vocabulary is full: take the most frequent adjacent pair of tokens over all words
   (weighted by word count; ties go to the lexicographically greater ``(bytes, bytes)`` pair),
   record it as a merge, and replace it by the new token in every word that contains it.

Step 1 runs in worker processes over byte ranges of the file (each worker streams its own range).
Step 3 never re-scans the corpus: pair counts are updated only around the places where a merge
happened, and a heap gives the best pair. See :func:`learn_merges`.

Output ids: the special tokens first (in the given order), then the 256 single bytes in GPT-2's
byte-to-unicode order (the order of GPT-2's and the CS336 reference ``vocab.json``), then one id
per merge in merge order.

Input must be UTF-8: invalid bytes raise ``ValueError`` naming the byte offset.
"""

from __future__ import annotations

import heapq
import math
import multiprocessing
import operator
import os
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cs336_basics.gpt2 import bytes_to_unicode
from cs336_basics.pretokenize import (
    POOL_MIN_BYTES,
    SafeCuts,
    find_safe_boundaries,
    ignore_sigint,
    pretokenize,
    special_token_regex,
    split_on_special,
)

READ_SIZE = 1 << 20  # a worker reads its byte range in pieces of about this size
TASK_SIZE = 16 << 20  # the file is cut into tasks of at most about this size (bounds worker memory)


# ---------------------------------------------------------------------------------------------
# Public API


def train_bpe(
    input_path: str | os.PathLike,
    vocab_size: int,
    special_tokens: Sequence[str],
    *,
    num_workers: int | None = None,
    progress: bool = False,
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Train a byte-level BPE tokenizer on a UTF-8 text file.

    Returns ``(vocab, merges)``: ``vocab`` maps id -> token bytes (specials, then the 256 bytes, then
    one token per merge) and ``merges`` lists the merged ``(bytes, bytes)`` pairs in order.
    ``vocab_size`` counts every entry. If the corpus runs out of pairs first, a warning says how many
    merges were learned and the smaller result is returned.
    """
    specials = list(dict.fromkeys(special_tokens))
    if any(not isinstance(t, str) or not t for t in specials):
        raise ValueError(f"special tokens must be non-empty strings, got {specials!r}")
    minimum = 256 + len(specials)
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: the minimum is {minimum} "
            f"(256 byte tokens + {len(specials)} special tokens)"
        )
    word_counts = count_pretokens(input_path, specials, num_workers=num_workers, progress=progress)
    num_merges = vocab_size - minimum
    merges = learn_merges({w.encode("utf-8"): n for w, n in word_counts.items()}, num_merges, progress=progress)
    if len(merges) < num_merges:
        warnings.warn(
            f"{input_path}: the corpus ran out of pairs to merge after {len(merges)} of {num_merges} merges; "
            f"the vocabulary has {minimum + len(merges)} tokens instead of {vocab_size}",
            stacklevel=2,
        )
    return build_vocab(specials, merges), merges


def build_vocab(special_tokens: Sequence[str], merges: Sequence[tuple[bytes, bytes]]) -> dict[int, bytes]:
    """The id -> bytes vocabulary for ``merges``: specials, then bytes in GPT-2 order, then merges."""
    tokens = [s.encode("utf-8") for s in special_tokens]
    tokens += [bytes([b]) for b in bytes_to_unicode()]
    tokens += [a + b for a, b in merges]
    return dict(enumerate(tokens))


def count_pretokens(
    input_path: str | os.PathLike,
    special_tokens: Sequence[str],
    *,
    num_workers: int | None = None,
    progress: bool = False,
) -> Counter[str]:
    """Count the GPT-2 pre-tokens of a UTF-8 file, special tokens excluded.

    Large files are cut into byte ranges at safe cuts (:func:`~cs336_basics.pretokenize.find_safe_boundaries`)
    and counted in parallel processes, each streaming its own range; small files (or a single range) are
    counted here.
    """
    path = Path(input_path)
    size = path.stat().st_size  # FileNotFoundError names the path
    workers = num_workers if num_workers is not None else (os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"num_workers={num_workers} must be at least 1")
    bounds = [0, size]
    if workers > 1 and size >= POOL_MIN_BYTES:
        # A few tasks per worker balance the load when one worker is slowed down.
        num_tasks = max(4 * workers, math.ceil(size / TASK_SIZE))
        with open(path, "rb") as f:
            bounds = find_safe_boundaries(f, math.ceil(size / num_tasks), special_tokens)
    ranges = list(zip(bounds[:-1], bounds[1:]))

    with tqdm(total=size, unit="B", unit_scale=True, desc="pre-tokenize", disable=not progress) as bar:
        if len(ranges) == 1:
            return _count_range(str(path), 0, size, tuple(special_tokens), bar.update)
        total: Counter[str] = Counter()
        tasks = [(str(path), start, end, tuple(special_tokens)) for start, end in ranges]
        with multiprocessing.get_context().Pool(min(workers, len(tasks)), ignore_sigint) as pool:
            for counts, nbytes in pool.imap_unordered(_count_task, tasks):
                total.update(counts)
                bar.update(nbytes)
        return total


def learn_merges(
    word_counts: Mapping[bytes, int], num_merges: int, *, progress: bool = False
) -> list[tuple[bytes, bytes]]:
    """Learn up to ``num_merges`` BPE merges from ``{word bytes: count}`` (fewer if pairs run out).

    Tokens are identified by their bytes: a merge whose result already exists reuses that id, so
    the words always equal what a bytes-based trainer would hold. Ids 0-255 are the bytes. The
    best pair comes from a heap of ``(-count, key(a), key(b), pair)``, where ``key`` reverses byte
    order (see :func:`_descending_key`): the min-heap pops the highest count and, among equal
    counts, the greatest ``(bytes_a, bytes_b)``. Heap counts go stale: every live pair keeps an
    entry whose count is >= its true count, a popped overestimate is pushed back with its true
    count, and only pairs whose count grew get a new entry. Words and pair counts live in a
    :class:`_PairIndex`, which applies each merge where it occurs, without re-scanning.
    """
    tokens: list[bytes] = [bytes([i]) for i in range(256)]
    token_id = {t: i for i, t in enumerate(tokens)}
    keys = [_descending_key(t) for t in tokens]
    state = _PairIndex(word_counts)
    heap = [(-n, keys[k >> _SHIFT], keys[k & _LOW], k) for k, n in state.pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[bytes, bytes]] = []
    bar = tqdm(total=num_merges, desc="merges", disable=not progress)
    while len(merges) < num_merges:
        best = _pop_best(heap, state.pair_counts)
        if best is None:
            break  # no pair left anywhere
        a, b = best >> _SHIFT, best & _LOW
        merged = tokens[a] + tokens[b]
        merges.append((tokens[a], tokens[b]))
        c = token_id.get(merged)
        fresh = c is None
        if fresh:
            c = len(tokens)
            tokens.append(merged)
            token_id[merged] = c
            keys.append(_descending_key(merged))
        for k, n in zip(*state.merge(a, b, c, fresh)):
            heapq.heappush(heap, (-n, keys[k >> _SHIFT], keys[k & _LOW], k))
        bar.update(1)
    bar.close()
    return merges


# ---------------------------------------------------------------------------------------------
# Merge loop internals

_SHIFT = 32  # a pair (a, b) is the integer a << 32 | b
_LOW = (1 << _SHIFT) - 1


class _PairIndex:
    """All distinct words, their adjacent-pair counts, and where each pair occurs.

    The words are laid end to end as one doubly linked list over positions (numpy arrays):
    ``tok[p]`` is the token at p (-1 once merged into its left neighbour), ``nxt``/``prv`` link the
    live positions of one word (-1 at word ends) and ``weight[p]`` is the count of p's word.
    ``pair_counts`` maps a pair to its weighted count (0 or missing: gone). Where a pair may occur
    (a superset, checked on use): ``where_init`` for the pairs of the initial bytes, and for pairs
    made by a merge, which all hold the new token c, the logs ``right_of[c]`` (pairs (c, t), sorted
    by t) and ``left_of[c]`` (pairs (t, c)). A merge touches only its own occurrences and their
    neighbours, vectorized, so its cost does not grow with word length (CJK text makes long words).
    """

    def __init__(self, word_counts: Mapping[bytes, int]):
        words = [w for w in word_counts if len(w) > 1]  # a single byte has no pair
        lengths = np.array(list(map(len, words)), dtype=np.int64)
        self.tok = np.frombuffer(b"".join(words), dtype=np.uint8).astype(np.int64)
        self.weight = np.repeat(np.array(list(map(word_counts.__getitem__, words)), dtype=np.int64), lengths)
        size = len(self.tok)
        ends = np.cumsum(lengths) - 1
        self.nxt = np.arange(1, size + 1, dtype=np.int64)
        self.nxt[ends] = -1
        self.prv = np.arange(-1, size - 1, dtype=np.int64)
        self.prv[ends[:-1] + 1] = -1

        uniq, totals, lefts, starts = self._pairs_at(np.flatnonzero(self.nxt >= 0), stable=True)
        self.pair_counts: dict[int, int] = dict(zip(uniq, totals))
        bounds = starts.tolist() + [len(lefts)]
        self.where_init = {k: lefts[bounds[i] : bounds[i + 1]] for i, k in enumerate(uniq)}
        self.right_of: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        self.left_of: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}

    def merge(self, a: int, b: int, c: int, fresh: bool) -> tuple[list[int], list[int]]:
        """Replace every occurrence of (a, b) by c, left to right within each word.

        At a site x p q r (p holds a, q holds b) the pairs at x and q go away and, once p holds c
        and links to r, the pairs at x and p appear; touching sites (``a b a b``) share a pair,
        which is counted once. ``fresh``: c is a new token (so its pairs are new). Returns the
        pairs whose count went up, with their new counts.
        """
        tok, nxt, prv = self.tok, self.nxt, self.prv
        p = self._candidates(a, b)
        p = p[tok[p] == a]
        q = nxt[p]
        ok = q >= 0
        p, q = p[ok], q[ok]
        ok = tok[q] == b
        p, q = p[ok], q[ok]
        if a == b:  # overlapping occurrences: keep the leftmost of each run, as a scan would
            p, q = self._leftmost(p, q)
        x = prv[p]
        r = nxt[q]
        has_r = r >= 0
        # Sites touch when one's r is the next one's p (p is sorted); that shared pair counts once.
        untouched_r = has_r.copy()
        untouched_r[:-1] &= r[:-1] != p[1:]

        gone_keys, gone_totals, _, _ = self._pairs_at(np.concatenate((x[x >= 0], q[untouched_r])))
        counts = self.pair_counts
        counts.update(zip(gone_keys, map(operator.sub, map(counts.__getitem__, gone_keys), gone_totals)))

        tok[p] = c
        tok[q] = -1
        nxt[p] = r
        prv[r[has_r]] = p[has_r]
        x = prv[p]  # now a touching site's p
        new = np.concatenate((x[x >= 0], p[untouched_r]))
        new_keys, new_totals, _, _ = self._pairs_at(new)
        if not fresh:  # c existed before: its pairs may already have counts
            new_totals = [counts.get(k, 0) + n for k, n in zip(new_keys, new_totals)]
        counts.update(zip(new_keys, new_totals))
        counts[(a << _SHIFT) | b] = 0
        self._log(new, c)
        return new_keys, new_totals

    def _pairs_at(
        self, lefts: np.ndarray, stable: bool = False
    ) -> tuple[list[int], list[int], np.ndarray, np.ndarray]:
        """The distinct pairs whose left positions are ``lefts``, their summed weights, and
        ``lefts`` grouped by pair, with group starts (``stable``: sorted positions in a group)."""
        pair_keys = (self.tok[lefts] << _SHIFT) | self.tok[self.nxt[lefts]]
        order = pair_keys.argsort(kind="stable" if stable else None)
        pair_keys, lefts = pair_keys[order], lefts[order]
        starts = _run_starts(pair_keys)
        if not len(starts):
            return [], [], lefts, starts
        totals = np.add.reduceat(self.weight[lefts], starts)
        return pair_keys[starts].tolist(), totals.tolist(), lefts, starts

    def _log(self, lefts: np.ndarray, c: int) -> None:
        """Record the new pairs at ``lefts`` (each holds c on one side) for :meth:`_candidates`."""
        left, right = self.tok[lefts], self.tok[self.nxt[lefts]]
        for log, mine, other in ((self.right_of, left, right), (self.left_of, right, left)):
            at = mine == c
            if at.any():
                other_at, lefts_at = other[at], lefts[at]
                order = other_at.argsort()
                log.setdefault(c, []).append((other_at[order], lefts_at[order]))

    def _candidates(self, a: int, b: int) -> np.ndarray:
        """Positions where (a, b) may start: a sorted superset of its occurrences."""
        parts = []
        init = self.where_init.pop((a << _SHIFT) | b, None)
        if init is not None:
            parts.append(init)
        for log, mine, other in ((self.right_of, a, b), (self.left_of, b, a)):
            for others, lefts in log.get(mine, ()):
                lo, hi = others.searchsorted((other, other + 1)).tolist()
                if hi > lo:
                    parts.append(lefts[lo:hi])
        if len(parts) == 1 and init is not None:
            return init
        return _unique(np.concatenate(parts)) if parts else np.empty(0, np.int64)

    @staticmethod
    def _leftmost(p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keep = []
        last_q = -1
        for i, (pi, qi) in enumerate(zip(p.tolist(), q.tolist())):
            if pi != last_q:  # not the right half of the site just kept
                keep.append(i)
                last_q = qi
        return p[keep], q[keep]


def _run_starts(sorted_values: np.ndarray) -> np.ndarray:
    """Indices where a new run of equal values starts in a sorted array."""
    if not len(sorted_values):
        return np.empty(0, np.int64)
    return np.concatenate(([True], sorted_values[1:] != sorted_values[:-1])).nonzero()[0]


def _unique(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values; sorts ``values`` in place (``np.unique`` is slower on small arrays)."""
    values.sort()
    return values[_run_starts(values)]


def _descending_key(token: bytes) -> bytes:
    """A key whose ascending order is the descending order of ``token``.

    Each byte x becomes the two bytes (0, 255 - x) and a terminator 0x01 is appended, which sorts
    above any (0, ...) pair, so a proper prefix (smaller as bytes) gets the larger key.
    """
    out = bytearray()
    for x in token:
        out += bytes((0, 255 - x))
    out.append(1)
    return bytes(out)


def _pop_best(heap: list, pair_counts: dict[int, int]) -> int | None:
    """Pop the pair with the highest true count (ties: greatest bytes), or None when none is left."""
    while heap:
        neg, ka, kb, k = heapq.heappop(heap)
        true = pair_counts.get(k, 0)
        if true == -neg:
            return k
        if true > -neg:
            continue  # an older, smaller entry: a newer entry with the true count exists
        if true > 0:
            heapq.heappush(heap, (-true, ka, kb, k))  # overestimate: requeue with the true count
    return None


# ---------------------------------------------------------------------------------------------
# Pre-tokenization internals


def _count_task(task: tuple[str, int, int, tuple[str, ...]]) -> tuple[Counter[str], int]:
    """Worker entry point: count one byte range; returns the counts and the range length."""
    path, start, end, specials = task
    return _count_range(path, start, end, specials), end - start


def _count_range(
    path: str, start: int, end: int, special_tokens: Sequence[str], on_bytes: Callable[[int], object] | None = None
) -> Counter[str]:
    """Count pre-tokens in ``path[start:end]``, reading it in pieces cut at safe cuts.

    ``start`` and ``end`` must be safe cuts (see :mod:`cs336_basics.pretokenize`). Without a safe cut the
    pieces grow until the range end.
    """
    special_rx = special_token_regex(special_tokens)
    cutter = SafeCuts(special_tokens)
    counts: Counter[str] = Counter()
    with open(path, "rb") as f:
        f.seek(start)
        pending = b""  # bytes read but not yet counted; they start at file offset ``offset``
        offset = pos = start
        while pos < end:
            block = f.read(min(READ_SIZE, end - pos))
            if not block:
                break
            pos += len(block)
            pending += block
            cut = len(pending) if pos >= end else cutter.last(pending)
            if cut:
                _count_text(_decode(pending[:cut], path, offset), special_rx, counts)
                if on_bytes is not None:
                    on_bytes(cut)
                pending = pending[cut:]
                offset += cut
    if pending:  # the file ended early (it shrank while we read it)
        _count_text(_decode(pending, path, offset), special_rx, counts)
    return counts


def _decode(data: bytes, path: str, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path}: invalid UTF-8 at byte offset {offset + e.start}; BPE training needs UTF-8 text "
            f"(convert the file, e.g. with iconv -f latin1 -t utf-8)"
        ) from None


def _count_text(text: str, special_rx, counts: Counter[str]) -> None:
    """Add the pre-tokens of ``text`` (specials split off and skipped) to ``counts``."""
    for piece, is_special in split_on_special(text, special_rx):
        if not is_special:
            counts.update(pretokenize(piece))
