"""prepare_data.py and cs336_basics.tokenize_data: exact chunked encoding, .bin format, atomic outputs, errors."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fixtures import PROJECT_ROOT, fixture_path

import prepare_data
from cs336_basics import tokenize_data
from cs336_basics.pretokenize import GPT2_REGEX, special_token_regex, split_on_special
from cs336_basics.stories import write_corpus
from cs336_basics.common import EXIT_USER_ERROR
from cs336_basics.data import DataError, FORMAT_VERSION, read_metadata, token_dtype
from cs336_basics.tokenize_data import check_text_file, find_safe_boundaries, tokenize_file
from cs336_basics.tokenizer import Tokenizer, load_tokenizer

EOT = "<|endoftext|>"
# Pieces chosen to hit every GPT-2 pre-tokenizer corner next to a newline: whitespace runs before and
# after "\n", "\r\n", non-ASCII whitespace, contractions, digits, punctuation, special tokens and text
# that only looks like one.
TRICKY = [
    "a", "Hello", " world", " ", "  ", "\n", "\n\n", "\r\n", "\r", "\t", "\xa0", "\u3000", "é", "日本", "7", "42",
    ".", "!", "'s", "'ll", " 're", "<|endoftext|>", "<|endoftext|><|endoftext|>", "<|endo", "x\n", "🙂",
]


def _pretokens(text: str, specials: list[str]) -> list[str]:
    """Reference: what encoding sees (special-token split, then the GPT-2 pattern on each piece)."""
    out: list[str] = []
    for piece, is_special in split_on_special(text, special_token_regex(specials)):
        out += [piece] if is_special else GPT2_REGEX.findall(piece)
    return out


def _tricky_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(TRICKY) for _ in range(n))


def _chunks(data: bytes, bounds: list[int]) -> list[str]:
    assert bounds[0] == 0 and bounds[-1] == len(data) and bounds == sorted(set(bounds))
    return [data[s:e].decode("utf-8") for s, e in zip(bounds[:-1], bounds[1:])]


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    return Tokenizer.from_files(fixture_path("gpt2_vocab.json"), fixture_path("gpt2_merges.txt"), [EOT])


# ------------------------------------------------------------------------------ safe boundaries


@pytest.mark.parametrize("specials", [[], [EOT], [EOT, EOT + EOT, "x\n"]])
def test_safe_boundaries_preserve_pretokens(specials):
    rng = random.Random(len(specials))
    cuts = 0
    for _ in range(300):
        text = _tricky_text(rng, rng.randint(1, 60))
        data = text.encode("utf-8")
        for chunk_bytes in (1, 3, 16):
            bounds = find_safe_boundaries(io.BytesIO(data), chunk_bytes, specials)
            cuts += len(bounds) - 2
            chunks = _chunks(data, bounds)
            assert [t for c in chunks for t in _pretokens(c, specials)] == _pretokens(text, specials), (text, bounds)
    assert cuts > 1000  # the test really exercises cuts


def test_cut_after_newline_would_be_wrong_and_is_never_made():
    # Whole text: "a", " ", "\n", "b"; the prefix "a \n" alone would give "a", " \n".
    text = "a \nb"
    assert _pretokens(text, []) != _pretokens("a \n", []) + _pretokens("b", [])
    assert find_safe_boundaries(io.BytesIO(text.encode()), 1, []) == [0, len(text)]
    # Before a newline that follows a printable character is safe and is used.
    assert find_safe_boundaries(io.BytesIO(b"ab\ncd\n"), 1, []) == [0, 2, 5, 6]


def test_boundaries_never_split_an_overlapping_special_token():
    specials = [EOT, EOT + EOT]
    data = ("x" * 5 + EOT + EOT + "yy" + EOT + "z").encode()
    # The target (8) lands inside the double token; the single EOT at 18 is part of it, so the cut
    # goes to the next EOT, which stands alone.
    bounds = find_safe_boundaries(io.BytesIO(data), 8, specials)
    assert bounds == [0, 5 + 2 * len(EOT) + 2, len(data)]


def test_text_without_special_tokens_still_splits_on_newlines():
    text = "".join(f"Line {i} of the story.\n" for i in range(2000))
    bounds = find_safe_boundaries(io.BytesIO(text.encode()), 4096, [EOT])
    assert len(bounds) > 8
    assert all(text[b] == "\n" for b in bounds[1:-1])
    crlf = text.replace("\n", "\r\n")  # Windows line endings parallelise too
    bounds = find_safe_boundaries(io.BytesIO(crlf.encode()), 4096, [])
    assert len(bounds) > 8 and all(crlf[b] == "\r" for b in bounds[1:-1])


# ------------------------------------------------------------------------------ tokenize_file


def test_chunked_tokens_equal_whole_text_encoding(tmp_path, gpt2):
    rng = random.Random(1)
    text = fixture_path("tinystories_sample.txt").read_text() + _tricky_text(rng, 3000)
    text += fixture_path("corpus.en").read_text()[:20000]
    src = tmp_path / "in.txt"
    src.write_bytes(text.encode("utf-8"))
    expected = gpt2.encode(text)
    result = tokenize_file(src, tmp_path / "out.bin", gpt2, vocab_size=gpt2.vocab_size,
                           special_tokens=[EOT], chunk_bytes=257, parallel=False)
    got = np.memmap(tmp_path / "out.bin", dtype=np.uint16)
    assert result.num_tokens == len(expected) == len(got)
    assert got.tolist() == expected
    assert gpt2.decode(got.tolist()) == text


def test_parallel_path_matches_reference(tmp_path, gpt2):
    rng = random.Random(2)
    text = "\n".join(_tricky_text(rng, 40) for _ in range(400))
    src = tmp_path / "in.txt"
    src.write_text(text, encoding="utf-8")
    tokenize_file(src, tmp_path / "par.bin", gpt2, vocab_size=gpt2.vocab_size, special_tokens=[EOT],
                  chunk_bytes=1024, num_workers=2, parallel=True)
    assert np.fromfile(tmp_path / "par.bin", dtype=np.uint16).tolist() == gpt2.encode(text)


class _PlainEncoder:
    """Only ``encode`` (no ``encode_array``): tokenize_file must work with any such encoder."""

    def __init__(self, inner):
        self.inner = inner

    def encode(self, text):
        return self.inner.encode(text)


def test_parallel_path_with_a_plain_encoder_and_a_bad_vocab_size(tmp_path, gpt2):
    rng = random.Random(3)
    text = "\n".join(_tricky_text(rng, 30) for _ in range(300))
    src = tmp_path / "in.txt"
    src.write_text(text, encoding="utf-8")
    tokenize_file(src, tmp_path / "plain.bin", _PlainEncoder(gpt2), vocab_size=gpt2.vocab_size, special_tokens=[EOT],
                  chunk_bytes=512, num_workers=2, parallel=True)
    assert np.fromfile(tmp_path / "plain.bin", dtype=np.uint16).tolist() == gpt2.encode(text)
    # Ids the declared vocab cannot hold are caught in the workers: one clear error, no output.
    with pytest.raises(ValueError, match="does not match vocab_size"):
        tokenize_file(src, tmp_path / "bad.bin", gpt2, vocab_size=300, chunk_bytes=512, num_workers=2, parallel=True)
    assert not (tmp_path / "bad.bin").exists() and not (tmp_path / "bad.bin.json").exists()


def test_metadata_and_uint32_ids(tmp_path, gpt2):
    src = tmp_path / "in.txt"
    src.write_text("Once upon a time.\n" + EOT + "\nThe end.\n", encoding="utf-8")
    tokenize_file(src, tmp_path / "big.bin", gpt2, vocab_size=70_000, special_tokens=[EOT], tokenizer_hash="abc")
    meta = read_metadata(tmp_path / "big.bin")
    ids = np.fromfile(tmp_path / "big.bin", dtype=np.uint32)
    assert ids.tolist() == gpt2.encode(src.read_text())
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_000 and meta["num_tokens"] == len(ids)
    assert meta["special_tokens"] == [EOT] and meta["tokenizer_sha256"] == "abc"
    assert meta["source"] == {"name": "in.txt", "size_bytes": src.stat().st_size}
    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32
    with pytest.raises(FileNotFoundError):
        read_metadata(tmp_path / "missing.bin")
    with pytest.raises(ValueError, match="vocab_size"):  # ids the declared vocab cannot hold
        tokenize_file(src, tmp_path / "small.bin", gpt2, vocab_size=1000)
    assert not (tmp_path / "small.bin").exists()


class _FailingEncoder:
    """Encodes the first chunk, then fails, as a crash mid-way through a big file would."""

    def __init__(self, inner, exc):
        self.inner, self.exc, self.calls = inner, exc, 0

    def encode(self, text):
        self.calls += 1
        if self.calls > 1:
            raise self.exc
        return self.inner.encode(text)


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failure_midway_leaves_no_output(tmp_path, gpt2, exc):
    src = tmp_path / "in.txt"
    src.write_text("Some text.\n" * 500, encoding="utf-8")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(type(exc)):
        tokenize_file(src, out_dir / "train.bin", _FailingEncoder(gpt2, exc), vocab_size=gpt2.vocab_size, chunk_bytes=512)
    assert list(out_dir.iterdir()) == []


_CTRL_C_SCRIPT = """
import sys, time
from pathlib import Path
from cs336_basics.tokenize_data import tokenize_file

class SlowEncoder:
    def encode(self, text):
        Path(sys.argv[2]).touch()  # tells the test that workers are busy
        time.sleep(0.5)
        return [1] * len(text)

tokenize_file(sys.argv[1], sys.argv[3], SlowEncoder(), vocab_size=300, chunk_bytes=1000, num_workers=2, parallel=True)
"""


def test_ctrl_c_with_worker_pool_stops_cleanly(tmp_path):
    src, marker, out = tmp_path / "in.txt", tmp_path / "busy", tmp_path / "out" / "train.bin"
    src.write_text("A line of text.\n" * 2000, encoding="utf-8")
    out.parent.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", _CTRL_C_SCRIPT, str(src), str(marker), str(out)],
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    deadline = time.monotonic() + 60
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # like Ctrl-C in a terminal: the parent and every worker
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "ForkPoolWorker" not in err and "SpawnPoolWorker" not in err, err  # no worker tracebacks
    assert list(out.parent.iterdir()) == []


def test_check_text_file_reports_invalid_byte_offset(tmp_path):
    good = ("héllo wörld 日本 " * 50).encode("utf-8")
    for block in (1, 2, 3, 7, 1 << 20):  # multi-byte characters straddle block edges
        path = tmp_path / "ok.txt"
        path.write_bytes(good)
        assert check_text_file(path, block_bytes=block) == len(good)
        bad = tmp_path / "bad.txt"
        bad.write_bytes(good[:301] + b"\xff" + good[301:])
        with pytest.raises(DataError, match=r"byte offset 301\b"):
            check_text_file(bad, block_bytes=block)
    trunc = tmp_path / "trunc.txt"
    trunc.write_bytes("abcé".encode()[:-1])
    with pytest.raises(DataError, match="byte offset 3"):
        check_text_file(trunc)


# ------------------------------------------------------------------------------ prepare_data.py


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("corpus")
    return write_corpus(d / "train.txt", 150, seed=0), write_corpus(d / "val.txt", 20, seed=1)


def _run_main(args, capsys) -> tuple[int, str, str]:
    rc = prepare_data.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_end_to_end_train_and_reuse(tmp_path, corpus, capsys):
    train, val = corpus
    data, tok_dir = tmp_path / "data", tmp_path / "tok"
    rc, out, err = _run_main(["--train-path", train, "--val-path", val, "--vocab-size", 300,
                              "--output-dir", data, "--tokenizer-dir", tok_dir, "--num-workers", 1], capsys)
    assert rc == 0, err
    for line in ["Training BPE Tokenizer", f"Training data: {train}", "Vocab size: 300",
                 "Special tokens: ['<|endoftext|>']", "✓ Training complete!", "  Vocabulary size: 300",
                 "  Number of merges: 43", f"✓ Tokenizer saved to {tok_dir}/", "  - vocab.pkl", "  - merges.pkl",
                 "Tokenizing Training Data", f"Tokenizing {train}...", "✓ Tokenization complete!",
                 f"✓ Saved to {data / 'train.bin'}", "Tokenizing Validation Data", f"✓ Saved to {data / 'val.bin'}"]:
        assert line in out.splitlines(), line
    tok = load_tokenizer(tok_dir)
    for name, src in (("train", train), ("val", val)):
        ids = np.memmap(data / f"{name}.bin", dtype=np.uint16)
        assert tok.decode(ids.tolist()) == src.read_text(encoding="utf-8")
        meta = read_metadata(data / f"{name}.bin")
        assert meta["num_tokens"] == len(ids) and meta["vocab_size"] == 300
    n = read_metadata(data / "train.bin")["num_tokens"]
    ratio = train.stat().st_size / (2 * n)
    assert f"  Total tokens: {n:,}" in out and f"  Compression ratio: {ratio:.2f}x" in out

    # Re-use the tokenizer on new data: same ids, same tokenizer hash.
    rc, out, err = _run_main(["--train-path", val, "--vocab-size", 300, "--output-dir", tmp_path / "again",
                              "--tokenizer-dir", tok_dir, "--use-existing-tokenizer"], capsys)
    assert rc == 0, err
    assert "Training BPE Tokenizer" not in out
    assert (tmp_path / "again" / "train.bin").read_bytes() == (data / "val.bin").read_bytes()
    assert read_metadata(tmp_path / "again" / "train.bin")["tokenizer_sha256"] == meta["tokenizer_sha256"]
    assert not (tmp_path / "again" / "val.bin").exists()


def test_corpus_too_small_for_vocab_warns_with_real_size(tmp_path, corpus, capsys):
    train, _ = corpus
    rc, out, err = _run_main(["--train-path", train, "--vocab-size", 5000, "--output-dir", tmp_path / "data",
                              "--tokenizer-dir", tmp_path / "tok", "--num-workers", 1], capsys)
    assert rc == 0, err
    real = load_tokenizer(tmp_path / "tok").vocab_size
    assert real < 5000
    assert f"set model.vocab_size: {real} in your config" in err and f"  Vocabulary size: {real}" in out
    assert read_metadata(tmp_path / "data" / "train.bin")["vocab_size"] == real


def test_interrupt_during_tokenization_leaves_no_bin(tmp_path, corpus, capsys, monkeypatch):
    train, _ = corpus

    def interrupted(bounds):
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenize_data, "_encode_range", interrupted)
    data = tmp_path / "data"
    rc, _, err = _run_main(["--train-path", train, "--vocab-size", 260, "--output-dir", data,
                            "--tokenizer-dir", tmp_path / "tok", "--num-workers", 1], capsys)
    assert rc == 130 and err.strip().splitlines()[-1].startswith("error: interrupted")
    assert list(data.iterdir()) == []


def _error_case(tmp_path, corpus, case):
    train, _ = corpus
    base = ["--vocab-size", 300, "--output-dir", tmp_path / "data", "--tokenizer-dir", tmp_path / "tok"]
    if case == "missing":
        return ["--train-path", tmp_path / "nope.txt", *base], ["not found", "nope.txt"]
    if case == "directory":
        return ["--train-path", tmp_path, *base], ["not a file"]
    if case == "empty":
        (tmp_path / "empty.txt").write_bytes(b"")
        return ["--train-path", tmp_path / "empty.txt", *base], ["empty", "empty.txt"]
    if case == "latin1":
        (tmp_path / "latin1.txt").write_bytes("café au lait\n".encode("latin-1"))
        return ["--train-path", tmp_path / "latin1.txt", *base], ["not valid UTF-8", "byte offset 3", "iconv"]
    if case == "bad_val":
        (tmp_path / "v.txt").write_bytes(b"ok\n\xc3")
        return ["--train-path", train, "--val-path", tmp_path / "v.txt", *base], ["v.txt", "byte offset 3"]
    if case == "too_small":
        return ["--train-path", train, "--vocab-size", 100], ["too small", "257"]
    if case == "too_large":
        return ["--train-path", train, "--vocab-size", 5_000_000_000], ["too large"]
    if case == "unwritable":
        (tmp_path / "afile").write_text("x")
        return ["--train-path", train, "--vocab-size", 300, "--output-dir", tmp_path / "afile" / "sub"], ["--output-dir", "afile"]
    if case == "no_tokenizer":
        return ["--train-path", train, *base, "--use-existing-tokenizer"], ["vocab.pkl", "not found", "prepare_data.py"]
    if case == "vocab_mismatch":
        tok = Tokenizer({i: bytes([i]) for i in range(256)}, [], [EOT])
        tok.save(tmp_path / "tok")
        return ["--train-path", train, *base, "--use-existing-tokenizer"], ["257", "300", "--vocab-size 257"]
    raise AssertionError(case)


ERROR_CASES = ["missing", "directory", "empty", "latin1", "bad_val", "too_small", "too_large", "unwritable", "no_tokenizer", "vocab_mismatch"]


@pytest.mark.parametrize("case", ERROR_CASES)
def test_bad_input_gives_one_clear_line(tmp_path, corpus, capsys, case):
    args, needles = _error_case(tmp_path, corpus, case)
    rc, out, err = _run_main(args, capsys)
    assert rc == EXIT_USER_ERROR
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not (tmp_path / "data" / "train.bin").exists()


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path, corpus):
    args, _ = _error_case(tmp_path, corpus, "latin1")
    proc = subprocess.run([sys.executable, str(PROJECT_ROOT / "prepare_data.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    assert proc.returncode == EXIT_USER_ERROR
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_metadata_is_json_beside_bin(tmp_path, gpt2):
    src = tmp_path / "t.txt"
    src.write_text("hi\n", encoding="utf-8")
    tokenize_file(src, tmp_path / "x.bin", gpt2, vocab_size=gpt2.vocab_size)
    assert json.loads((tmp_path / "x.bin.json").read_text())["format_version"] == FORMAT_VERSION
