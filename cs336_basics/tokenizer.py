"""Byte-level BPE tokenizer: encode text to token ids and decode ids back to text.

Encoding splits text on special tokens (never split, longest match first), cuts each remaining
piece into pre-tokens with the GPT-2 pattern, and merges the UTF-8 bytes of each pre-token by
repeatedly merging the adjacent pair with the lowest merge rank (GPT-2's ``bpe``). For merges made
by BPE training this gives exactly the same ids as applying the merges one by one in merge order,
and the same ids as tiktoken built from the same files.

Speed, in pure Python: text is split on single spaces (C speed) into units such as "dog," whose
ids, as " dog,", are cached, so common words cost one dict lookup and no regex; only new units go
through the GPT-2 pattern, a pre-token cache and the merge loop. Both caches are bounded. Long
texts are encoded block by block, cutting only where appended text cannot change the result, so
memory stays small and ``encode_iterable`` streams files of any size with the same ids as ``encode``.
"""

from __future__ import annotations

import heapq
import json
import os
import pickle
from collections.abc import Generator, Iterable, Iterator
from itertools import chain, repeat
from pathlib import Path

import regex

from cs336_basics.common import UserError, one_line
from cs336_basics.fileio import atomic_output
from cs336_basics.gpt2 import load_gpt2_merges, load_gpt2_vocab
from cs336_basics.pretokenize import GPT2_REGEX, special_token_regex

VOCAB_FILE = "vocab.pkl"
MERGES_FILE = "merges.pkl"
SPECIAL_TOKENS_FILE = "special_tokens.json"

# Characters of ordinary text encoded at a time: bounds the lists held in memory, and blocks of this
# size measured fastest (their lists stay in the CPU caches).
BLOCK_CHARS = 1 << 16
# encode_iterable gathers at least this many characters before encoding, so a line-by-line source
# is encoded in efficient blocks.
STREAM_CHARS = 1 << 16
# Pre-tokens longer than this (in bytes) are neither cached nor merged with the simple quadratic loop.
LONG_PRETOKEN = 256
# Space-separated units longer than this (in characters) are not cached.
MAX_CACHED_UNIT = 48
# A contraction like "'ll" decides a pre-token from up to this many characters.
_LOOKAHEAD = 3
# Whitespace exactly as the GPT-2 pattern's \s sees it.
_NON_SPACE_AT = regex.compile(r"\S").match


class _Cache:
    """Bounded str -> ids cache with two generations: when the current one is full it replaces the
    old one, so entries used since the last rotation survive and the rest are dropped."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.current: dict[str, tuple[int, ...]] = {}
        self.old: dict[str, tuple[int, ...]] = {}

    def recall(self, key: str) -> tuple[int, ...] | None:
        """Ids from the old generation (moved to the current one), or None."""
        ids = self.old.get(key)
        if ids is not None:
            self.put(key, ids)
        return ids

    def put(self, key: str, ids: tuple[int, ...]) -> None:
        if len(self.current) >= self.size:
            self.old = self.current
            self.current = {}
        self.current[key] = ids


class Tokenizer:
    """Encode/decode with a byte-level BPE vocabulary and merge list.

    ``vocab`` maps id -> token bytes and must contain all 256 single bytes; ``merges`` lists the
    merged pairs in the order they were learned. Special tokens missing from ``vocab`` are added
    with new ids after the largest existing one.
    """

    def __init__(
        self,
        vocab: dict[int, bytes],
        merges: list[tuple[bytes, bytes]],
        special_tokens: list[str] | None = None,
        *,
        cache_size: int = 1 << 16,
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

        self._cache_size = cache_size
        self._pretoken_cache = _Cache(cache_size)
        self._unit_cache = _Cache(cache_size)

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
        gen = self._id_blocks(text, final=True)
        for block in gen:
            ids += block
        return ids

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
                    yield block
        held += "".join(pending)
        for block in self._id_blocks(held, final=True):
            if block:
                yield block

    def _id_blocks(self, text: str, final: bool) -> Generator[list[int], None, int]:
        """Yield lists of ids for ``text`` and return how many characters were encoded.

        With ``final=False`` the text may continue later: encoding stops at the last position after
        which no appended text can change the ids, and that position is returned.
        """
        n = len(text)
        pos = 0
        if self._special_regex is not None:
            longest = self._max_special_len
            for m in self._special_regex.finditer(text):
                # Not final while a longer special token could still match here once more text arrives.
                if not final and m.start() + longest > n:
                    break
                if m.start() - pos > BLOCK_CHARS:
                    yield from self._ordinary_blocks(text, pos, m.start(), final=True)
                elif m.start() > pos:
                    yield self._encode_ordinary(text[pos : m.start()])
                yield [self.special_token_ids[m.group()]]
                pos = m.end()
            if not final:
                # Any position from here on may still begin a special token.
                n = max(pos, len(text) - longest + 1)
        if pos >= n:
            return pos
        return (yield from self._ordinary_blocks(text, pos, n, final))

    def _ordinary_blocks(self, text: str, pos: int, end: int, final: bool) -> Generator[list[int], None, int]:
        """Encode ``text[pos:end]`` (no special tokens in it) a block at a time; return where it stopped.

        A block ends just before a space followed by a non-space character: a pre-token always starts
        there and the text on either side pre-tokenizes the same alone as together (see
        ``_encode_ordinary``). Without such a space, the block is pre-tokenized and cut after its last
        pre-token that appended text cannot change. With ``final=False`` the text may continue after
        ``end``, so the unsettled tail is left for the caller.
        """
        size = BLOCK_CHARS
        while pos < end:
            stop = min(pos + size, end)
            if final and stop == end:
                yield self._encode_ordinary(text[pos:end])
                return end
            cut = _space_cut(text, pos, stop)
            if cut is not None:
                yield self._encode_ordinary(text[pos:cut])
                pos = cut
                size = BLOCK_CHARS
                continue
            pretokens = GPT2_REGEX.findall(text, pos, stop)  # sees text[pos:stop] as the whole string
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

    def _encode_ordinary(self, text: str) -> list[int]:
        """Ids of ``text``, a complete piece of text without special tokens.

        The text is split on single spaces into units. A space followed by a non-space character
        always starts a pre-token (" word", " 42", " ..."), and the GPT-2 pattern pre-tokenizes the
        text before it the same whether the space or the end of the string follows. So each such
        ``" " + unit`` is encoded alone and cached; a unit that is empty or starts with whitespace
        continues the previous unit's segment and is encoded together with it.
        """
        units = text.split(" ")
        n = len(units)
        if n == 1:
            return list(self._encode_segment(text))
        cache = self._unit_cache  # unit -> ids of " " + unit
        parts = list(map(cache.current.get, units))
        parts[0] = None  # the first unit has no space before it
        i = 0
        while True:
            try:
                i = parts.index(None, i)
            except ValueError:
                break
            if i > 0 and not _NON_SPACE_AT(units[i]):
                i -= 1  # continues the segment of unit i - 1
            k = i + 1
            while k < n and not _NON_SPACE_AT(units[k]):
                k += 1
            if i == 0:
                parts[0] = self._encode_segment(" ".join(units[:k]))
            elif k == i + 1:
                unit = units[i]
                ids = cache.recall(unit)
                if ids is None:
                    if unit.isascii() and (unit.isalpha() or unit.isdigit()):
                        ids = self._encode_pretoken(" " + unit)  # a single pre-token: skip the regex
                    else:
                        ids = tuple(self._encode_segment(" " + unit))
                    if len(unit) <= MAX_CACHED_UNIT:
                        cache.put(unit, ids)
                parts[i] = ids
            else:
                parts[i] = self._encode_segment(" " + " ".join(units[i:k]))
            if k > i + 1:
                parts[i + 1 : k] = [()] * (k - i - 1)
            i = k
        ids: list[int] = []
        for part in parts:
            ids += part
        return ids

    def _encode_segment(self, text: str) -> tuple[int, ...] | list[int]:
        """Ids of ``text`` (complete, no special tokens) via pre-tokens."""
        pretokens = GPT2_REGEX.findall(text)
        if len(pretokens) == 1:
            return self._encode_pretoken(pretokens[0])
        return self._encode_pretokens(pretokens) if pretokens else ()

    def _encode_pretokens(self, pretokens: list[str]) -> list[int]:
        """Ids of a list of pre-tokens: cached ids where known, BPE for the rest."""
        parts = list(map(self._pretoken_cache.current.get, pretokens))
        i = 0
        while True:
            try:
                i = parts.index(None, i)
            except ValueError:
                break
            parts[i] = self._encode_pretoken(pretokens[i])
            i += 1
        ids: list[int] = []
        for part in parts:
            ids += part
        return ids

    def _encode_pretoken(self, pretoken: str) -> tuple[int, ...]:
        cache = self._pretoken_cache
        ids = cache.recall(pretoken)
        if ids is None:
            raw = pretoken.encode("utf-8")
            byte_ids = list(map(self._byte_ids.__getitem__, raw))
            if len(raw) > LONG_PRETOKEN:
                return tuple(self._bpe_long(byte_ids))
            ids = tuple(self._bpe(byte_ids))
            cache.put(pretoken, ids)
        return ids

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


def load_tokenizer(directory: str | os.PathLike, special_tokens: list[str] | None = None) -> Tokenizer:
    """Load the tokenizer in ``directory``, written by :meth:`Tokenizer.save` or trained elsewhere.

    Our ``vocab.pkl`` + ``merges.pkl`` come first, with the special tokens saved beside them unless
    ``special_tokens`` is given. Without them, a Hugging Face ``tokenizer.json`` or GPT-2's ``vocab.json`` +
    ``merges.txt`` (byte-level BPE only) is read instead: its added tokens are special, plus ``special_tokens``.
    """
    directory = Path(directory)
    if not (directory / VOCAB_FILE).exists() and not (directory / MERGES_FILE).exists():
        from cs336_basics.hf_tokenizer import foreign_tokenizer_files, read_tokenizer

        if foreign_tokenizer_files(directory):
            return read_tokenizer(directory, special_tokens)
        raise FileNotFoundError(f"tokenizer file not found: {directory / VOCAB_FILE} (nor a tokenizer.json, nor "
                                f"vocab.json + merges.txt, in {directory}/)")
    specials_path = directory / SPECIAL_TOKENS_FILE
    if special_tokens is None and specials_path.exists():
        try:
            special_tokens = json.loads(specials_path.read_text(encoding="utf-8"))
        except ValueError as e:  # bad JSON or bad UTF-8
            raise TokenizerFileError(f"{specials_path} is not JSON ({one_line(e, 80)}); expected a list of "
                                     "strings such as [\"<|endoftext|>\"]") from None
        if not isinstance(special_tokens, list) or not all(isinstance(t, str) for t in special_tokens):
            raise TokenizerFileError(f"{specials_path}: expected a JSON list of strings")
    return Tokenizer.from_files(directory / VOCAB_FILE, directory / MERGES_FILE, special_tokens)


def _rebuild(vocab, merges, special_tokens, cache_size) -> Tokenizer:
    return Tokenizer(vocab, merges, special_tokens, cache_size=cache_size)


def _space_cut(text: str, pos: int, stop: int, tries: int = 16) -> int | None:
    """The last index in (pos, stop - 1) of a space followed by a non-space character, or None."""
    cut = stop - 1
    for _ in range(tries):
        cut = text.rfind(" ", pos + 1, cut)
        if cut < 0:
            return None
        if _NON_SPACE_AT(text, cut + 1):
            return cut
    return None


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
