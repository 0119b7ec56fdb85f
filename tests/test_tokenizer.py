"""Tokenizer: exact vs tiktoken and vs a plain merges-in-order reference, streaming, specials, files."""

from __future__ import annotations

import gc
import itertools
import json
import pickle
import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cs336_basics.tokenizer as tokmod
from cs336_basics.gpt2 import load_gpt2_merges, load_gpt2_vocab
from cs336_basics.pretokenize import GPT2_PATTERN, GPT2_REGEX, special_token_regex, split_on_special
from cs336_basics.tokenizer import Tokenizer, load_tokenizer
from fixtures import fixture_path

EOT = "<|endoftext|>"
FIXTURE_TEXTS = [
    "address.txt",
    "german.txt",
    "tinystories_sample.txt",
    "corpus.en",
    "special_token_double_newlines_non_whitespace.txt",
    "special_token_trailing_newlines.txt",
]
# Pieces that stress pre-tokenization: whitespace of every kind (\x1c is str.isspace() but not the
# pattern's \s), contractions split across chunks, digits, punctuation,
# several scripts, emoji (4-byte UTF-8), combining marks, and partial special tokens.
PIECES = [
    "a", "the", "The", " ", "  ", "   ", "\n", "\n\n", "\t", "\r\n", "\x0b", "\x0c", "\x1c", "\x85", "\xa0",
    "\u2028", "\u3000", "'", "s", "ll", "l", "ve", "re", "'s", "'ll", "'t", "don't", "1", "42", "2024",
    "!", "...", "?!", ",", "-", "(", ")", "$", "é", "ü", "ß", "日本語", "中", "한국어", "Привет", "مرحبا",
    "🙂", "👩‍👩‍👧", "e\u0301", "x̃", "<", "|", ">", "<|", "|>", "<|endoftext", "endoftext|>", EOT,
]


def _mixed_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(PIECES) for _ in range(n))


mixed_text = st.lists(st.sampled_from(PIECES), max_size=40).map("".join)
any_text = st.one_of(st.text(max_size=60), mixed_text)


# ------------------------------------------------------------------------------------ reference


def reference_encode(tok: Tokenizer, text: str) -> list[int]:
    """Plain reference: split on specials, pre-tokenize, apply each merge in merge order to every pre-token."""
    id_of, by_result = _reference_tables(tok)
    ids: list[int] = []
    memo: dict[str, list[int]] = {}
    for piece, is_special in split_on_special(text, special_token_regex(tok.special_tokens)):
        if is_special:
            ids.append(tok.special_token_ids[piece])
            continue
        for pretoken in GPT2_REGEX.findall(piece):
            if pretoken not in memo:
                raw = pretoken.encode("utf-8")
                # Only merges whose result occurs in the pre-token can ever apply; keep their order.
                found = {m for i in range(len(raw)) for j in range(i + 2, len(raw) + 1) for m in by_result.get(raw[i:j], ())}
                merges = [(a, b) for _, a, b in sorted(found)]
                memo[pretoken] = [id_of[p] for p in _merge_in_order(raw, merges)]
            ids += memo[pretoken]
    return ids


_TABLES: dict[int, tuple] = {}


def _reference_tables(tok: Tokenizer) -> tuple[dict[bytes, int], dict[bytes, list[tuple[int, bytes, bytes]]]]:
    """bytes -> id (lowest id wins) and merged bytes -> [(rank, a, b)], built once per tokenizer."""
    if id(tok) not in _TABLES:
        id_of = {b: i for i, b in sorted(tok.vocab.items(), reverse=True)}
        by_result: dict[bytes, list[tuple[int, bytes, bytes]]] = {}
        for rank, (a, b) in enumerate(tok.merges):
            by_result.setdefault(a + b, []).append((rank, a, b))
        _TABLES[id(tok)] = (tok, id_of, by_result)  # holding tok keeps its id from being reused
    return _TABLES[id(tok)][1:]


def _merge_in_order(raw: bytes, merges: list[tuple[bytes, bytes]]) -> list[bytes]:
    """Apply each merge, in order, to every occurrence (left to right) in the byte sequence."""
    parts = [bytes([b]) for b in raw]
    for a, b in merges:
        out, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                out.append(a + b)
                i += 2
            else:
                out.append(parts[i])
                i += 1
        parts = out
    return parts


# -------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def gpt2_files():
    return fixture_path("gpt2_vocab.json"), fixture_path("gpt2_merges.txt")


@pytest.fixture(scope="module")
def gpt2(gpt2_files):
    return Tokenizer.from_files(*gpt2_files, special_tokens=[EOT])


@pytest.fixture(scope="module")
def gpt2_plain(gpt2):
    return Tokenizer(gpt2.vocab, gpt2.merges)


@pytest.fixture(scope="module")
def tiktoken_gpt2(gpt2):
    tiktoken = pytest.importorskip("tiktoken")
    ranks = {b: i for i, b in gpt2.vocab.items() if i != 50256}
    return tiktoken.Encoding(name="gpt2-local", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: 50256})


@pytest.fixture(scope="module")
def small():
    """The 500-token BPE trained by the reference implementation (special token at id 0)."""
    return Tokenizer.from_files(
        fixture_path("train-bpe-reference-vocab.json"), fixture_path("train-bpe-reference-merges.txt"), [EOT]
    )


@pytest.fixture(params=["units", "pretokens"])
def tiny_blocks(request, monkeypatch):
    """Force block cutting, held-back tails, cache rotation and batch merging on small inputs, with
    blocks encoded by space units, or by pre-tokens after a 3-character sample by units."""
    monkeypatch.setattr(tokmod, "BLOCK_CHARS", 7)
    monkeypatch.setattr(tokmod, "STREAM_CHARS", 5)
    monkeypatch.setattr(tokmod, "LONG_PRETOKEN", 3)
    monkeypatch.setattr(tokmod, "BATCH_MIN", 1)
    monkeypatch.setattr(tokmod, "UNIT_SAMPLE", 3)
    monkeypatch.setattr(tokmod, "UNIT_MISS_MAX", 1.0 if request.param == "units" else -1.0)


@pytest.fixture(params=["units", "pretokens"])
def either_way(request, monkeypatch):
    """Blocks encoded only by space units, or only by pre-tokens (the two must give the same ids)."""
    monkeypatch.setattr(tokmod, "UNIT_SAMPLE", tokmod.UNIT_SAMPLE if request.param == "units" else 0)
    monkeypatch.setattr(tokmod, "UNIT_MISS_MAX", 1.0 if request.param == "units" else -1.0)
    return request.param


def _read(name: str) -> str:
    return fixture_path(name).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def diverse_sample() -> str:
    """Real text nobody on the project wrote, a few hundred KB: sources of installed packages (numpy's
    Python and C headers, rich's emoji table) and, where the machine has gettext catalogs, translated
    messages in several scripts; documents joined with <|endoftext|>, as in the diverse benchmark."""
    import gettext

    import numpy

    docs: list[str] = []
    root = Path(numpy.__file__).parent
    for pattern, count in (("*.py", 40), ("*.h", 12), ("*.pyi", 10)):
        for path in sorted(root.rglob(pattern))[:count]:
            docs.append(path.read_text(encoding="utf-8", errors="replace")[:6000])
    for module in ("rich", "pip._vendor.rich"):
        try:
            emoji = Path(__import__(module, fromlist=["_emoji_codes"]).__file__).parent / "_emoji_codes.py"
        except ImportError:
            continue
        if emoji.exists():
            docs.append(emoji.read_text(encoding="utf-8")[:20000])
            break
    for lang in ("ja", "ru", "zh_CN", "ar", "hi", "ko", "el", "th", "uk", "vi", "he", "ka"):
        for mo in sorted(Path("/usr/share/locale", lang, "LC_MESSAGES").glob("*.mo"))[:3]:
            with open(mo, "rb") as f:
                catalog = gettext.GNUTranslations(f)._catalog
            docs.append("\n".join(m for k, m in catalog.items() if k and isinstance(m, str))[:8000])
    return EOT.join(docs)


# ------------------------------------------------------------------------- exactness vs tiktoken


@pytest.mark.parametrize("name", FIXTURE_TEXTS)
def test_matches_tiktoken_on_fixture_texts(gpt2, tiktoken_gpt2, name):
    text = _read(name)
    ids = gpt2.encode(text)
    assert ids == tiktoken_gpt2.encode(text, allowed_special="all")
    assert gpt2.decode(ids) == text


def test_matches_tiktoken_on_generated_text(gpt2, gpt2_plain, tiktoken_gpt2):
    rng = random.Random(0)
    for _ in range(300):
        text = _mixed_text(rng, rng.randrange(1, 80))
        assert gpt2.encode(text) == tiktoken_gpt2.encode(text, allowed_special="all"), repr(text)
        assert gpt2_plain.encode(text) == tiktoken_gpt2.encode_ordinary(text), repr(text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=any_text)
def test_matches_tiktoken_property(gpt2, tiktoken_gpt2, text):
    assert gpt2.encode(text) == tiktoken_gpt2.encode(text, allowed_special="all")


def test_long_pretokens_match_tiktoken(gpt2, tiktoken_gpt2):
    # Whitespace runs and long letter/digit/punctuation runs go through the heap-based merge.
    texts = [
        " " * 3000 + "x",
        "a" * 2000,
        "\n" * 1500 + "end",
        "x" + "  \t " * 400,
        "1234567890" * 200,
        "!?" * 700 + " ok",
        "".join(random.Random(1).choice("abcdefghijklmnopqrstuvwxyz") for _ in range(3000)),
    ]
    for text in texts:
        assert gpt2.encode(text) == tiktoken_gpt2.encode(text, allowed_special="all")


def test_multi_block_text_matches_tiktoken(gpt2, tiktoken_gpt2, monkeypatch):
    # Longer than several blocks, with and without spaces (CJK text has none to cut at).
    monkeypatch.setattr(tokmod, "BLOCK_CHARS", 1 << 14)
    text = (_read("corpus.en") + _read("german.txt") + "日本語のテキスト。" * 3000 + EOT) * 2
    assert len(text) > 4 * tokmod.BLOCK_CHARS
    assert gpt2.encode(text) == tiktoken_gpt2.encode(text, allowed_special="all")


def test_diverse_text_matches_tiktoken_either_way(gpt2, tiktoken_gpt2, diverse_sample, either_way, monkeypatch):
    # Code, emoji and many scripts; small blocks and batches so both merge paths and block cuts run.
    assert len(diverse_sample) > 200_000
    monkeypatch.setattr(tokmod, "BLOCK_CHARS", 1 << 13)
    monkeypatch.setattr(tokmod, "BATCH_MIN", 8)
    tok = Tokenizer(gpt2.vocab, gpt2.merges, [EOT], cache_size=1 << 10)  # the caches rotate too
    expected = tiktoken_gpt2.encode(diverse_sample, allowed_special="all")
    assert tok.encode(diverse_sample) == expected
    assert tok.encode_array(diverse_sample).tolist() == expected  # and again with warm caches
    assert tok.encode_array(diverse_sample).dtype == np.uint32


def test_unit_miss_rate_picks_the_way(gpt2, diverse_sample):
    # Prose with known words goes by space units; source code (many new units) by pre-tokens.
    tok = Tokenizer(gpt2.vocab, gpt2.merges, [EOT])
    ways = []
    tok._encode_pretokens = lambda pretokens: ways.append("pretokens") or Tokenizer._encode_pretokens(tok, pretokens)
    prose = _read("tinystories_sample.txt")
    tok.encode(prose)
    ways.clear()
    assert tok.encode(prose * 3) == gpt2.encode(prose * 3) and ways == []
    tok.encode(diverse_sample)
    assert "pretokens" in ways


# ---------------------------------------------------------------- fast path vs the reference encoder


def test_gpt2_fast_path_matches_merges_in_order(gpt2):
    rng = random.Random(2)
    texts = [_read("german.txt"), _read("address.txt"), _read("tinystories_sample.txt")]
    texts += [_mixed_text(rng, 40) for _ in range(40)]
    for text in texts:
        assert gpt2.encode(text) == reference_encode(gpt2, text), repr(text)


def test_small_bpe_fast_path_matches_merges_in_order(small, tiny_blocks):
    rng = random.Random(3)
    tok = Tokenizer(small.vocab, small.merges, [EOT], cache_size=8)  # constant cache rotation
    texts = [_read(name)[:20_000] for name in FIXTURE_TEXTS] + [_mixed_text(rng, 60) for _ in range(100)]
    for text in texts:
        expected = reference_encode(small, text)
        assert small.encode(text) == expected
        assert tok.encode(text) == expected


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=any_text)
def test_small_bpe_matches_reference_property(small, tiny_blocks, text):
    assert small.encode(text) == reference_encode(small, text)


def test_heap_merge_equals_simple_merge(gpt2):
    rng = random.Random(4)
    alphabet = list(range(256))
    for _ in range(200):
        raw = bytes(rng.choice(alphabet[32:127]) for _ in range(rng.randrange(2, 60)))
        if rng.random() < 0.3:
            raw = raw[:3] * rng.randrange(2, 20)
        ids = [gpt2._byte_ids[b] for b in raw]
        assert gpt2._bpe_long(list(ids)) == gpt2._bpe(list(ids))


@pytest.mark.parametrize("name", ["gpt2", "small"])
def test_batch_merger_equals_merge_loop(name, gpt2, small):
    # The numpy batch merge against _bpe, word by word, on every width it is used with.
    tok = {"gpt2": gpt2, "small": small}[name]
    rng = random.Random(8)
    text = _read("german.txt") + _read("corpus.en")[:5000] + "日本語のテキスト。Привет мир 🙂 x̃ " + "aaaa bbbb"
    words = [p.encode("utf-8") for p in dict.fromkeys(GPT2_REGEX.findall(text))]
    words += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 65))) for _ in range(300)]
    words += [b"a" * n for n in range(1, 65)] + [b"ab" * n for n in range(1, 33)]
    for width in tokmod.BATCH_WIDTHS:
        group = [w for w in words if len(w) <= width]
        expected = [tokmod._pack(tok._bpe([tok._byte_ids[b] for b in w])) for w in group]
        assert tok._merger(group, width) == expected
        assert tok._merger(group[:1], width) == expected[:1]  # a batch of one
    assert tok._bpe_many(words) == [tokmod._pack(tok._bpe([tok._byte_ids[b] for b in w])) for w in words]


def test_block_cuts_give_same_ids(gpt2, monkeypatch):
    rng = random.Random(5)
    texts = [_mixed_text(rng, 200) for _ in range(30)] + [_read("tinystories_sample.txt")]
    expected = [gpt2.encode(t) for t in texts]
    for block in (1, 2, 5, 13):
        monkeypatch.setattr(tokmod, "BLOCK_CHARS", block)
        tok = Tokenizer(gpt2.vocab, gpt2.merges, [EOT], cache_size=16)
        assert [tok.encode(t) for t in texts] == expected


class PretokenSpy(Tokenizer):
    """Encodes each pre-token as a made-up id that names it, so tests see exactly how every path (space
    units, pre-tokens, blocks, streaming) splits text: all of them get their ids from ``_pretoken_parts``."""

    FIRST_ID = 10**6

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.spy_ids: dict[str, int] = {}

    def _as_list(self, ids):
        return ids.tolist()  # the made-up ids are beyond the vocab

    def _pretoken_parts(self, pretokens):
        out = []
        for p in pretokens:
            if p in self._special_parts:
                out.append(self._special_parts[p])
            else:
                out.append(tokmod._pack([self.spy_ids.setdefault(p, self.FIRST_ID + len(self.spy_ids))]))
        return out


def reference_pretokens(text: str, specials: list[str]) -> list:
    out: list = []
    for piece, is_special in split_on_special(text, special_token_regex(specials)):
        out += [piece] if is_special else GPT2_REGEX.findall(piece)
    return out


@pytest.fixture(scope="module")
def spy():
    return PretokenSpy({i: bytes([i]) for i in range(256)}, [], [EOT, EOT + EOT], cache_size=64)


def _spy_result(spy, ids) -> list:
    names = {i: s for s, i in spy.special_token_ids.items()} | {i: p for p, i in spy.spy_ids.items()}
    return [names[i] for i in ids]


def test_fast_path_splits_exactly_like_the_pattern(spy, monkeypatch):
    rng = random.Random(7)
    texts = [_mixed_text(rng, rng.randrange(1, 120)) for _ in range(300)] + ["x\n  y", "a \x1c b", "\n \n  z"]
    # A cached unit ("x\n") followed by a space and whitespace must be re-split together with it.
    texts += ["w x\n y w x\n  y", "a b  c a b   c", "q z\t r q z\t \n r", "k 'l l k 'l  l"]
    # Units mixing letters, digits and non-ASCII letters are more than one pre-token.
    texts += ["x a42 b", "go 1st 2nd 3", "a1 b2 é1 1é", " Zürich 42ß"]
    for block in (1 << 16, 9, 2):
        monkeypatch.setattr(tokmod, "BLOCK_CHARS", block)
        for text in texts:
            assert _spy_result(spy, spy.encode(text)) == reference_pretokens(text, spy.special_tokens), repr(text)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=any_text, data=st.data())
def test_streaming_splits_exactly_like_the_pattern(spy, tiny_blocks, text, data):
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12).map(sorted))
    chunks = [text[a:b] for a, b in itertools.pairwise([0, *cuts, len(text)])]
    expected = reference_pretokens(text, spy.special_tokens)
    assert _spy_result(spy, spy.encode(text)) == expected
    assert _spy_result(spy, list(spy.encode_iterable(chunks))) == expected


# ------------------------------------------------------------------------------------- roundtrip


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text())
def test_roundtrip_arbitrary_unicode(gpt2, small, text):
    assert gpt2.decode(gpt2.encode(text)) == text
    assert small.decode(small.encode(text)) == text


def test_decode_invalid_utf8_uses_replacement_character(gpt2):
    assert gpt2.decode([gpt2._byte_ids[0xFF]]) == "\ufffd"
    e_acute = "é".encode()  # two bytes; only the first one alone is invalid
    assert gpt2.decode([gpt2._byte_ids[e_acute[0]]]) == "\ufffd"
    assert gpt2.decode(gpt2.encode("ok") + [gpt2._byte_ids[0xC3]] + gpt2.encode(" fine")) == "ok\ufffd fine"


def test_decode_unknown_id_is_a_clear_error(gpt2):
    with pytest.raises(ValueError, match="token id 99999 is not in the vocabulary"):
        gpt2.decode([1, 99999])


def test_decode_accepts_numpy_ids(gpt2):
    np = pytest.importorskip("numpy")
    ids = gpt2.encode("Hello, world! " + EOT)
    assert gpt2.decode(np.array(ids, dtype=np.uint16)) == "Hello, world! " + EOT


# -------------------------------------------------------------------------------- special tokens


def test_special_tokens_are_never_split(gpt2):
    assert gpt2.encode(EOT) == [50256]
    assert gpt2.eot_id == 50256
    ids = gpt2.encode(f"a{EOT}b{EOT}{EOT}")
    assert ids.count(50256) == 3
    assert gpt2.decode(ids) == f"a{EOT}b{EOT}{EOT}"


def test_without_special_tokens_eot_is_ordinary_text(gpt2_plain, tiktoken_gpt2):
    ids = gpt2_plain.encode(f"x{EOT}y")
    assert 50256 not in ids
    assert ids == tiktoken_gpt2.encode_ordinary(f"x{EOT}y")
    assert gpt2_plain.eot_id is None


def test_overlapping_special_tokens_match_longest_first(gpt2):
    double = EOT + EOT
    tok = Tokenizer(gpt2.vocab, gpt2.merges, [EOT, double])
    ids = tok.encode(f"a{double}b{EOT}c{double}{EOT}")
    d, s = tok.special_token_ids[double], tok.special_token_ids[EOT]
    assert [i for i in ids if i in (d, s)] == [d, s, d, s]
    assert tok.decode(ids) == f"a{double}b{EOT}c{double}{EOT}"
    assert tok.encode(double) == [d]


def test_missing_special_tokens_are_appended(small):
    tok = Tokenizer(small.vocab, small.merges, [EOT, "<|pad|>", "<|pad|>"])
    assert tok.special_token_ids[EOT] == 0  # already in this vocab
    assert tok.special_token_ids["<|pad|>"] == max(small.vocab) + 1
    assert tok.vocab_size == len(small.vocab) + 1 == len(tok.vocab)
    assert tok.encode("hi<|pad|>") [-1] == tok.special_token_ids["<|pad|>"]
    assert tok.decode(tok.encode("x <|pad|> y")) == "x <|pad|> y"
    assert len(small.vocab) == 500  # the caller's vocab is not modified


def test_special_token_with_non_ascii_text(gpt2):
    tok = Tokenizer(gpt2.vocab, gpt2.merges, ["<|日本|>"])
    ids = tok.encode("前<|日本|>後")
    assert tok.special_token_ids["<|日本|>"] in ids
    assert tok.decode(ids) == "前<|日本|>後"


# -------------------------------------------------------------------------------- encode_iterable


def _random_chunks(rng: random.Random, text: str) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randrange(0, 30)))) if len(text) > 1 else []
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def test_encode_iterable_equals_encode_for_random_chunkings(gpt2, tiny_blocks):
    rng = random.Random(6)
    double = EOT + EOT
    tok = Tokenizer(gpt2.vocab, gpt2.merges, [EOT, double])
    texts = [_mixed_text(rng, rng.randrange(1, 60)) for _ in range(150)]
    texts += [_read("special_token_trailing_newlines.txt"), _read("german.txt"), "a  'll", "x 'l", "'", "<|"]
    for text in texts:
        expected = tok.encode(text)
        for _ in range(4):
            assert list(tok.encode_iterable(_random_chunks(rng, text))) == expected, repr(text)
        assert list(tok.encode_iterable(list(text))) == expected  # one character at a time


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=any_text, data=st.data())
def test_encode_iterable_property(small, tiny_blocks, text, data):
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=10).map(sorted))
    chunks = [text[a:b] for a, b in itertools.pairwise([0, *cuts, len(text)])]
    assert list(small.encode_iterable(chunks)) == small.encode(text)


def test_encode_iterable_over_file_lines(gpt2, tmp_path):
    text = _read("tinystories_sample.txt") + _read("corpus.en")[:20000] + "  \n\n  trailing   "
    path = tmp_path / "in.txt"
    path.write_text(text, encoding="utf-8")
    with open(path, encoding="utf-8") as f:
        assert list(gpt2.encode_iterable(f)) == gpt2.encode(text)
    with open(path, encoding="utf-8") as f:
        chunks = list(gpt2.encode_chunks(f))
    assert all(chunks) and [i for c in chunks for i in c] == gpt2.encode(text)


def test_encode_iterable_is_lazy(gpt2):
    endless = itertools.cycle(["Once upon a time there was a cat.\n", EOT, "It liked naps.\n"])
    first = list(itertools.islice(gpt2.encode_iterable(endless), 5000))
    assert len(first) == 5000
    assert first[:8] == gpt2.encode("Once upon a time there was a cat.\n" + EOT)[:8]


def test_encode_iterable_memory_stays_small(gpt2):
    line = "Tom and Lily went to the park to play, and they saw 3 big dogs!\n"
    n_lines = 30_000  # ~1.9 MB of text, produced lazily and never held in full; its 480K ids as a list: ~4 MB
    gc.collect()
    tracemalloc.start()
    try:
        count = sum(1 for _ in gpt2.encode_iterable(line for _ in range(n_lines)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == n_lines * len(gpt2.encode(line))
    assert peak < 3 * 2**20, f"encode_iterable peak {peak / 2**20:.1f} MiB for {len(line) * n_lines / 1e6:.1f} MB of text"


# ------------------------------------------------------------------------------ files and pickling


def test_save_and_load_roundtrip(small, tmp_path):
    tok = Tokenizer(small.vocab, small.merges, [EOT, "<|pad|>"])
    tok.save(tmp_path / "tok")
    names = sorted(p.name for p in (tmp_path / "tok").iterdir())
    assert names == ["merges.pkl", "special_tokens.json", "vocab.pkl"]  # no temporary files left
    with open(tmp_path / "tok" / "vocab.pkl", "rb") as f:
        vocab = pickle.load(f)
    assert len(vocab) == tok.vocab_size and vocab == tok.vocab
    with open(tmp_path / "tok" / "merges.pkl", "rb") as f:
        assert pickle.load(f) == small.merges
    assert json.loads((tmp_path / "tok" / "special_tokens.json").read_text()) == [EOT, "<|pad|>"]

    loaded = load_tokenizer(tmp_path / "tok")
    text = "Once upon a time<|pad|> there was" + EOT
    assert loaded.special_tokens == [EOT, "<|pad|>"]
    assert loaded.encode(text) == tok.encode(text)
    only_eot = load_tokenizer(tmp_path / "tok", special_tokens=[EOT])
    assert only_eot.special_tokens == [EOT]
    assert Tokenizer.from_files(tmp_path / "tok" / "vocab.pkl", tmp_path / "tok" / "merges.pkl").encode(
        "plain text"
    ) == tok.encode("plain text")


def test_load_without_special_tokens_file(small, tmp_path):
    small.save(tmp_path)
    (tmp_path / "special_tokens.json").unlink()
    assert load_tokenizer(tmp_path).special_tokens == []
    assert load_tokenizer(tmp_path, [EOT]).encode(EOT) == [0]


def test_missing_files_raise_file_not_found_naming_the_file(small, tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.pkl"):
        load_tokenizer(tmp_path)
    small.save(tmp_path)
    (tmp_path / "merges.pkl").unlink()
    with pytest.raises(FileNotFoundError, match="merges.pkl"):
        load_tokenizer(tmp_path)


def test_bad_files_are_clear_errors(small, tmp_path):
    (tmp_path / "vocab.pkl").write_bytes(pickle.dumps(["not", "a", "dict"]))
    (tmp_path / "merges.pkl").write_bytes(pickle.dumps(small.merges))
    with pytest.raises(ValueError, match="expected a pickled dict"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.yaml").write_text("x")
    with pytest.raises(ValueError, match="unknown vocab format"):
        Tokenizer.from_files(tmp_path / "vocab.yaml", tmp_path / "merges.pkl")


def test_gpt2_files_and_pickles_give_the_same_tokenizer(gpt2, gpt2_files, tmp_path):
    vocab, merges = load_gpt2_vocab(gpt2_files[0]), load_gpt2_merges(gpt2_files[1])
    assert gpt2.vocab == vocab and gpt2.merges == merges and gpt2.vocab_size == 50257
    gpt2.save(tmp_path)
    again = load_tokenizer(tmp_path)
    text = _read("address.txt") + EOT
    assert again.encode(text) == gpt2.encode(text)


def test_pickled_tokenizer_encodes_the_same_and_carries_no_cache(gpt2):
    gpt2.encode(_read("corpus.en"))  # fill the caches
    blob = pickle.dumps(gpt2)
    clone = pickle.loads(blob)
    text = _read("german.txt") + EOT
    assert clone.encode(text) == gpt2.encode(text)
    assert clone.special_tokens == gpt2.special_tokens
    assert len(blob) < len(pickle.dumps((gpt2.vocab, gpt2.merges))) + 10_000


def test_invalid_vocab_or_merges_are_rejected(small):
    vocab = dict(small.vocab)
    del vocab[small._byte_ids[ord("a")]]
    with pytest.raises(ValueError, match="single-byte tokens"):
        Tokenizer(vocab, [])
    with pytest.raises(ValueError, match="merge #0"):
        Tokenizer(small.vocab, [(b"q", b"zz")])
    with pytest.raises(ValueError, match="non-empty"):
        Tokenizer(small.vocab, small.merges, [""])
