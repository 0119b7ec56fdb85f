"""Tokenizer report: bytes/token checked against a direct count, the Pile arithmetic, clear input errors."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
from fixtures import fixture_path

from cs336_basics.bpe import train_bpe
from cs336_basics.common import EXIT_USER_ERROR
from cs336_basics.tokenizer import Tokenizer, load_tokenizer
from cs336_basics.tokenizer_report import PILE_BYTES, main, measure, pile_seconds, read_text


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, Path]:
    """A tiny BPE trained on corpus.en (the normal vocab.pkl/merges.pkl folder) and GPT-2's, saved the same way."""
    root = tmp_path_factory.mktemp("tokenizers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vocab, merges = train_bpe(fixture_path("corpus.en"), 400, ["<|endoftext|>"], num_workers=1)
    Tokenizer(vocab, merges, ["<|endoftext|>"]).save(root / "tiny")
    Tokenizer.from_files(fixture_path("gpt2_vocab.json"), fixture_path("gpt2_merges.txt"),
                         ["<|endoftext|>"]).save(root / "gpt2")
    return {"tiny": root / "tiny", "gpt2": root / "gpt2"}


def test_bytes_per_token_matches_a_direct_count(tokenizers, capsys):
    texts = [fixture_path("corpus.en"), fixture_path("tinystories_sample.txt")]
    args = [a for d in tokenizers.values() for a in ("--tokenizer-dir", str(d))]
    args += [a for t in texts for a in ("--text", str(t))] + ["--json", "--no-progress", "--cores", "8"]
    assert main(args) == 0
    results = json.loads(capsys.readouterr().out)
    assert [(Path(r["tokenizer"]).name, Path(r["text"]).name) for r in results] == [
        ("tiny", "corpus.en"), ("tiny", "tinystories_sample.txt"),
        ("gpt2", "corpus.en"), ("gpt2", "tinystories_sample.txt")]
    for r in results:
        text = Path(r["text"]).read_text(encoding="utf-8")
        ids = load_tokenizer(r["tokenizer"]).encode(text)
        assert r["bytes"] == len(text.encode("utf-8")) and r["tokens"] == len(ids)
        assert r["bytes_per_token"] == pytest.approx(len(text.encode("utf-8")) / len(ids))
        assert r["mb_per_s"] == pytest.approx(r["bytes"] / r["seconds"] / 1e6)
        assert r["pile_seconds"] == pytest.approx(PILE_BYTES / (r["mb_per_s"] * 1e6 * 8))
        assert r["cores"] == 8 and not r["truncated"]
    by = {(Path(r["tokenizer"]).name, Path(r["text"]).name): r["bytes_per_token"] for r in results}
    assert by["gpt2", "corpus.en"] > 2 * by["tiny", "corpus.en"]  # 50K merges compress far more than 143


def test_pile_arithmetic():
    assert pile_seconds(1.0, 1) == pytest.approx(825_000)
    assert pile_seconds(5.0, 16) == pytest.approx(825e9 / 80e6)


def test_table_output(tokenizers, capsys):
    text = fixture_path("tinystories_sample.txt")
    assert main(["--tokenizer-dir", str(tokenizers["tiny"]), "--text", str(text), "--no-progress", "--cores", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["tokenizer", "text", "read", "tokens", "bytes/token", "MB/s", "Pile", "on", "4", "cores"]
    assert str(tokenizers["tiny"]) in out[2] and str(text) in out[2]
    assert any("one process, freshly loaded tokenizer" in line for line in out)
    assert any("825 GB / (MB/s x 4 cores)" in line for line in out)


def test_progress_bar_on_request(tokenizers, capsys):
    measure(tokenizers["tiny"], fixture_path("tinystories_sample.txt"), progress=True)
    assert "tiny on tinystories_sample.txt" in capsys.readouterr().err
    measure(tokenizers["tiny"], fixture_path("tinystories_sample.txt"))
    assert capsys.readouterr().err == ""


def test_text_is_cut_at_a_character_boundary(tmp_path, tokenizers):
    path = tmp_path / "accents.txt"
    path.write_text("é" * 1000, encoding="utf-8")  # 2 bytes each
    text, n_bytes, truncated = read_text(path, 1001)  # the 501st character is cut in half
    assert (text, n_bytes, truncated) == ("é" * 500, 1000, True)
    assert read_text(path, 10_000) == ("é" * 1000, 2000, False)
    result = measure(tokenizers["tiny"], path, max_mb=1001 / 1e6)
    assert result.bytes == 1000 and result.truncated


def test_a_huge_max_mb_reads_the_whole_file(tokenizers, capsys):
    text = fixture_path("tinystories_sample.txt")
    assert main(["--tokenizer-dir", str(tokenizers["tiny"]), "--text", str(text), "--max-mb", "1e12", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["bytes"] == text.stat().st_size and not result["truncated"]


def test_gpt2_files_folder_is_accepted(tmp_path):
    shutil.copy(fixture_path("gpt2_vocab.json"), tmp_path / "vocab.json")
    shutil.copy(fixture_path("gpt2_merges.txt"), tmp_path / "merges.txt")
    result = measure(tmp_path, fixture_path("tinystories_sample.txt"))
    direct = Tokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt").encode(
        fixture_path("tinystories_sample.txt").read_text(encoding="utf-8"))
    assert result.tokens == len(direct)


def _bad_inputs(root: Path, tokenizers: dict[str, Path]) -> list[tuple[list[str], str]]:
    (root / "empty_dir").mkdir()
    (root / "garbage").mkdir()
    (root / "garbage" / "vocab.pkl").write_bytes(b"not a pickle")
    (root / "garbage" / "merges.pkl").write_bytes(b"not a pickle")
    (root / "latin1.txt").write_bytes("café".encode("latin-1"))
    (root / "empty.txt").write_text("")
    (root / "ok.txt").write_text("hello world")
    good_tok, good_text = ["--tokenizer-dir", str(tokenizers["tiny"])], ["--text", str(root / "ok.txt")]
    return [
        (["--tokenizer-dir", str(root / "nope"), *good_text], "folder not found"),
        (["--tokenizer-dir", str(root / "empty_dir"), *good_text], "vocab.pkl not found"),
        (["--tokenizer-dir", str(root / "garbage"), *good_text], "cannot load the tokenizer"),
        ([*good_tok, "--text", str(root / "missing.txt")], "file not found"),
        ([*good_tok, "--text", str(root)], "is a folder"),
        ([*good_tok, "--text", str(root / "latin1.txt")], "is not UTF-8 text (invalid byte at offset 3)"),
        ([*good_tok, "--text", str(root / "empty.txt")], "is empty"),
        ([*good_tok, *good_text, "--max-mb", "0"], "--max-mb must be a number above 0"),
        ([*good_tok, *good_text, "--max-mb", "inf"], "--max-mb must be a number above 0"),
        ([*good_tok, *good_text, "--max-mb", "nan"], "--max-mb must be a number above 0"),
        ([*good_tok, *good_text, "--max-mb", "0.0000001"], "reads less than one character"),
        ([*good_tok, *good_text, "--cores", "0"], "--cores must be at least 1"),
    ]


def test_bad_inputs_are_one_clear_line(tmp_path, tokenizers, capsys):
    for args, match in _bad_inputs(tmp_path, tokenizers):
        assert main([*args, "--no-progress"]) == EXIT_USER_ERROR, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and match in err and err.count("\n") == 1, (args, err)


def test_a_bad_input_fails_before_any_encode(tmp_path, tokenizers, capsys):
    (tmp_path / "bad.txt").write_bytes(b"\xff")
    args = ["--tokenizer-dir", str(tokenizers["gpt2"]), "--text", str(fixture_path("corpus.en")),
            "--text", str(tmp_path / "bad.txt")]
    assert main(args) == EXIT_USER_ERROR
    assert "gpt2 on corpus.en" not in capsys.readouterr().err  # no progress bar: nothing was encoded
