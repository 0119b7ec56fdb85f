"""pretokenize (the fast GPT-2 split) against the regex module, and the one safe-cut rule against its claim."""

from __future__ import annotations

import io
import random
import signal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cs336_basics import pretokenize as pt
from cs336_basics.pretokenize import (
    GPT2_REGEX,
    SafeCuts,
    find_safe_boundaries,
    last_space_cut,
    pretokenize,
    special_token_regex,
    split_on_special,
)

EOT = "<|endoftext|>"
# Every class boundary the pattern has, characters above U+FFFF (letters, digits, emoji), a lone
# surrogate, whitespace that \s has and str.isspace() disagrees on (\x1c, \x85), contractions.
PIECES = [
    "a", "the", "The", " ", "  ", "   ", "\n", "\n\n", "\t", "\r\n", "\r", "\x0b", "\x0c", "\x1c", "\x85", "\xa0",
    "\u2028", "\u3000", "'", "s", "ll", "'s", "'ll", "'t", "1", "42", "!", "...", "é", "ß", "日本語", "Привет",
    "مرحبا", "🙂", "👩‍👩‍👧", "𝐀", "𝟏", "𠀋", "e\u0301", "x̃", "\ud800", "<|", "|>", EOT, "x\n", "<|endo",
]
texts = st.one_of(st.text(max_size=80), st.lists(st.sampled_from(PIECES), max_size=50).map("".join))
FILE_PIECES = [p for p in PIECES if p != "\ud800"]  # what a UTF-8 file can hold
file_texts = st.one_of(st.text(max_size=80), st.lists(st.sampled_from(FILE_PIECES), max_size=50).map("".join))


def _pieces_and_pretokens(text: str, specials: list[str]) -> list[str]:
    out: list[str] = []
    for piece, is_special in split_on_special(text, special_token_regex(specials)):
        out += [piece] if is_special else GPT2_REGEX.findall(piece)
    return out


# ------------------------------------------------------------------------------ pretokenize


@settings(max_examples=2000, deadline=None)
@given(text=texts, data=st.data())
def test_pretokenize_equals_the_regex_module(text, data):
    assert pretokenize(text) == GPT2_REGEX.findall(text)
    pos = data.draw(st.integers(0, len(text)))
    end = data.draw(st.integers(pos, len(text)))
    assert pretokenize(text, pos, end) == GPT2_REGEX.findall(text, pos, end)


def test_pretokenize_on_long_mixed_text():
    rng = random.Random(0)
    text = "".join(rng.choice(PIECES) for _ in range(20_000))
    assert pretokenize(text) == GPT2_REGEX.findall(text)
    # Every character of the Basic Multilingual Plane and a sample above it, in runs and alone.
    bmp = "".join(map(chr, range(0x10000)))
    assert pretokenize(bmp) == GPT2_REGEX.findall(bmp)
    spaced = " ".join(bmp[i : i + 3] for i in range(0, len(bmp), 3))
    assert pretokenize(spaced) == GPT2_REGEX.findall(spaced)
    astral = " ".join(chr(c) + "a" for c in range(0x10000, 0x110000, 97))
    assert pretokenize(astral) == GPT2_REGEX.findall(astral)


def test_last_space_cut():
    assert last_space_cut("ab cd  ef", 0, 9) == 6  # the space before "ef", not the one before a space
    assert last_space_cut("ab cd", 0, 2) == 0  # none inside (lo, hi)
    assert last_space_cut(" ab", 0, 3) == 0  # lo itself is never returned as a cut
    assert last_space_cut("a \x1cb", 0, 4) == 1  # \x1c is not whitespace to the pattern


# ------------------------------------------------------------------------------ safe cuts

SPECIAL_SETS = [[], [EOT], [EOT, EOT + EOT, "x\n"]]


@pytest.mark.parametrize("specials", SPECIAL_SETS)
def test_every_safe_cut_keeps_pieces_and_pretokens(specials):
    rng = random.Random(len(specials))
    cutter = SafeCuts(specials)
    checked = 0
    for _ in range(600):
        text = "".join(rng.choice(FILE_PIECES) for _ in range(rng.randint(1, 60)))
        data = text.encode("utf-8")
        whole = _pieces_and_pretokens(text, specials)
        for cut in cutter.cuts(data):
            left, right = data[:cut].decode("utf-8"), data[cut:].decode("utf-8")
            assert _pieces_and_pretokens(left, specials) + _pieces_and_pretokens(right, specials) == whole, (text, cut)
            checked += 1
    assert checked > 800  # the test really exercises cuts


def test_cut_after_a_newline_would_be_wrong_and_is_never_made():
    text = "a \nb"  # whole: "a", " ", "\n", "b"; the prefix "a \n" alone gives "a", " \n"
    assert GPT2_REGEX.findall(text) != GPT2_REGEX.findall("a \n") + GPT2_REGEX.findall("b")
    assert SafeCuts().cuts(text.encode()) == []
    assert SafeCuts().cuts(b"ab\ncd\r\nx") == [2, 5]  # before a line break that follows a printable byte
    assert SafeCuts([EOT]).cuts(f"a{EOT}b".encode()) == [1]  # at a special token
    # A special token that holds a line break is never cut, and neither is an overlapping occurrence.
    assert SafeCuts(["x\n"]).cuts(b"ax\nb") == [1]
    assert SafeCuts([EOT, EOT + EOT]).cuts((EOT + EOT).encode()) == [0]


@settings(max_examples=300, deadline=None)
@given(head=file_texts, tail=file_texts, specials=st.sampled_from(SPECIAL_SETS))
def test_last_cut_is_decided_by_the_bytes_so_far(head, tail, specials):
    # ``last`` on a prefix may only return a cut that stays safe whatever text follows.
    cutter = SafeCuts(specials)
    data = (head + tail).encode("utf-8")
    prefix = head.encode("utf-8")
    cut = cutter.last(prefix)
    if cut:
        assert cut in cutter.cuts(data)
    final = cutter.last(data, final=True)
    assert final == max([c for c in cutter.cuts(data) if c > 0], default=0)


@pytest.mark.parametrize("specials", SPECIAL_SETS)
def test_file_boundaries_are_safe_cuts_near_the_target(specials):
    rng = random.Random(7)
    text = "".join(rng.choice(FILE_PIECES) for _ in range(3000))
    data = text.encode("utf-8")
    cutter = SafeCuts(specials)
    every = cutter.cuts(data)
    for chunk in (1, 50, 700):
        bounds = find_safe_boundaries(io.BytesIO(data), chunk, specials)
        assert bounds[0] == 0 and bounds[-1] == len(data) and bounds == sorted(set(bounds))
        for prev, b in zip(bounds, bounds[1:-1]):
            # The first safe cut at or after prev + chunk.
            assert b == min(c for c in every if c >= prev + chunk)
    # Probing a file in small windows finds the same cuts as scanning it at once.
    f = io.BytesIO(data)
    for pos in range(0, len(data), 97):
        expected = min([c for c in every if c >= pos], default=len(data))
        assert cutter.next_in_file(f, pos, len(data), probe=16) == expected


def test_ignore_sigint():
    before = signal.getsignal(signal.SIGINT)
    try:
        pt.ignore_sigint()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
