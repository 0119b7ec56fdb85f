"""Tokenizer files: pickles are read without running code, damaged ones give one line, and tokenizers trained
elsewhere (Hugging Face tokenizer.json, GPT-2 vocab.json + merges.txt) are imported with the same ids."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

import prepare_data
from cs336_basics import export
from cs336_basics.common import EXIT_OK, EXIT_USER_ERROR, UserError
from cs336_basics.data import read_metadata, tokenizer_sha256
from cs336_basics.hf_tokenizer import hf_tokenizer_json, read_hf_tokenizer_json, read_tokenizer
from cs336_basics.stories import write_corpus
from cs336_basics.tokenizer import Tokenizer, TokenizerFileError, load_tokenizer, tokenizer_files
from fixtures import fixture_path

tokenizers = pytest.importorskip("tokenizers")

EOT = "<|endoftext|>"
TEXT = "Once upon a time, a girl named Lily 🙂 said: \"don't\"\r\n\r\n   42 dogs\t\tran.<|endoftext|>The end.  \n"


def _small() -> Tokenizer:
    vocab = {i: bytes([i]) for i in range(256)}
    merges = [(b" ", b"t"), (b" t", b"h"), (b"h", b"e"), (b" th", b"e")]
    for a, b in merges:
        vocab[len(vocab)] = a + b
    return Tokenizer(vocab, merges, [EOT])


class _Touch:
    """Unpickling this would create ``path`` (what an attacker's payload would do, harmlessly)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


class _System:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


# ----------------------------------------------------------------------------------------------------------------------
# Pickles are read without running code


@pytest.mark.parametrize("payload", [_Touch, _System])
@pytest.mark.parametrize("which", ["vocab.pkl", "merges.pkl"])
def test_a_pickle_that_would_run_code_is_refused(tmp_path, payload, which):
    _small().save(tmp_path)
    victim = tmp_path / "pwned"
    good = pickle.loads((tmp_path / which).read_bytes())
    evil = {**good, 10_000: payload(victim)} if which == "vocab.pkl" else good + [payload(victim)]
    (tmp_path / which).write_bytes(pickle.dumps(evil))
    with pytest.raises(TokenizerFileError) as info:
        load_tokenizer(tmp_path)
    message = str(info.value)
    assert "refused" in message and which in message and "\n" not in message
    assert ("open" if payload is _Touch else "system") in message
    assert not victim.exists()


def test_prepare_data_refuses_a_malicious_tokenizer_in_one_line(tmp_path, capsys):
    tok_dir = tmp_path / "tok"
    _small().save(tok_dir)
    victim = tmp_path / "pwned"
    (tok_dir / "vocab.pkl").write_bytes(pickle.dumps(_System(victim)))
    train = tmp_path / "train.txt"
    train.write_text("hello world\n")
    rc = prepare_data.main(["--train-path", str(train), "--vocab-size", "261", "--output-dir", str(tmp_path / "d"),
                            "--tokenizer-dir", str(tok_dir), "--use-existing-tokenizer", "--num-workers", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == EXIT_USER_ERROR and len(err) == 1 and "refused to load" in err[0] and "vocab.pkl" in err[0], err
    assert not victim.exists() and not (tmp_path / "d" / "train.bin").exists()


def _damaged(tmp_path: Path, case: str) -> Path:
    _small().save(tmp_path)
    path = tmp_path / "vocab.pkl"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": os.urandom(64) + b"x",
                      "text": b"this is not a pickle\n", "json": b'{"0": "a"}'}[case])
    return path


@pytest.mark.parametrize("case", ["truncated", "empty", "garbage", "text", "json"])
def test_damaged_pickles_are_one_line(tmp_path, case):
    path = _damaged(tmp_path, case)
    with pytest.raises(TokenizerFileError) as info:
        load_tokenizer(tmp_path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message and "prepare_data.py" in message


@pytest.mark.parametrize("case", ["truncated", "garbage"])
def test_prepare_data_with_a_damaged_tokenizer_is_one_line(tmp_path, capsys, case):
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    _damaged(tok_dir, case)
    train = tmp_path / "train.txt"
    train.write_text("hello world\n")
    rc = prepare_data.main(["--train-path", str(train), "--vocab-size", "261", "--output-dir", str(tmp_path / "d"),
                            "--tokenizer-dir", str(tok_dir), "--use-existing-tokenizer", "--num-workers", "1"])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert rc == EXIT_USER_ERROR and len(err) == 1 and err[0].startswith("error: ") and "vocab.pkl" in err[0], err
    assert "Traceback" not in captured.err


@pytest.mark.parametrize("protocol", [0, 2, 4, pickle.HIGHEST_PROTOCOL])
def test_pickles_of_any_protocol_load(tmp_path, protocol):
    """Protocols 0-2 store bytes through _codecs.encode(str, 'latin1'), the one global that is allowed."""
    tok = _small()
    (tmp_path / "vocab.pkl").write_bytes(pickle.dumps(tok.vocab, protocol=protocol))
    (tmp_path / "merges.pkl").write_bytes(pickle.dumps(tok.merges, protocol=protocol))
    loaded = load_tokenizer(tmp_path, [EOT])
    assert loaded.vocab == tok.vocab and loaded.merges == tok.merges and loaded.encode(TEXT) == tok.encode(TEXT)


def test_allowed_global_cannot_be_misused(tmp_path):
    _small().save(tmp_path)
    # _codecs.encode("x", "rot13") by hand: the allowed global with another codec is refused.
    crafted = b"\x80\x02}q\x00K\x00c_codecs\nencode\nq\x01X\x01\x00\x00\x00xX\x05\x00\x00\x00rot13\x86R s."
    (tmp_path / "vocab.pkl").write_bytes(crafted)
    with pytest.raises(TokenizerFileError, match="not a tokenizer pickle"):
        load_tokenizer(tmp_path)


def test_saved_format_is_unchanged(tmp_path):
    """Still plain pickles of dict[int, bytes] and list[tuple[bytes, bytes]], readable by any pickle.load."""
    tok = _small()
    tok.save(tmp_path)
    assert pickle.load(io.BytesIO((tmp_path / "vocab.pkl").read_bytes())) == tok.vocab
    assert pickle.load(io.BytesIO((tmp_path / "merges.pkl").read_bytes())) == tok.merges
    assert json.loads((tmp_path / "special_tokens.json").read_text()) == [EOT]


def test_bad_special_tokens_json_is_one_line(tmp_path):
    _small().save(tmp_path)
    (tmp_path / "special_tokens.json").write_text("[\"<|endoftext|>\"")
    with pytest.raises(TokenizerFileError, match="special_tokens.json is not JSON"):
        load_tokenizer(tmp_path)


def test_bad_gpt2_files_are_one_line(tmp_path):
    shutil.copy(fixture_path("gpt2_merges.txt"), tmp_path / "merges.txt")
    (tmp_path / "vocab.json").write_text('{"a": 0, "\\u4e00": 1}')  # a character outside GPT-2's byte alphabet
    with pytest.raises(TokenizerFileError, match="vocab.json is not a GPT-2 style vocab.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.json").write_text("{")
    with pytest.raises(TokenizerFileError, match="not a GPT-2 style vocab.json"):
        load_tokenizer(tmp_path)
    shutil.copy(fixture_path("gpt2_vocab.json"), tmp_path / "vocab.json")
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ t h\n")
    with pytest.raises(TokenizerFileError, match="merges.txt is not a GPT-2 style merges.txt"):
        load_tokenizer(tmp_path)


# ----------------------------------------------------------------------------------------------------------------------
# Importing tokenizers trained elsewhere


@pytest.fixture(scope="module")
def hf_trained(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer trained and saved by Hugging Face `tokenizers` itself (not by our exporter)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train([str(fixture_path("corpus.en")), str(fixture_path("tinystories_sample.txt"))], trainer)
    folder = tmp_path_factory.mktemp("hf")
    hf.save(str(folder / "tokenizer.json"))
    return folder


def test_import_hf_trained_tokenizer_json_gives_its_ids(hf_trained):
    hf = tokenizers.Tokenizer.from_file(str(hf_trained / "tokenizer.json"))
    tok = load_tokenizer(hf_trained)  # a folder with only tokenizer.json
    assert tok.special_tokens == [EOT] and tok.vocab_size == hf.get_vocab_size() == 600
    for text in [TEXT, fixture_path("tinystories_sample.txt").read_text(), fixture_path("german.txt").read_text()]:
        assert tok.encode(text) == hf.encode(text).ids
        assert tok.decode(tok.encode(text)) == text


def test_import_gpt2_folder(tmp_path):
    for name in ("gpt2_vocab.json", "gpt2_merges.txt"):
        shutil.copy(fixture_path(name), tmp_path / name.removeprefix("gpt2_"))
    reference = Tokenizer.from_files(fixture_path("gpt2_vocab.json"), fixture_path("gpt2_merges.txt"), [EOT])
    tok = load_tokenizer(tmp_path, [EOT])
    assert tok.vocab == reference.vocab and tok.encode(TEXT) == reference.encode(TEXT)
    assert read_tokenizer(tmp_path / "vocab.json", [EOT]).encode(TEXT) == reference.encode(TEXT)


def test_our_pickles_come_before_a_foreign_tokenizer(tmp_path):
    for name in ("gpt2_vocab.json", "gpt2_merges.txt"):
        shutil.copy(fixture_path(name), tmp_path / name.removeprefix("gpt2_"))
    assert [p.name for p in tokenizer_files(tmp_path)] == ["vocab.json", "merges.txt"]
    (tmp_path / "tokenizer.json").write_text("{}")
    assert [p.name for p in tokenizer_files(tmp_path)] == ["tokenizer.json"]
    ours = _small()
    ours.save(tmp_path)
    (tmp_path / "merges.pkl").unlink()  # one of ours is enough to rule the foreign ones out: the other is missing
    assert [p.name for p in tokenizer_files(tmp_path)] == ["vocab.pkl", "merges.pkl"]
    with pytest.raises(FileNotFoundError, match="merges.pkl"):
        load_tokenizer(tmp_path)
    ours.save(tmp_path)
    assert load_tokenizer(tmp_path).vocab == ours.vocab
    assert tokenizer_files(tmp_path / "nothing") == []


def test_read_tokenizer_adds_special_tokens_to_those_saved_with_our_pickles(tmp_path):
    _small().save(tmp_path)
    tok = read_tokenizer(tmp_path, ["<|pad|>", EOT])
    assert tok.special_tokens == [EOT, "<|pad|>"] and tok.encode("<|pad|>") == [tok.vocab_size - 1]
    assert load_tokenizer(tmp_path, ["<|pad|>"]).special_tokens == ["<|pad|>"]  # load_tokenizer's replace them


def test_our_export_round_trips(tmp_path):
    tok = Tokenizer({**{i: bytes([i]) for i in range(256)}, 256: b" t"}, [(b" ", b"t")], [EOT, "<|im start|>"])
    (tmp_path / "tokenizer.json").write_text(json.dumps(hf_tokenizer_json(tok)), encoding="utf-8")
    vocab, merges, specials = read_hf_tokenizer_json(tmp_path / "tokenizer.json")
    assert vocab == tok.vocab and merges == tok.merges and specials == tok.special_tokens


def _edited(hf_trained: Path, tmp_path: Path, edit) -> Path:
    data = json.loads((hf_trained / "tokenizer.json").read_text(encoding="utf-8"))
    edit(data)
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    return tmp_path


REFUSALS = {
    "normalizer": (lambda d: d.update(normalizer={"type": "Lowercase"}), "normalizer"),
    "metaspace": (lambda d: d.update(pre_tokenizer={"type": "Metaspace", "replacement": "▁"}), "pre-tokenizer"),
    "prefix_space": (lambda d: d["pre_tokenizer"].update(add_prefix_space=True), "pre-tokenizer"),
    "llama3_regex": (lambda d: d.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"(?i:'s|'t)|\p{N}{1,3}"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}), "pre-tokenizer"),
    "wordpiece": (lambda d: d["model"].update(type="WordPiece"), "WordPiece"),
    "ignore_merges": (lambda d: d["model"].update(ignore_merges=True), "ignore_merges"),
    "lstrip": (lambda d: d["added_tokens"][0].update(lstrip=True), "lstrip"),
    "not_byte_level": (lambda d: d["model"]["vocab"].update({"中": 5000}), "byte alphabet"),
    "no_vocab": (lambda d: d.pop("model"), "no model.vocab"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_tokenizers_we_cannot_reproduce_are_refused(hf_trained, tmp_path, case):
    edit, needle = REFUSALS[case]
    folder = _edited(hf_trained, tmp_path, edit)
    with pytest.raises(TokenizerFileError) as info:
        load_tokenizer(folder)
    assert needle in str(info.value) and "tokenizer.json" in str(info.value) and "\n" not in str(info.value)


def test_gpt2_style_split_pretokenizer_is_accepted(hf_trained, tmp_path):
    from cs336_basics.pretokenize import GPT2_PATTERN

    folder = _edited(hf_trained, tmp_path, lambda d: d.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": GPT2_PATTERN}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}))
    hf = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert load_tokenizer(folder).encode(TEXT) == hf.encode(TEXT).ids


def test_not_json_is_one_line(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerFileError, match="not a tokenizer.json"):
        load_tokenizer(tmp_path)


# ----------------------------------------------------------------------------------------------------------------------
# prepare_data.py --use-existing-tokenizer with a tokenizer trained elsewhere, and the import command


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "train.txt"
    write_corpus(path, 40, seed=3)
    return path


def _prepare(capsys, corpus: Path, tok_dir: Path, out: Path, vocab_size: int) -> tuple[int, str, str]:
    rc = prepare_data.main(["--train-path", str(corpus), "--vocab-size", str(vocab_size), "--output-dir", str(out),
                            "--tokenizer-dir", str(tok_dir), "--use-existing-tokenizer", "--num-workers", "1"])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _check_bin(out: Path, tok_dir: Path, corpus: Path, expected_ids: list[int]) -> None:
    meta = read_metadata(out / "train.bin")
    ids = np.fromfile(out / "train.bin", dtype=meta["dtype"]).tolist()
    assert ids == expected_ids
    assert meta["tokenizer_sha256"] == tokenizer_sha256(tok_dir / "vocab.pkl", tok_dir / "merges.pkl")
    assert load_tokenizer(tok_dir).decode(ids) == corpus.read_text(encoding="utf-8")


def test_prepare_data_imports_a_tokenizer_json_folder(hf_trained, corpus, tmp_path, capsys):
    tok_dir = tmp_path / "hf"
    shutil.copytree(hf_trained, tok_dir)
    rc, out, err = _prepare(capsys, corpus, tok_dir, tmp_path / "data", 600)
    assert rc == EXIT_OK, err
    assert f"✓ Imported tokenizer.json from {tok_dir}/ (saved as vocab.pkl + merges.pkl beside it)" in out
    assert sorted(p.name for p in tok_dir.iterdir()) == ["merges.pkl", "special_tokens.json", "tokenizer.json",
                                                         "vocab.pkl"]
    hf = tokenizers.Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    _check_bin(tmp_path / "data", tok_dir, corpus, hf.encode(corpus.read_text(encoding="utf-8")).ids)

    # Run again: the pickles now come first, same ids, same hash.
    rc, out, err = _prepare(capsys, corpus, tok_dir, tmp_path / "again", 600)
    assert rc == EXIT_OK and "Imported" not in out
    assert (tmp_path / "again" / "train.bin").read_bytes() == (tmp_path / "data" / "train.bin").read_bytes()


def test_prepare_data_imports_gpt2_files(corpus, tmp_path, capsys):
    tok_dir = tmp_path / "gpt2"
    tok_dir.mkdir()
    for name in ("gpt2_vocab.json", "gpt2_merges.txt"):
        shutil.copy(fixture_path(name), tok_dir / name.removeprefix("gpt2_"))
    rc, out, err = _prepare(capsys, corpus, tok_dir, tmp_path / "data", 50257)
    assert rc == EXIT_OK, err
    assert "✓ Imported vocab.json + merges.txt" in out
    gpt2 = Tokenizer.from_files(fixture_path("gpt2_vocab.json"), fixture_path("gpt2_merges.txt"), [EOT])
    _check_bin(tmp_path / "data", tok_dir, corpus, gpt2.encode(corpus.read_text(encoding="utf-8")))


def test_prepare_data_import_errors_are_one_line(hf_trained, corpus, tmp_path, capsys):
    wrong_size = tmp_path / "a"
    shutil.copytree(hf_trained, wrong_size)
    rc, _, err = _prepare(capsys, corpus, wrong_size, tmp_path / "data", 1000)
    assert rc == EXIT_USER_ERROR and "vocab size 600" in err and len(err.strip().splitlines()) == 1
    assert not (wrong_size / "vocab.pkl").exists()  # nothing imported when it cannot be used
    (tmp_path / "b").mkdir()
    bad = _edited(hf_trained, tmp_path / "b", lambda d: d.update(normalizer={"type": "NFKC"}))
    rc, _, err = _prepare(capsys, corpus, bad, tmp_path / "data", 600)
    assert rc == EXIT_USER_ERROR and "normalizer" in err and len(err.strip().splitlines()) == 1


def test_import_command_then_prepare_data(hf_trained, corpus, tmp_path, capsys):
    out = tmp_path / "tokenizer"
    assert export.main(["import-tokenizer", str(hf_trained / "tokenizer.json"), "--out", str(out)]) == EXIT_OK
    assert "✓ Imported" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["merges.pkl", "special_tokens.json", "vocab.pkl"]
    rc, _, err = _prepare(capsys, corpus, out, tmp_path / "data", 600)
    assert rc == EXIT_OK, err
    hf = tokenizers.Tokenizer.from_file(str(hf_trained / "tokenizer.json"))
    _check_bin(tmp_path / "data", out, corpus, hf.encode(corpus.read_text(encoding="utf-8")).ids)

    # Never replaces a tokenizer silently; a missing source is one line.
    assert export.main(["import-tokenizer", str(hf_trained / "tokenizer.json"), "--out", str(out)]) == EXIT_USER_ERROR
    assert "--overwrite" in capsys.readouterr().err
    assert export.main(["import-tokenizer", str(tmp_path / "nope.json"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.json" in err[0]
    assert isinstance(TokenizerFileError("x"), UserError) and isinstance(TokenizerFileError("x"), ValueError)
