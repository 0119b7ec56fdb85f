"""Tests for the byte-level BPE trainer: reference fixtures, a naive reference trainer, edge cases."""

from __future__ import annotations

import time
import warnings
from collections import Counter

import pytest
from fixtures import fixture_path
from hypothesis import given, settings
from hypothesis import strategies as st

from cs336_basics import bpe
from cs336_basics.bpe import count_pretokens, learn_merges, train_bpe
from cs336_basics.gpt2 import bytes_to_unicode, load_gpt2_merges, load_gpt2_vocab
from cs336_basics.pretokenize import GPT2_REGEX, find_safe_boundaries, special_token_regex, split_on_special

EOT = "<|endoftext|>"


# ---------------------------------------------------------------------------------------------
# The obviously-correct reference: recount every pair before every merge.


def naive_pretoken_counts(text: str, special_tokens: list[str]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for piece, is_special in split_on_special(text, special_token_regex(special_tokens)):
        if not is_special:
            counts.update(GPT2_REGEX.findall(piece))
    return counts


def naive_train(text: str, vocab_size: int, special_tokens: list[str]) -> list[tuple[bytes, bytes]]:
    words: dict[tuple[bytes, ...], int] = {}
    for word, n in naive_pretoken_counts(text, special_tokens).items():
        key = tuple(bytes([x]) for x in word.encode("utf-8"))
        words[key] = words.get(key, 0) + n
    merges = []
    while len(merges) < vocab_size - 256 - len(special_tokens):
        pairs: Counter[tuple[bytes, bytes]] = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged: dict[tuple[bytes, ...], int] = {}
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        words = merged
    return merges


def train_text(tmp_path, text: str, vocab_size: int, special_tokens: list[str], **kwargs):
    path = tmp_path / "corpus.txt"
    path.write_bytes(text.encode("utf-8"))
    return train_bpe(path, vocab_size, special_tokens, **kwargs)


def assert_vocab_layout(vocab, merges, special_tokens):
    s = len(special_tokens)
    assert [vocab[i] for i in range(s)] == [t.encode() for t in special_tokens]
    assert [vocab[s + k] for k in range(256)] == [bytes([b]) for b in bytes_to_unicode()]
    assert [vocab[s + 256 + k] for k in range(len(merges))] == [a + b for a, b in merges]
    assert len(vocab) == s + 256 + len(merges)


# ---------------------------------------------------------------------------------------------
# Reference fixtures


def test_matches_reference_merges_and_vocab():
    vocab, merges = train_bpe(fixture_path("corpus.en"), 500, [EOT])
    assert merges == load_gpt2_merges(fixture_path("train-bpe-reference-merges.txt"))
    assert vocab == load_gpt2_vocab(fixture_path("train-bpe-reference-vocab.json"))


def test_reference_corpus_is_fast():
    path = fixture_path("corpus.en")
    start = time.perf_counter()
    train_bpe(path, 500, [EOT])
    assert time.perf_counter() - start < 1.5


# ---------------------------------------------------------------------------------------------
# Agreement with the naive trainer on varied corpora

MULTILINGUAL = (
    "Привет, как дела? Всё хорошо, спасибо! 東京は日本の首都です。北京是中国的首都。"
    "مرحبا بالعالم، كيف حالك؟ Ça va très bien, merci — à bientôt! Ünïcödé façade naïve café "
    "😀😀 🎉🎉🎉 👩‍👩‍👧 données Größe straße 한국어 텍스트입니다 ελληνικά κείμενα\n"
)
TIES = "ab ba ab ba abab baba xyzzy yzzyx " * 7 + "aa bb cc dd ee ff gg hh " * 5 + "qpqp pqpq"
SPECIALS = (
    "Once upon a time<|endoftext|>there was a cat.<|endoftext|><|endoftext|>The end<|sep|>"
    "a<|sep|>b<|endoftext|>tex<|endoftext|>t|> <|endo ftext|> once upon a time, time, time\n"
)
DIGITS_SPACES = "1234567890 12 123 1234  \t\t  007 3.14159\n\n\n   \n  99999 10,000 \r\n\r\n" * 3 + "    end  \n\n"


@pytest.mark.parametrize(
    ("name", "text", "specials", "vocab_size"),
    [
        ("multilingual", MULTILINGUAL * 3, [EOT], 257 + 150),
        ("ties", TIES, [], 256 + 80),
        ("specials", SPECIALS * 2, [EOT, "<|sep|>"], 258 + 120),
        ("digits_whitespace", DIGITS_SPACES, [EOT], 257 + 60),
    ],
)
def test_agrees_with_naive_trainer(tmp_path, name, text, specials, vocab_size):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small corpora may run out of pairs; both must stop alike
        vocab, merges = train_text(tmp_path, text, vocab_size, specials)
    assert merges == naive_train(text, vocab_size, specials)
    assert_vocab_layout(vocab, merges, specials)


def test_agrees_with_naive_trainer_on_fixture_texts(tmp_path):
    text = "".join(fixture_path(n).read_text(encoding="utf-8") for n in ("tinystories_sample.txt", "german.txt"))
    vocab, merges = train_text(tmp_path, text, 256 + 1 + 200, [EOT])
    assert merges == naive_train(text, 256 + 1 + 200, [EOT])


@settings(max_examples=40, deadline=None)
@given(
    words=st.lists(st.text(alphabet="ab c\nxé😀1", min_size=1, max_size=12), min_size=1, max_size=30),
    num_merges=st.integers(min_value=0, max_value=40),
)
def test_learn_merges_matches_naive_on_random_corpora(words, num_merges):
    text = "".join(words)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = naive_train(text, 256 + num_merges, [])
    counts = {w.encode(): n for w, n in naive_pretoken_counts(text, []).items()}
    assert learn_merges(counts, num_merges) == expected


@settings(max_examples=60, deadline=None)
@given(a=st.binary(max_size=6), b=st.binary(max_size=6))
def test_descending_key_reverses_byte_order(a, b):
    assert (bpe._descending_key(a) < bpe._descending_key(b)) == (a > b)


def test_ties_go_to_lexicographically_greater_pair():
    # Every pair occurs once: the greatest pair by (bytes, bytes) comes first.
    merges = learn_merges({b"ab": 1, b"cd": 1, b"ca": 1, b"zb": 1, b"za": 1}, 5)
    assert merges == [(b"z", b"b"), (b"z", b"a"), (b"c", b"d"), (b"c", b"a"), (b"a", b"b")]
    # A proper prefix is smaller: after (a, b), the tie (c, ab) vs (c, a) goes to (c, ab).
    merges = learn_merges({b"ab": 5, b"cab": 1, b"ca": 1}, 3)
    assert merges == [(b"a", b"b"), (b"c", b"ab"), (b"c", b"a")]


def test_touching_and_overlapping_sites_match_naive(tmp_path):
    # Touching sites (a b a b: one merge changes both neighbours of a pair) and runs of one
    # byte (a a a a: overlapping occurrences) are where local count updates usually go wrong.
    text = "abababab ab abab aaaaaaa aaa aa a bbbbabab xyxyxyx yyyyy xxyxxyxxy " * 3
    _, merges = train_text(tmp_path, text, 256 + 30, [])
    assert merges == naive_train(text, 256 + 30, [])


def test_long_words_match_naive(tmp_path):
    # CJK text has no spaces, so a whole line is one pre-token.
    line = "".join("東京大阪日本中国"[(i * i + i // 3) % 8] for i in range(1500))
    text = line + "\n" + line[::-1] + "。" + line[700:900] + " 東京"
    _, merges = train_text(tmp_path, text, 256 + 60, [])
    assert merges == naive_train(text, 256 + 60, [])


def test_overlapping_pairs_count_and_merge_left_to_right():
    # "aaaaa" holds (a, a) four times but merges left to right into aa aa a.
    merges = learn_merges({b"aaaaa": 1}, 3)
    assert merges == [(b"a", b"a"), (b"aa", b"aa"), (b"aaaa", b"a")]


# ---------------------------------------------------------------------------------------------
# Special tokens


def test_no_merge_crosses_or_contains_a_special_token(tmp_path):
    text = ("hello<|endoftext|>hello<|endoftext|>" * 50) + "<|endoftext|>" * 20
    vocab, merges = train_text(tmp_path, text, 257 + 4, [EOT])
    learned = [a + b for a, b in merges]
    assert all(b"<|" not in t and b"|>" not in t for t in learned)
    assert b"hello" in learned
    assert list(vocab.values()).count(EOT.encode()) == 1


def test_overlapping_special_tokens_match_longest_first(tmp_path):
    double = EOT + EOT
    text = f"ab{double}ab{EOT}ab"
    _, merges = train_text(tmp_path, text, 258 + 1, [EOT, double])
    assert merges == [(b"a", b"b")] == naive_train(text, 258 + 1, [EOT, double])


def test_duplicate_special_tokens_are_counted_once(tmp_path):
    vocab, _ = train_text(tmp_path, "abc", 257, [EOT, EOT])
    assert vocab[0] == EOT.encode() and len(vocab) == 257


# ---------------------------------------------------------------------------------------------
# Parallel and streamed pre-tokenization equal the in-memory count


def _mixed_corpus(num_docs: int) -> str:
    docs = [
        f"Document {i}: the cat sat on the mat {i * 7}.\nÜber straße — 東京 {i % 13}!\n  indented\n\nend.{' ' * (i % 3)}"
        for i in range(num_docs)
    ]
    return EOT.join(docs)


@pytest.mark.parametrize("specials", [[EOT], []])
def test_parallel_streamed_counts_equal_in_memory_counts(tmp_path, monkeypatch, specials):
    text = _mixed_corpus(400)
    path = tmp_path / "corpus.txt"
    path.write_bytes(text.encode("utf-8"))
    expected = naive_pretoken_counts(text, specials)
    monkeypatch.setattr(bpe, "POOL_MIN_BYTES", 0)
    monkeypatch.setattr(bpe, "TASK_SIZE", 4096)
    monkeypatch.setattr(bpe, "READ_SIZE", 700)
    assert count_pretokens(path, specials, num_workers=2) == expected  # pool over ~10 tasks
    assert count_pretokens(path, specials, num_workers=1) == expected  # one process, streamed pieces


def test_parallel_training_equals_serial(tmp_path, monkeypatch):
    path = tmp_path / "corpus.txt"
    path.write_bytes(_mixed_corpus(300).encode("utf-8"))
    serial = train_bpe(path, 257 + 60, [EOT], num_workers=1)
    monkeypatch.setattr(bpe, "POOL_MIN_BYTES", 0)
    monkeypatch.setattr(bpe, "TASK_SIZE", 8192)
    assert train_bpe(path, 257 + 60, [EOT], num_workers=2) == serial


def test_files_without_special_tokens_are_cut_at_newlines(tmp_path, monkeypatch):
    # The safe-cut rule (cs336_basics.pretokenize) cuts a file without special tokens before newlines.
    text = "".join(f"line {i} word{i % 7}.\n" for i in range(2000))
    path = tmp_path / "plain.txt"
    path.write_bytes(text.encode())
    seen = []
    monkeypatch.setattr(bpe, "find_safe_boundaries", lambda *a: seen.append(find_safe_boundaries(*a)) or seen[-1])
    monkeypatch.setattr(bpe, "POOL_MIN_BYTES", 0)
    assert count_pretokens(path, [], num_workers=2) == naive_pretoken_counts(text, [])
    bounds = seen[0]
    assert len(bounds) == 9 and bounds[0] == 0 and bounds[-1] == len(text)
    assert all(text[b] == "\n" and text[b - 1] == "." for b in bounds[1:-1])


# ---------------------------------------------------------------------------------------------
# Bad input and edge cases


def test_vocab_size_below_minimum_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="minimum is 258"):
        train_text(tmp_path, "abc", 257, [EOT, "<|pad|>"])


def test_empty_special_token_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="non-empty"):
        train_text(tmp_path, "abc", 300, [EOT, ""])


def test_vocab_size_at_minimum_learns_nothing(tmp_path):
    vocab, merges = train_text(tmp_path, "abc abc", 257, [EOT])
    assert merges == [] and len(vocab) == 257


def test_running_out_of_pairs_warns_and_returns_what_was_learned(tmp_path):
    with pytest.warns(UserWarning, match="after 2 of 100 merges"):
        vocab, merges = train_text(tmp_path, "abc", 256 + 100, [])
    assert merges == [(b"b", b"c"), (b"a", b"bc")]
    assert len(vocab) == 258


def test_empty_file_learns_nothing(tmp_path):
    with pytest.warns(UserWarning, match="after 0 of 10"):
        vocab, merges = train_text(tmp_path, "", 267, [EOT])
    assert merges == [] and len(vocab) == 257


def test_invalid_utf8_names_the_byte_offset(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"hello world\n" * 10 + b"caf\xe9 au lait\n")
    with pytest.raises(ValueError, match=r"invalid UTF-8 at byte offset 123"):
        train_bpe(path, 300, [EOT])


def test_invalid_utf8_offset_in_a_parallel_streamed_piece(tmp_path, monkeypatch):
    path = tmp_path / "bad.txt"
    good = _mixed_corpus(100).encode("utf-8")
    path.write_bytes(good + b"x\n\xff\xfe tail")
    monkeypatch.setattr(bpe, "POOL_MIN_BYTES", 0)
    monkeypatch.setattr(bpe, "TASK_SIZE", 2048)
    monkeypatch.setattr(bpe, "READ_SIZE", 500)
    with pytest.raises(ValueError, match=f"byte offset {len(good) + 2}"):
        count_pretokens(path, [EOT], num_workers=2)


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        train_bpe(tmp_path / "nope.txt", 300, [EOT])


def test_quiet_by_default_and_progress_on_request(tmp_path, capsys):
    train_text(tmp_path, "the cat the hat " * 20, 256 + 5, [])
    assert capsys.readouterr().err == ""
    train_text(tmp_path, "the cat the hat " * 20, 256 + 5, [], progress=True)
    err = capsys.readouterr().err
    assert "pre-tokenize" in err and "merges" in err
