"""Byte-level BPE tokenizer: encode text to token ids and decode ids back to text.

Encoding splits text on special tokens (never split, longest match first), cuts each remaining
piece into pre-tokens with the GPT-2 pattern, and merges the UTF-8 bytes of each pre-token by
repeatedly merging the adjacent pair with the lowest merge rank (GPT-2's ``bpe``). For merges made
by BPE training this gives exactly the same ids as applying the merges one by one in merge order,
and the same ids as tiktoken built from the same files.

Speed, in pure Python: text is encoded a block at a time. A block is pre-tokenized at once
(:func:`~cs336_basics.pretokenize.pretokenize`, the stdlib ``re`` engine where it is exact), each
pre-token's ids come from a bounded cache, and the pre-tokens not in it are merged together, side by
side in numpy arrays (:class:`_BatchMerger`); a few are merged one by one (``_bpe``, the reference).
Blocks are cut only where appended text cannot change the result, so memory stays small and
``encode_iterable`` streams files of any size with the same ids as ``encode``.
"""

from __future__ import annotations

import heapq
import json
import os
import pickle
from bisect import bisect_right
from collections.abc import Generator, Iterable, Iterator
from itertools import accumulate, chain, repeat
from operator import sub
from pathlib import Path

import numpy as np

from cs336_basics.common import UserError, one_line
from cs336_basics.fileio import atomic_output
from cs336_basics.gpt2 import load_gpt2_merges, load_gpt2_vocab
from cs336_basics.pretokenize import NON_SPACE_AT, last_space_cut, pretokenize, special_token_regex

VOCAB_FILE = "vocab.pkl"
MERGES_FILE = "merges.pkl"
SPECIAL_TOKENS_FILE = "special_tokens.json"
# A tokenizer trained elsewhere, read when a folder has neither of our pickles (see tokenizer_files).
HF_TOKENIZER_FILE = "tokenizer.json"
GPT2_VOCAB_FILE = "vocab.json"
GPT2_MERGES_FILE = "merges.txt"

# Characters of ordinary text encoded at a time: bounds the lists held in memory; larger blocks give
# the batch merger more pre-tokens at once (see docs/benchmarks/tokenizer.md for the sizes tried).
BLOCK_CHARS = 1 << 18
# encode_iterable gathers at least this many characters before encoding, so a line-by-line source
# is encoded in efficient blocks.
STREAM_CHARS = 1 << 16
# Pre-tokens longer than this (in bytes) are neither cached nor merged with the simple quadratic loop.
LONG_PRETOKEN = 256
# New pre-tokens are merged in numpy batches of similar length, at most BATCH_WIDTHS[-1] bytes, when at
# least BATCH_MIN of them come together (below that, the loop in _bpe is faster).
BATCH_WIDTHS = (16, 32, 64)
BATCH_MIN = 64
# Encoding by space units (Tokenizer._encode_units) pays off while at most this fraction of the units
# misses the unit cache (measured: 2-5 % on prose once warm, 15-30 % on source code); above it, the rest
# of the block is encoded by pre-tokens. The miss rate is measured on pieces of UNIT_SAMPLE characters.
UNIT_MISS_MAX = 0.08
UNIT_SAMPLE = 1 << 13
# A contraction like "'ll" decides a pre-token from up to this many characters.
_LOOKAHEAD = 3
# Inside the encoder, ids travel as bytes of native uint32 (cache values, encoded blocks): bytes are
# compact, are joined at C speed, and are not tracked by the garbage collector (millions of tuples were).
_ID = np.dtype(np.uint32)


def _pack(ids: list[int]) -> bytes:
    return np.array(ids, _ID).tobytes()


class _Cache:
    """Bounded str -> packed ids cache with two generations: when the current one is full it replaces the
    old one, so entries used since the last rotation survive and the rest are dropped."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.current: dict[str, bytes] = {}
        self.old: dict[str, bytes] = {}

    def recall_one(self, key: str) -> bytes | None:
        """The ids of ``key`` from the old generation (moved to the current one), or None."""
        ids = self.old.get(key)
        if ids is not None:
            self.put({key: ids})
        return ids

    def recall(self, keys: dict[str, None]) -> dict[str, bytes]:
        """The ids of those ``keys`` that are in the old generation (moved to the current one)."""
        found = {k: self.old[k] for k in keys.keys() & self.old.keys()}
        self.put(found)
        return found

    def put(self, items: dict[str, bytes]) -> None:
        if len(self.current) + len(items) > self.size:
            self.old = self.current
            self.current = {}
        self.current.update(items)


class _BatchMerger:
    """GPT-2's merge loop (``Tokenizer._bpe``) for many pre-tokens at once, side by side in numpy arrays.

    Each pre-token is a row of a (words x width) table: its tokens by column, the rank of the pair that
    starts at each column (``none`` where there is none), and links to the next and previous live
    column. Every round merges, in every row that still has a pair to merge, its leftmost lowest-ranked
    pair, exactly as one step of ``_bpe``; a merged-away column is marked dead. Pair ranks come from a
    hash table of pair keys (``left << 32 | right``), and for the first round from a 256 x 256 table.
    """

    HASH_BITS = 18  # 262,144 slots: GPT-2's 50,000 merges fill a fifth of them

    def __init__(self, ranks: dict[tuple[int, int], int], merge_ids: list[int], byte_ids: list[int]) -> None:
        self.none = len(merge_ids)
        self.merge_ids = np.array(merge_ids, dtype=np.int64)
        self.byte_ids = np.array(byte_ids, dtype=np.int64)
        # Open hashing in numpy: each key goes to slot hash(key) unless an earlier key took it; those few
        # go to a sorted overflow array, searched only for queries whose slot is marked as overflowed.
        bits = max(self.HASH_BITS, int(len(ranks)).bit_length() + 2)
        self.shift = np.uint64(64 - bits)
        pairs = np.array(list(ranks), dtype=np.int64).reshape(-1, 2)
        keys = pairs[:, 0] << 32 | pairs[:, 1]
        values = np.fromiter(ranks.values(), np.int64, len(ranks))
        slots = self._slot(keys)
        _, first = np.unique(slots, return_index=True)
        self.slot_keys = np.full(1 << bits, -1, np.int64)
        self.slot_keys[slots[first]] = keys[first]
        self.slot_ranks = np.full(1 << bits, self.none, np.int64)
        self.slot_ranks[slots[first]] = values[first]
        rest = np.ones(len(keys), bool)
        rest[first] = False
        self.overflowed = np.zeros(1 << bits, bool)
        self.overflowed[slots[rest]] = True
        order = keys[rest].argsort()
        self.overflow_keys = np.append(keys[rest][order], np.iinfo(np.int64).max)  # sentinel: any index valid
        self.overflow_ranks = np.append(values[rest][order], self.none)
        self.byte_pair_ranks = self.rank(np.repeat(self.byte_ids, 256), np.tile(self.byte_ids, 256))

    def _slot(self, keys: np.ndarray) -> np.ndarray:
        return ((keys.view(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> self.shift).astype(np.intp)

    def rank(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        """Merge rank of each pair (left[i], right[i]), or ``none``."""
        key = left << 32 | right
        slot = self._slot(key)
        out = np.where(self.slot_keys[slot] == key, self.slot_ranks[slot], self.none)
        look = np.flatnonzero(self.overflowed[slot] & (out == self.none))
        if len(look):
            i = self.overflow_keys.searchsorted(key[look])
            out[look] = np.where(self.overflow_keys[i] == key[look], self.overflow_ranks[i], self.none)
        return out

    def __call__(self, words: list[bytes], width: int) -> list[bytes]:
        """The packed ids of each word (UTF-8 bytes of a pre-token, at most ``width`` of them)."""
        n, none = len(words), self.none
        lengths = np.fromiter(map(len, words), np.intp, n)
        raw = np.frombuffer(b"".join([w.ljust(width, b"\0") for w in words]), np.uint8).astype(np.int64)
        col = np.arange(width)
        beyond = col >= lengths[:, None] - 1  # a word's last byte and the padding: no pair starts there
        # Flat positions (row * width + column): the token at each, the rank of the pair starting there,
        # and the next / previous live position in the same row (-1: none).
        tok = self.byte_ids[raw]
        rank = np.empty(n * width, np.int64)
        rank[:-1] = self.byte_pair_ranks[raw[:-1] << 8 | raw[1:]]
        rank[beyond.ravel()] = none
        nxt = np.arange(1, n * width + 1)
        nxt[beyond.ravel()] = -1
        prv = np.arange(-1, n * width - 1)
        prv[::width] = -1
        alive = (col < lengths[:, None]).ravel()
        rows = np.arange(n)
        while True:
            table = rank.reshape(n, width)
            if len(rows) < n:
                table = table[rows]
            at = rows * width + table.argmin(axis=1)  # each row's leftmost lowest-ranked pair
            best = rank[at]
            merging = best < none
            if not merging.all():
                rows, at, best = rows[merging], at[merging], best[merging]
                if not len(rows):
                    break
            right = nxt[at]  # the pair's left token becomes the merged token, its right token dies
            after = nxt[right]
            new = self.merge_ids[best]
            tok[at] = new
            alive[right] = False
            rank[right] = none
            nxt[at] = after
            has_after = after >= 0
            after = after[has_after]
            prv[after] = at[has_after]
            before = prv[at]
            has_before = before >= 0
            before = before[has_before]
            # The two pairs that now hold the merged token: (new, token after) and (token before, new).
            ranks = self.rank(np.concatenate((new[has_after], tok[before])), np.concatenate((tok[after], new[has_before])))
            rank[at] = none
            rank[at[has_after]] = ranks[: len(after)]
            rank[before] = ranks[len(after) :]
        packed = tok[alive].astype(_ID).tobytes()
        ends = (np.cumsum(alive.reshape(n, width).sum(axis=1)) * _ID.itemsize).tolist()
        return list(map(packed.__getitem__, map(slice, [0, *ends[:-1]], ends)))


class Tokenizer:
    """Encode/decode with a byte-level BPE vocabulary and merge list.

    ``vocab`` maps id -> token bytes and must contain all 256 single bytes; ``merges`` lists the
    merged pairs in the order they were learned. Special tokens missing from ``vocab`` are added
    with new ids after the largest existing one. ``cache_size`` bounds the pre-token cache (entries per
    generation, two generations; the unit cache gets a quarter): at most about 150 MB for 2^19 with
    GPT-2's vocab, the figure that keeps prepare_data's workers fast on diverse text (benchmarks.md).
    """

    def __init__(
        self,
        vocab: dict[int, bytes],
        merges: list[tuple[bytes, bytes]],
        special_tokens: list[str] | None = None,
        *,
        cache_size: int = 1 << 19,
    ) -> None:
        self.vocab: dict[int, bytes] = {int(i): bytes(b) for i, b in vocab.items()}
        self.merges: list[tuple[bytes, bytes]] = [(bytes(a), bytes(b)) for a, b in merges]
        self.special_tokens: list[str] = list(dict.fromkeys(special_tokens or []))
        if any(not tok for tok in self.special_tokens):
            raise ValueError("special tokens must be non-empty strings")

        # Lowest id wins when two ids share the same bytes.
        self._id_of: dict[bytes, int] = {}
        for i in sorted(self.vocab):
            self._id_of.setdefault(self.vocab[i], i)

        self.special_token_ids: dict[str, int] = {}
        for tok in self.special_tokens:
            raw = tok.encode("utf-8")
            if raw not in self._id_of:
                new_id = max(self.vocab, default=-1) + 1
                self.vocab[new_id] = raw
                self._id_of[raw] = new_id
            self.special_token_ids[tok] = self._id_of[raw]
        self._special_regex = special_token_regex(self.special_tokens)
        self._special_parts = {tok: _pack([i]) for tok, i in self.special_token_ids.items()}
        self._max_special_len = max((len(t) for t in self.special_tokens), default=0)

        missing = [b for b in range(256) if bytes([b]) not in self._id_of]
        if missing:
            raise ValueError(
                f"vocab lacks {len(missing)} single-byte tokens (first: {bytes([missing[0]])!r}); "
                "a byte-level BPE vocab needs all 256"
            )
        self._byte_ids: list[int] = [self._id_of[bytes([b])] for b in range(256)]

        # (left id, right id) -> merge rank; rank -> merged id. A repeated pair keeps its first rank.
        self._ranks: dict[tuple[int, int], int] = {}
        self._merge_ids: list[int] = []
        self._no_rank = len(self.merges)
        for rank, (a, b) in enumerate(self.merges):
            ia, ib, iab = self._id_of.get(a), self._id_of.get(b), self._id_of.get(a + b)
            if ia is None or ib is None or iab is None:
                raise ValueError(f"merge #{rank} {a!r} + {b!r}: a part or the merged token is not in the vocab")
            self._ranks.setdefault((ia, ib), rank)
            self._merge_ids.append(iab)

        self._merger = _BatchMerger(self._ranks, self._merge_ids, self._byte_ids)
        self._id_objects = np.array(list(range(max(self.vocab) + 1)), dtype=object)
        self._cache_size = cache_size
        # Pre-token -> packed ids, and space-separated unit -> packed ids of " " + unit. A prose word
        # is a unit hit, so the unit cache needs fewer entries (the old 2^16 was enough there).
        self._cache = _Cache(cache_size)
        self._unit_cache = _Cache(max(1, cache_size // 4))
        self._units_ok = not any(" " in t for t in self.special_tokens)  # no special token spans a unit cut

    # ----------------------------------------------------------------------------- construction

    @classmethod
    def from_files(
        cls, vocab_path: str | os.PathLike, merges_path: str | os.PathLike, special_tokens: list[str] | None = None
    ) -> Tokenizer:
        """Load our pickles (``vocab.pkl``, ``merges.pkl``) or GPT-2 files (``vocab.json``, ``merges.txt``).

        Pickles are read without running code: one that refers to any class or function is refused. A missing
        file raises FileNotFoundError; a damaged, unsafe or unknown one TokenizerFileError (a ValueError), one line.
        """
        return cls(_load_vocab(Path(vocab_path)), _load_merges(Path(merges_path)), special_tokens)

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``vocab.pkl``, ``merges.pkl`` and ``special_tokens.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _write_atomic(directory / VOCAB_FILE, pickle.dumps(self.vocab, protocol=pickle.HIGHEST_PROTOCOL))
        _write_atomic(directory / MERGES_FILE, pickle.dumps(self.merges, protocol=pickle.HIGHEST_PROTOCOL))
        _write_atomic(directory / SPECIAL_TOKENS_FILE, json.dumps(self.special_tokens).encode("utf-8"))

    def __reduce__(self):
        # Worker processes get the plain vocab/merges and rebuild the lookup tables (fast), not the cache.
        return (_rebuild, (self.vocab, self.merges, self.special_tokens, self._cache_size))

    # ------------------------------------------------------------------------------- properties

    @property
    def vocab_size(self) -> int:
        """Number of ids a model needs: largest id + 1 (= len(vocab) for a contiguous vocab)."""
        return max(self.vocab) + 1

    @property
    def eot_id(self) -> int | None:
        """Id of ``<|endoftext|>`` when it is one of the special tokens, else None."""
        return self.special_token_ids.get("<|endoftext|>")

    # ----------------------------------------------------------------------------------- decode

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The concatenated bytes of ``ids``."""
        vocab = self.vocab
        try:
            return b"".join([vocab[i] for i in ids])
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]} is not in the vocabulary (ids 0..{self.vocab_size - 1})") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ----------------------------------------------------------------------------------- encode

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        ids: list[int] = []
        for block in self._id_blocks(text, final=True):  # block by block: one block's arrays at a time
            ids += self._as_list(np.frombuffer(block, _ID))
        return ids

    def _as_list(self, ids: np.ndarray) -> list[int]:
        # The list holds the tokenizer's own int objects (``tolist`` would make one per id: slower, and
        # 28 bytes more per id).
        return self._id_objects.take(ids).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as a read-only uint32 array (cheaper than a list for writing files)."""
        return np.frombuffer(b"".join(self._id_blocks(text, final=True)), _ID)

    def encode_iterable(self, iterable: Iterable[str]) -> Iterator[int]:
        """Lazily yield the ids of ``"".join(iterable)`` (e.g. a file opened in text mode).

        Same ids as ``encode("".join(iterable))``, with memory bounded by a block, not by the input.
        """
        return chain.from_iterable(self.encode_chunks(iterable))

    def encode_chunks(self, iterable: Iterable[str]) -> Iterator[list[int]]:
        """Like :meth:`encode_iterable`, but yield the ids a list at a time (cheaper for writing arrays).

        Text is gathered into blocks of about ``STREAM_CHARS`` characters; the tail of each block that
        later text could still change (a pre-token touching the end, a possible special-token prefix)
        is held back and encoded with what follows, so the ids equal ``encode("".join(iterable))``.
        """
        held = ""
        pending: list[str] = []
        pending_len = 0
        for chunk in iterable:
            if not chunk:
                continue
            pending.append(chunk)
            pending_len += len(chunk)
            # Waiting for at least len(held) new characters keeps re-scanning of held text linear overall.
            if pending_len < max(STREAM_CHARS, len(held)):
                continue
            held += "".join(pending)
            pending.clear()
            pending_len = 0
            blocks = self._id_blocks(held, final=False)
            while True:
                try:
                    block = next(blocks)
                except StopIteration as stop:
                    held = held[stop.value :]
                    break
                if block:
                    yield self._as_list(np.frombuffer(block, _ID))
        held += "".join(pending)
        for block in self._id_blocks(held, final=True):
            if block:
                yield self._as_list(np.frombuffer(block, _ID))

    def _id_blocks(self, text: str, final: bool) -> Generator[bytes, None, int]:
        """Yield the packed ids of ``text`` a block at a time and return how many characters were encoded.

        With ``final=False`` the text may continue later: encoding stops at the last position after
        which no appended text can change the ids, and that position is returned.
        """
        n = len(text)
        pos = 0
        if self._special_regex is not None:
            longest = self._max_special_len
            # Short documents between special tokens are gathered into one block (ordinary spans and the
            # special tokens between them), so the caches and the batch merger work on whole blocks.
            block: list[tuple[int, int] | str] = []
            gathered = 0
            for m in self._special_regex.finditer(text):
                # Not final while a longer special token could still match here once more text arrives.
                if not final and m.start() + longest > n:
                    break
                if m.start() - pos > BLOCK_CHARS:
                    if block:
                        yield self._encode_block(text, block)
                        block, gathered = [], 0
                    yield from self._ordinary_blocks(text, pos, m.start(), final=True)
                elif m.start() > pos:
                    block.append((pos, m.start()))
                    gathered += m.start() - pos
                block.append(m.group())
                pos = m.end()
                if gathered >= BLOCK_CHARS:
                    yield self._encode_block(text, block)
                    block, gathered = [], 0
            if block:
                yield self._encode_block(text, block)
            if not final:
                # Any position from here on may still begin a special token.
                n = max(pos, len(text) - longest + 1)
        if pos >= n:
            return pos
        return (yield from self._ordinary_blocks(text, pos, n, final))

    def _ordinary_blocks(self, text: str, pos: int, end: int, final: bool) -> Generator[bytes, None, int]:
        """Encode ``text[pos:end]`` (no special tokens in it) a block at a time; return where it stopped.

        A block ends just before a space followed by a non-space character: a pre-token always starts
        there and the text on either side pre-tokenizes the same alone as together (see
        :func:`~cs336_basics.pretokenize.last_space_cut`). Without such a space, the block is
        pre-tokenized and cut after its last pre-token that appended text cannot change. With
        ``final=False`` the text may continue after ``end``, so the unsettled tail is left for the caller.
        """
        size = BLOCK_CHARS
        while pos < end:
            stop = min(pos + size, end)
            if final and stop == end:
                yield self._encode_block(text, [(pos, end)])
                return end
            cut = last_space_cut(text, pos, stop - 1)
            if cut > pos:
                yield self._encode_block(text, [(pos, cut)])
                pos = cut
                size = BLOCK_CHARS
                continue
            pretokens = pretokenize(text, pos, stop)  # sees text[pos:stop] as the whole string
            keep, cut = _settled_pretokens(pretokens, stop)
            if keep > 0:
                del pretokens[keep:]
                yield self._encode_pretokens(pretokens)
                pos = cut
                size = BLOCK_CHARS
            elif stop == end:
                return pos  # not final and nothing settled yet
            else:
                size *= 2  # one pre-token spans the whole block (e.g. a long whitespace run)
        return pos

    def _encode_block(self, text: str, block: list[tuple[int, int] | str]) -> bytes:
        """Packed ids of a block: complete spans ``(start, end)`` of ordinary text and special tokens.

        Two ways, same ids. Space units (``_encode_units``) are fastest for prose whose words are mostly
        known; pre-tokens (``_encode_pretokens``) for text where many units are new, such as source code.
        The block goes by units ``UNIT_SAMPLE`` characters at a time (which also keeps the unit cache
        filled) until a piece's unit-cache miss rate exceeds ``UNIT_MISS_MAX``; the rest goes by pre-tokens.
        """
        if not self._units_ok:
            return self._encode_pretokens(self._pretokens(text, block))
        parts = []
        while block:
            head, block = _split_block(text, block, UNIT_SAMPLE)
            ids, miss_rate = self._encode_units(text, head)
            parts.append(ids)
            if miss_rate > UNIT_MISS_MAX and block:
                parts.append(self._encode_pretokens(self._pretokens(text, block)))
                break
        return b"".join(parts)

    @staticmethod
    def _pretokens(text: str, block: list[tuple[int, int] | str]) -> list[str]:
        pretokens: list[str] = []
        for span in block:
            if isinstance(span, str):
                pretokens.append(span)
            else:
                pretokens += pretokenize(text, *span)
        return pretokens

    def _encode_units(self, text: str, block: list[tuple[int, int] | str]) -> tuple[bytes, float]:
        """Packed ids of a block, by space-separated units; and the fraction of units not in the unit cache.

        Each span is split on single spaces into units. A space followed by a non-space character always
        starts a pre-token (" word", " 42", " ..."), and the text before it pre-tokenizes the same alone
        (see :func:`~cs336_basics.pretokenize.last_space_cut`). So each such ``" " + unit`` has ids of its
        own, kept in the unit cache: a known word costs one lookup and no regex. A unit that is empty or
        starts with whitespace continues the segment of the unit before it. The segments not in the cache
        are pre-tokenized together (one call for all those that start with a space) and encoded at once.
        """
        cache = self._unit_cache  # unit -> packed ids of " " + unit
        parts: list[bytes | None] = []
        # Segments to encode, as (index in parts, text, unit to cache or None): at span starts, and " "-led.
        starts: list[tuple[int, str, str | None]] = []
        spaced: list[tuple[int, str, str | None]] = []
        units_seen = misses = 0
        for span in block:
            if isinstance(span, str):
                parts.append(self._special_parts[span])
                continue
            units = text[span[0] : span[1]].split(" ")
            got = list(map(cache.current.get, units))
            got[0] = None  # the first unit has no space before it
            n = len(units)
            units_seen += n
            base = len(parts)
            i = 0
            while True:
                try:
                    i = got.index(None, i)
                except ValueError:
                    break
                misses += 1
                if i > 0 and not NON_SPACE_AT(units[i]):
                    i -= 1  # continues the segment of unit i - 1
                k = i + 1
                while k < n and not NON_SPACE_AT(units[k]):
                    k += 1
                ids = None
                if i == 0:
                    starts.append((base, " ".join(units[:k]), None))
                else:
                    ids = cache.recall_one(units[i]) if k == i + 1 else None
                    if ids is None:
                        spaced.append((base + i, " " + " ".join(units[i:k]), units[i] if k == i + 1 else None))
                got[i : k] = [ids or b""] + [b""] * (k - i - 1)
                i = k
            parts += got
        # Encode the missing segments' pre-tokens at once. " "-led segments may be pre-tokenized as one
        # text (each starts where a pre-token must start); span starts are pre-tokenized each alone.
        pretokens: list[str] = []
        counts: list[int] = []
        for _, seg, _ in starts:
            found = pretokenize(seg)
            pretokens += found
            counts.append(len(found))
        joined = "".join([seg for _, seg, _ in spaced])
        spaced_pretokens = pretokenize(joined)
        ends = list(accumulate(map(len, spaced_pretokens)))
        cuts = list(map(bisect_right, repeat(ends), accumulate([len(seg) for _, seg, _ in spaced])))
        counts += map(sub, cuts, [0, *cuts[:-1]])
        pretokens += spaced_pretokens
        pretoken_ids = self._pretoken_parts(pretokens)
        at = 0
        new_units = {}
        for (where, _, unit), count in zip(chain(starts, spaced), counts):
            ids = parts[where] = b"".join(pretoken_ids[at : at + count])
            at += count
            if unit is not None:
                new_units[unit] = ids
        cache.put(new_units)
        return b"".join(parts), misses / max(1, units_seen)

    def _encode_pretokens(self, pretokens: list[str]) -> bytes:
        """Packed ids of a list of pre-tokens (and special tokens)."""
        return b"".join(self._pretoken_parts(pretokens))

    def _pretoken_parts(self, pretokens: list[str]) -> list[bytes]:
        """The packed ids of each pre-token (or special token): cached ids where known, BPE for the rest,
        all new pre-tokens at once."""
        cache = self._cache
        parts = list(map(cache.current.get, pretokens))
        if None in parts:
            where = _positions_of_none(parts)
            missing = dict.fromkeys(map(pretokens.__getitem__, where))
            found = cache.recall(missing)
            found.update((t, ids) for t, ids in self._special_parts.items() if t in missing)
            new = [p for p in missing if p not in found]
            raws = [p.encode("utf-8") for p in new]
            computed = dict(zip(new, self._bpe_many(raws)))
            found.update(computed)
            if raws and max(map(len, raws)) > LONG_PRETOKEN:  # rare long ones (whitespace runs, ...): not cached
                computed = {p: ids for p, ids in computed.items() if len(p.encode("utf-8")) <= LONG_PRETOKEN}
            cache.put(computed)
            for i in where:
                parts[i] = found[pretokens[i]]
        return parts

    def _bpe_many(self, raws: list[bytes]) -> list[bytes]:
        """Packed BPE ids of many pre-tokens (UTF-8 bytes): in numpy batches of similar length where there
        are enough of them, with ``_bpe`` (or ``_bpe_long``) for the rest. Same ids as ``_bpe`` alone."""
        out: list[bytes | None] = [None] * len(raws)
        if len(raws) >= BATCH_MIN:
            lengths = np.fromiter(map(len, raws), np.intp, len(raws))
            order = np.argsort(lengths, kind="stable")
            ends = np.searchsorted(lengths[order], BATCH_WIDTHS, side="right").tolist()
            lo = 0
            for width, hi in zip(BATCH_WIDTHS, ends):
                if hi - lo >= BATCH_MIN:
                    group = order[lo:hi].tolist()
                    for i, ids in zip(group, self._merger([raws[i] for i in group], width)):
                        out[i] = ids
                    lo = hi
        byte_ids = self._byte_ids
        for i, ids in enumerate(out):
            if ids is None:
                raw = raws[i]
                start = list(map(byte_ids.__getitem__, raw))
                out[i] = _pack(self._bpe(start) if len(raw) <= LONG_PRETOKEN else self._bpe_long(start))
        return out

    def _bpe(self, ids: list[int]) -> list[int]:
        """Merge the leftmost lowest-ranked adjacent pair until no pair has a merge (GPT-2's ``bpe``)."""
        if len(ids) < 2:
            return ids
        rank_of, merge_ids, none = self._ranks.get, self._merge_ids, self._no_rank
        ranks = list(map(rank_of, zip(ids, ids[1:]), repeat(none)))
        while True:
            best = min(ranks)
            if best == none:
                return ids
            i = ranks.index(best)
            new = merge_ids[best]
            ids[i] = new
            del ids[i + 1]
            del ranks[i]
            if i < len(ranks):
                ranks[i] = rank_of((new, ids[i + 1]), none)
            elif i == 0:
                return ids
            if i > 0:
                ranks[i - 1] = rank_of((ids[i - 1], new), none)

    def _bpe_long(self, ids: list[int]) -> list[int]:
        """Same result as ``_bpe`` in O(n log n): a heap of (rank, position) over a linked list."""
        ranks, merge_ids = self._ranks, self._merge_ids
        n = len(ids)
        tok = list(ids)
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        heap = [(ranks[p], i, p) for i, p in enumerate(zip(tok, tok[1:])) if p in ranks]
        heapq.heapify(heap)
        while heap:
            rank, i, pair = heapq.heappop(heap)
            j = nxt[i]
            # Stale entry: a token only ever grows, so a changed pair never matches its old ids again.
            if j >= n or tok[i] != pair[0] or tok[j] != pair[1]:
                continue
            new = merge_ids[rank]
            tok[i] = new
            tok[j] = -1
            k = nxt[j]
            nxt[i] = k
            if k < n:
                prv[k] = i
                right = (new, tok[k])
                if right in ranks:
                    heapq.heappush(heap, (ranks[right], i, right))
            p = prv[i]
            if p >= 0:
                left = (tok[p], new)
                if left in ranks:
                    heapq.heappush(heap, (ranks[left], p, left))
        return [t for t in tok if t != -1]


# --------------------------------------------------------------------------------- module helpers


def tokenizer_files(directory: str | os.PathLike) -> list[Path]:
    """The files that hold the tokenizer in ``directory``, the one place that decides which kind is read.

    Our ``vocab.pkl`` + ``merges.pkl`` when either is there (a missing one is then an error, not a reason to read
    another kind); else a tokenizer trained elsewhere: ``[tokenizer.json]`` (preferred, it carries the special
    tokens) or ``[vocab.json, merges.txt]``; else ``[]``. The first file's name tells the kind.
    """
    directory = Path(directory)
    ours = [directory / VOCAB_FILE, directory / MERGES_FILE]
    if any(path.exists() for path in ours):
        return ours
    if (directory / HF_TOKENIZER_FILE).is_file():
        return [directory / HF_TOKENIZER_FILE]
    gpt2 = [directory / GPT2_VOCAB_FILE, directory / GPT2_MERGES_FILE]
    return gpt2 if all(path.is_file() for path in gpt2) else []


def load_tokenizer(directory: str | os.PathLike, special_tokens: list[str] | None = None, *,
                   add_special_tokens: bool = False) -> Tokenizer:
    """Load the tokenizer in ``directory``, written by :meth:`Tokenizer.save` or trained elsewhere.

    Our ``vocab.pkl`` + ``merges.pkl`` come first, with the special tokens saved beside them unless
    ``special_tokens`` is given (with ``add_special_tokens``, ``special_tokens`` are added to the saved ones).
    Without them, a Hugging Face ``tokenizer.json`` or GPT-2's ``vocab.json`` + ``merges.txt`` (byte-level BPE
    only) is read instead: its added tokens are special, plus ``special_tokens``.
    """
    directory = Path(directory)
    files = tokenizer_files(directory)
    if not files:
        raise FileNotFoundError(f"tokenizer file not found: {directory / VOCAB_FILE} (nor a tokenizer.json, nor "
                                f"vocab.json + merges.txt, in {directory}/)")
    if files[0].name != VOCAB_FILE:
        from cs336_basics.hf_tokenizer import read_tokenizer_files

        return read_tokenizer_files(files, special_tokens)
    specials_path = directory / SPECIAL_TOKENS_FILE
    if (special_tokens is None or add_special_tokens) and specials_path.exists():
        try:
            saved = json.loads(specials_path.read_text(encoding="utf-8"))
        except ValueError as e:  # bad JSON or bad UTF-8
            raise TokenizerFileError(f"{specials_path} is not JSON ({one_line(e, 80)}); expected a list of "
                                     "strings such as [\"<|endoftext|>\"]") from None
        if not isinstance(saved, list) or not all(isinstance(t, str) for t in saved):
            raise TokenizerFileError(f"{specials_path}: expected a JSON list of strings")
        special_tokens = saved + (special_tokens or [])  # the Tokenizer drops repeats
    return Tokenizer.from_files(*files, special_tokens)


def load_checked_tokenizer(directory: str | os.PathLike, model_vocab_size: int | None = None, *,
                           model: str = "the model") -> Tokenizer:
    """The tokenizer in ``directory`` (a folder as :func:`load_tokenizer` reads it, or a tokenizer.json / vocab.json
    itself) for a command: every failure is one UserError line, and with ``model_vocab_size`` a tokenizer of
    another size than ``model``'s is refused."""
    from cs336_basics.hf_tokenizer import read_tokenizer

    fix = "pass --tokenizer-dir with the tokenizer the model was trained with"
    try:  # with the special tokens saved beside it
        tokenizer = read_tokenizer(directory) if Path(directory).is_file() else load_tokenizer(directory)
    except FileNotFoundError as exc:
        raise UserError(f"{exc}; {fix}") from None
    except UserError:
        raise
    except Exception as exc:  # a vocab without all 256 bytes, a merge of unknown tokens, an unreadable file, ...
        raise UserError(f"cannot load the tokenizer in {directory}: {one_line(exc, 200)}") from None
    if model_vocab_size is not None and tokenizer.vocab_size != model_vocab_size:
        raise UserError(f"the tokenizer in {directory} has {tokenizer.vocab_size} tokens but {model} has vocab_size "
                        f"{model_vocab_size}: {fix}")
    return tokenizer


def _rebuild(vocab, merges, special_tokens, cache_size) -> Tokenizer:
    return Tokenizer(vocab, merges, special_tokens, cache_size=cache_size)


def _positions_of_none(items: list) -> list[int]:
    """Indices of the ``None`` items (few among many: ``list.index`` skips the rest at C speed)."""
    found = []
    i = -1
    try:
        while True:
            i = items.index(None, i + 1)
            found.append(i)
    except ValueError:
        return found


def _split_block(text: str, block: list[tuple[int, int] | str], size: int) -> tuple[list, list]:
    """The block cut after about ``size`` characters of ordinary text, at a span end or a space cut."""
    if size <= 0:
        return [], block
    for n, span in enumerate(block):
        if isinstance(span, str):
            continue
        start, end = span
        if end - start < size:
            size -= end - start
            continue
        cut = last_space_cut(text, start, start + size) if start + size < end - 1 else end
        if cut <= start:
            cut = end
        head, rest = block[:n], block[n + 1 :]
        head.append((start, cut))
        if cut < end:
            rest.insert(0, (cut, end))
        return head, rest
    return block, []


def _settled_pretokens(pretokens: list[str], stop: int) -> tuple[int, int]:
    """How many leading pre-tokens of a text ending at ``stop`` no appended text can change, and where they end.

    The last pre-token could grow; one starting within the last ``_LOOKAHEAD`` characters could
    become a contraction (``'l`` + ``l``). Every other match of the GPT-2 pattern is decided by the
    characters up to one past its end.
    """
    keep = len(pretokens) - 1
    cut = stop - len(pretokens[-1])
    while keep > 0 and cut - len(pretokens[keep - 1]) + _LOOKAHEAD > stop:
        keep -= 1
        cut -= len(pretokens[keep])
    return keep, cut


class TokenizerFileError(UserError, ValueError):
    """A tokenizer file that is missing pieces, damaged, unsafe or of an unknown kind; the message names it."""


# The only globals a tokenizer pickle may name: protocols 0-2 store bytes as _codecs.encode(str, "latin1").
def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is allowed only as encode(str, 'latin1')")
    return text.encode("latin-1")


def _empty_bytes(*args: object) -> bytes:
    if args:
        raise pickle.UnpicklingError("bytes(...) is allowed only without arguments")
    return b""


_SAFE_GLOBALS = {("_codecs", "encode"): _latin1_encode, ("builtins", "bytes"): _empty_bytes,
                 ("__builtin__", "bytes"): _empty_bytes}


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, tuples, ints, str and bytes only: any other global (a class or function, the only
    way a pickle can run code) is refused before anything is called."""

    def find_class(self, module: str, name: str):
        safe = _SAFE_GLOBALS.get((module, name))
        if safe is None:
            raise _RefusedGlobal(f"{module}.{name}")
        return safe


def _unpickle(path: Path, expected: str) -> object:
    """The object in a tokenizer pickle, read without running code; TokenizerFileError when unsafe or damaged."""
    try:
        with open(path, "rb") as f:
            return _SafeUnpickler(f).load()
    except _RefusedGlobal as e:
        raise TokenizerFileError(
            f"refused to load {path}: it refers to the Python object {e}, and a tokenizer pickle holds only "
            f"{expected}; loading it could run code. Use tokenizer files written by this project "
            "(prepare_data.py, or python -m cs336_basics.export import-tokenizer)"
        ) from None
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as e:  # garbage and truncation raise many types: UnpicklingError, EOFError, ValueError, ...
        raise TokenizerFileError(
            f"cannot load the tokenizer: {path} is not a tokenizer pickle (damaged, truncated or another kind of file: "
            f"{type(e).__name__}: {one_line(e, 80)}); re-create it by running prepare_data.py without "
            "--use-existing-tokenizer, or import a tokenizer.json / vocab.json + merges.txt"
        ) from None


def _require(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")


def _load_vocab(path: Path) -> dict[int, bytes]:
    _require(path)
    if path.suffix == ".json":
        try:
            return load_gpt2_vocab(path)
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # bad JSON, a char outside GPT-2's bytes
            raise TokenizerFileError(f"{path} is not a GPT-2 style vocab.json ({{token: id}} in GPT-2's byte "
                                     f"alphabet): {type(e).__name__}: {one_line(e, 80)}") from None
    if path.suffix in (".pkl", ".pickle"):
        vocab = _unpickle(path, "a dict of int -> bytes")
        if not isinstance(vocab, dict) or not all(
            isinstance(i, int) and isinstance(b, bytes) for i, b in vocab.items()
        ):
            raise TokenizerFileError(f"{path}: expected a pickled dict[int, bytes], found {type(vocab).__name__}")
        return vocab
    raise TokenizerFileError(f"{path}: unknown vocab format (use .pkl for dict[int, bytes] or .json for GPT-2 style)")


def _load_merges(path: Path) -> list[tuple[bytes, bytes]]:
    _require(path)
    if path.suffix == ".txt":
        try:
            return load_gpt2_merges(path)
        except (ValueError, KeyError) as e:  # a line without exactly one space, a char outside GPT-2's bytes
            raise TokenizerFileError(f"{path} is not a GPT-2 style merges.txt (one 'a b' pair a line, in GPT-2's "
                                     f"byte alphabet): {type(e).__name__}: {one_line(e, 80)}") from None
    if path.suffix in (".pkl", ".pickle"):
        merges = _unpickle(path, "a list of (bytes, bytes) tuples")
        if not isinstance(merges, list) or not all(
            isinstance(m, tuple) and len(m) == 2 and all(isinstance(x, bytes) for x in m) for m in merges
        ):
            raise TokenizerFileError(f"{path}: expected a pickled list[tuple[bytes, bytes]], "
                                     f"found {type(merges).__name__}")
        return merges
    raise TokenizerFileError(
        f"{path}: unknown merges format (use .pkl for list[tuple[bytes, bytes]] or .txt for GPT-2 style)")


def _write_atomic(path: Path, data: bytes) -> None:
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
