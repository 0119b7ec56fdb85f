"""cs336_basics.export: the Hugging Face Llama export loads in transformers with our logits and greedy tokens;
exported tokenizers (tokenizer.json, tiktoken) give exactly our ids; what cannot be exported exactly is refused."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cs336_basics import export, fileio, hf_tokenizer
from cs336_basics.checkpoint import save_checkpoint
from cs336_basics.common import EXIT_INTERRUPTED, EXIT_OK, EXIT_USER_ERROR
from cs336_basics.config import ModelConfig
from cs336_basics.model import TransformerLM
from cs336_basics.tokenizer import Tokenizer
from fixtures import fixture_path

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
tiktoken = pytest.importorskip("tiktoken")

EOT = "<|endoftext|>"
GUIDE = Path(__file__).resolve().parent.parent / "TRAINING_GUIDE.md"
TINY = dict(vocab_size=1000, context_length=48, d_model=64, num_layers=2, num_heads=4, d_ff=96, rope_theta=500.0)
FIXTURE_TEXTS = ["tinystories_sample.txt", "corpus.en", "german.txt", "address.txt",
                 "special_token_double_newlines_non_whitespace.txt", "special_token_trailing_newlines.txt"]
# Pre-tokenization stress: whitespace of every kind and length, CRLF, contractions, digits, scripts, emoji,
# combining marks, and pieces of special tokens.
PIECES = [
    "a", "the", "The", " ", "  ", "    ", "\n", "\n\n", "\t", "\r\n", "\r\n\r\n", "\x0b", "\x0c", "\x1c", "\x85",
    "\xa0", "\u2028", "\u3000", "'", "s", "ll", "'s", "'ll", "'t", "don't", "1", "42", "2024", "!", "...", ",",
    "é", "ß", "日本語", "Привет", "مرحبا", "🙂", "👩‍👩‍👧", "e\u0301", "<", "|>", "<|endoftext", EOT,
]
texts = st.one_of(st.text(max_size=80), st.lists(st.sampled_from(PIECES), max_size=50).map("".join))


def _real_texts() -> list[str]:
    extra = "Tabs\tand\r\nCRLF\r\n\r\nlines" + " " * 300 + "x\n" + "\t" * 50 + "🙂🙂 emoji👩‍👩‍👧" + EOT + EOT + "end  "
    return [fixture_path(name).read_text(encoding="utf-8") for name in FIXTURE_TEXTS] + [extra]


# ----------------------------------------------------------------------------------------------------------------------
# Fixtures: a tokenizer trained here, GPT-2's, and a tiny checkpoint, each exported once per module


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Tokenizer, Path]:
    """A 1000-token BPE tokenizer trained by our trainer (special token first, as train_bpe orders it), saved."""
    from cs336_basics.bpe import train_bpe

    vocab, merges = train_bpe(fixture_path("corpus.en"), TINY["vocab_size"], [EOT], num_workers=1)
    tok = Tokenizer(vocab, merges, [EOT])
    folder = tmp_path_factory.mktemp("tok")
    tok.save(folder)
    return tok, folder


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    return Tokenizer.from_files(fixture_path("gpt2_vocab.json"), fixture_path("gpt2_merges.txt"), [EOT])


def _tiny_checkpoint(folder: Path, seed: int = 0, **overrides) -> tuple[TransformerLM, Path]:
    config = {**TINY, **overrides}
    torch.manual_seed(seed)
    model = TransformerLM(ModelConfig(**config)).eval()
    with torch.no_grad():  # non-trivial norm gains, so a misplaced norm weight shows in the logits
        for module in model.modules():
            if hasattr(module, "eps"):
                module.weight.uniform_(0.5, 1.5)
    path = folder / "checkpoint_final.pt"
    save_checkpoint(model, None, 7, path, config={"model": config, "training": {}})
    return model, path


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> tuple[TransformerLM, Path]:
    tok, tok_dir = trained
    folder = tmp_path_factory.mktemp("export")
    model, ckpt = _tiny_checkpoint(folder)
    assert export.main(["hf", "--checkpoint", str(ckpt), "--tokenizer-dir", str(tok_dir),
                        "--out", str(folder / "hf")]) == EXIT_OK
    return model, folder / "hf"


@pytest.fixture(scope="module")
def hf_model(exported):
    return transformers.LlamaForCausalLM.from_pretrained(exported[1]).eval()


# ----------------------------------------------------------------------------------------------------------------------
# The model


def test_export_folder_and_config(exported, trained):
    model, out = exported
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json",
        "tokenizer.tiktoken", "tokenizer_config.json"]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["vocab_size"], config["hidden_size"], config["intermediate_size"]) == (1000, 64, 96)
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (2, 4, 4)
    assert config["max_position_embeddings"] == 48 and config["rope_theta"] == 500.0
    assert config["rms_norm_eps"] == 1e-5 and config["tie_word_embeddings"] is False
    assert config["eos_token_id"] == trained[0].eot_id == 0
    hf_config = transformers.AutoConfig.from_pretrained(out)
    assert hf_config.rope_parameters["rope_theta"] == 500.0 and hf_config.rms_norm_eps == 1e-5

    from safetensors import safe_open

    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"]  # not private when the rest is readable
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
        assert f.get_tensor("model.layers.1.self_attn.v_proj.weight").equal(model.layers[1].attn.v_proj.weight)
    assert len(keys) == 3 + 9 * 2 and "lm_head.weight" in keys and "model.layers.1.mlp.gate_proj.weight" in keys


def test_logits_match_ours(exported, hf_model):
    model, _ = exported
    torch.manual_seed(1)
    ids = torch.randint(0, TINY["vocab_size"], (3, TINY["context_length"]))
    with torch.no_grad():
        ours, theirs = model(ids), hf_model(ids).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-4
    assert ours.abs().max().item() > 1  # logits of a size where a wrong weight would show


def test_greedy_generation_matches_ours(exported, hf_model, trained):
    from cs336_basics.generate import generate

    model, _ = exported
    tok = trained[0]
    for prompt in ["Once upon a time", "The", "it was 42 degrees\n\n"]:
        prompt_ids = tok.encode(prompt)
        n = TINY["context_length"] - len(prompt_ids)
        ours = generate(model, prompt_ids, n, temperature=0.0, eos_id=tok.eot_id)
        out = hf_model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False,
                                attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
        theirs = out[0, len(prompt_ids):].tolist()
        if theirs and theirs[-1] == tok.eot_id:  # HF keeps the end-of-text token it stopped at, ours drops it
            theirs = theirs[:-1]
        assert theirs == ours and len(ours) > 5


def test_rope_permutation_is_what_makes_it_match(exported, tmp_path, monkeypatch):
    """Without reordering the q/k rows the export loads but computes something else: the check can fail."""
    model, out = exported
    _, ckpt = _tiny_checkpoint(tmp_path)
    monkeypatch.setattr(export, "interleaved_to_half", lambda w, h: w)
    export.export_hf(ckpt, tmp_path / "wrong", None)
    wrong = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "wrong").eval()
    ids = torch.randint(0, TINY["vocab_size"], (1, TINY["context_length"]))
    with torch.no_grad():
        assert (model(ids) - wrong(ids).logits).abs().max().item() > 1e-2


def test_interleaved_to_half_moves_pairs_to_halves():
    w = torch.arange(2 * 6, dtype=torch.float32)[:, None].expand(12, 3)  # 2 heads of 6 rows
    assert w_rows(export.interleaved_to_half(w, 2)) == [0, 2, 4, 1, 3, 5, 6, 8, 10, 7, 9, 11]


def w_rows(w: torch.Tensor) -> list[int]:
    return [int(x) for x in w[:, 0]]


def test_bfloat16_export(tmp_path):
    _, ckpt = _tiny_checkpoint(tmp_path)
    export.export_hf(ckpt, tmp_path / "bf16", None, dtype="bfloat16")
    from safetensors import safe_open

    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize("switch,value", [("norm", "none"), ("norm_position", "post"),
                                          ("position_embedding", "none"), ("ffn", "silu")])
def test_ablations_are_not_llamas(tmp_path, capsys, switch, value):
    _, ckpt = _tiny_checkpoint(tmp_path, **{switch: value, "d_ff": None})
    rc = export.main(["hf", "--checkpoint", str(ckpt), "--tokenizer-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == EXIT_USER_ERROR and len(err) == 1, err
    assert f"model.{switch}={value}" in err[0] and "not a Llama" in err[0]
    assert not (tmp_path / "o").exists()


def _cli_error(capsys, argv: list[str]) -> str:
    rc = export.main([str(a) for a in argv])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc == EXIT_USER_ERROR and len(lines) == 1 and lines[0].startswith("error: "), captured
    return lines[0]


def test_bad_checkpoints_and_tokenizers_are_one_line(tmp_path, trained, capsys):
    _, tok_dir = trained
    _, ckpt = _tiny_checkpoint(tmp_path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(ckpt.read_bytes()[:5000])
    out = tmp_path / "out"
    for bad in (garbage, truncated, tmp_path / "missing.pt"):
        assert str(bad) in _cli_error(capsys, ["hf", "--checkpoint", bad, "--tokenizer-dir", tok_dir, "--out", out])
    line = _cli_error(capsys, ["hf", "--checkpoint", ckpt, "--tokenizer-dir", tmp_path / "none", "--out", out])
    assert "vocab.pkl" in line and "--tokenizer-dir" in line
    small = tmp_path / "small"
    Tokenizer({i: bytes([i]) for i in range(256)}, [], [EOT]).save(small)
    line = _cli_error(capsys, ["hf", "--checkpoint", ckpt, "--tokenizer-dir", small, "--out", out])
    assert "257 tokens" in line and "vocab_size 1000" in line
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_out_folder_rules(tmp_path, trained, capsys):
    _, tok_dir = trained
    _, ckpt = _tiny_checkpoint(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["hf", "--checkpoint", ckpt, "--tokenizer-dir", tok_dir, "--out", out]
    assert "--overwrite" in _cli_error(capsys, args)
    assert (out / "keep.txt").read_text() == "mine"
    assert export.main([str(a) for a in args] + ["--overwrite"]) == EXIT_OK
    assert (out / "config.json").is_file() and not (out / "keep.txt").exists()
    assert "is a file" in _cli_error(capsys, ["hf", "--checkpoint", ckpt, "--tokenizer-dir", tok_dir, "--out", ckpt])
    assert "cannot write" in _cli_error(capsys, ["hf", "--checkpoint", ckpt, "--tokenizer-dir", tok_dir,
                                                 "--out", ckpt / "sub"])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export.main(["hf", "--checkpoint", str(ckpt), "--tokenizer-dir", str(tok_dir), "--out", str(empty)]) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_full_disk_is_one_line_before_writing(tmp_path, trained, capsys, monkeypatch):
    import collections

    _, tok_dir = trained
    _, ckpt = _tiny_checkpoint(tmp_path)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(export.shutil, "disk_usage", lambda path: usage(10 << 30, 10 << 30, 1 << 20))
    line = _cli_error(capsys, ["hf", "--checkpoint", ckpt, "--tokenizer-dir", tok_dir, "--out", tmp_path / "o"])
    assert "no space left" in line and "1.0 MB free" in line
    assert not (tmp_path / "o").exists()


def test_interrupted_export_leaves_nothing(tmp_path, trained, capsys, monkeypatch):
    import safetensors.torch

    _, tok_dir = trained
    _, ckpt = _tiny_checkpoint(tmp_path)

    def interrupted(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    rc = export.main(["hf", "--checkpoint", str(ckpt), "--tokenizer-dir", str(tok_dir), "--out", str(tmp_path / "o")])
    assert rc == EXIT_INTERRUPTED and "nothing was written" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_final.pt"]


def test_stale_temporary_folder_of_a_killed_export_is_removed(tmp_path):
    _, ckpt = _tiny_checkpoint(tmp_path)
    stale = tmp_path / f".out.{fileio._host()}.999999999.tmp"  # a pid that cannot exist
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    old = tmp_path / f".out.old.{fileio._host()}.999999999.tmp"  # the previous --out of a killed --overwrite
    old.mkdir()
    (old / "config.json").write_text("{}")
    export.export_hf(ckpt, tmp_path / "out", None)
    assert not stale.exists() and not old.exists() and (tmp_path / "out" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizers


def _tiktoken_from_guide(folder: Path):
    """Run the tiktoken snippet of TRAINING_GUIDE.md on ``folder``; return its ``enc``."""
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(encoding="utf-8"), flags=re.S)
    snippet = next(b for b in blocks if "load_tiktoken_bpe" in b)
    assert 'folder = "exported"' in snippet
    namespace: dict = {}
    exec(snippet.replace('folder = "exported"', f"folder = {str(folder)!r}"), namespace)
    return namespace["enc"]


@pytest.fixture(scope="module")
def engines(exported):
    """(HF tokenizers, transformers AutoTokenizer, tiktoken) built from the export of the trained tokenizer."""
    out = exported[1]
    return (tokenizers.Tokenizer.from_file(str(out / "tokenizer.json")),
            transformers.AutoTokenizer.from_pretrained(out), _tiktoken_from_guide(out))


def _assert_same(tok: Tokenizer, hf, auto, enc, text: str) -> None:
    ids = tok.encode(text)
    assert hf.encode(text).ids == ids
    assert auto(text)["input_ids"] == ids
    assert enc.encode(text, allowed_special="all") == ids
    expected = tok.decode(ids)
    assert hf.decode(ids, skip_special_tokens=False) == expected
    assert auto.decode(ids) == expected
    assert enc.decode(ids) == expected


def test_exported_tokenizers_give_our_ids_on_real_text(trained, engines):
    tok = trained[0]
    for text in _real_texts():
        _assert_same(tok, *engines, text)
        assert tok.decode(tok.encode(text)) == text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts)
def test_exported_tokenizers_give_our_ids_on_any_text(trained, engines, text):
    _assert_same(trained[0], *engines, text)


def test_gpt2_exports_exactly(gpt2, tmp_path):
    gpt2.save(tmp_path / "gpt2")
    export.export_tokenizer(tmp_path / "gpt2", tmp_path / "out")
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "out" / "tokenizer.json"))
    enc = _tiktoken_from_guide(tmp_path / "out")
    for text in _real_texts():
        ids = gpt2.encode(text)
        assert hf.encode(text).ids == ids == fast(text)["input_ids"] == enc.encode(text, allowed_special="all")
        assert enc.decode(ids) == fast.decode(ids) == text
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert auto.eos_token == EOT and auto.eos_token_id == 50256


def test_tokenizer_cli_and_round_trip_through_import(trained, tmp_path, capsys):
    tok, tok_dir = trained
    assert export.main(["tokenizer", "--tokenizer-dir", str(tok_dir), "--out", str(tmp_path / "t")]) == EXIT_OK
    assert "tokenizer.json" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer.tiktoken", "tokenizer_config.json"]
    back = hf_tokenizer.read_tokenizer(tmp_path / "t" / "tokenizer.json")
    assert back.vocab == tok.vocab and back.merges == tok.merges and back.special_tokens == tok.special_tokens
    # --tokenizer-dir may also name a tokenizer.json itself
    assert export.main(["tokenizer", "--tokenizer-dir", str(tmp_path / "t" / "tokenizer.json"),
                        "--out", str(tmp_path / "t2")]) == EXIT_OK
    assert (tmp_path / "t2" / "tokenizer.json").read_text() == (tmp_path / "t" / "tokenizer.json").read_text()


# What a format cannot express is refused in one line, and the refusal is justified: the format really disagrees.


def _bytes_vocab() -> dict[int, bytes]:
    return {i: bytes([i]) for i in range(256)}


def test_duplicate_tokens_are_refused_by_both_formats(tmp_path, capsys):
    vocab = {**_bytes_vocab(), 256: b"ab", 257: b"ab"}
    Tokenizer(vocab, [(b"a", b"b")]).save(tmp_path / "dup")
    line = _cli_error(capsys, ["tokenizer", "--tokenizer-dir", tmp_path / "dup", "--out", tmp_path / "o"])
    assert "ids 256 and 257 are the same token b'ab'" in line
    assert not (tmp_path / "o").exists()


def test_tiktoken_refused_but_tokenizer_json_written_when_only_tiktoken_would_disagree(tmp_path, capsys):
    # "abc" is a token the merges never make from a + bc, but tiktoken builds any adjacent pair that is a token.
    vocab = {**_bytes_vocab(), 256: b"bc", 257: b"ab", 258: b"abc"}
    tok = Tokenizer(vocab, [(b"b", b"c"), (b"a", b"b"), (b"ab", b"c")])
    tok.save(tmp_path / "tok")
    assert export.main(["tokenizer", "--tokenizer-dir", str(tmp_path / "tok"), "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: cannot write a tiktoken ranks file") and "b'abc'" in err[0]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    assert tokenizers.Tokenizer.from_file(str(tmp_path / "o" / "tokenizer.json")).encode("abc").ids == \
        tok.encode("abc") == [97, 256]
    # The refusal is right: a tiktoken Encoding of these ranks gives another id.
    from cs336_basics.pretokenize import GPT2_PATTERN

    enc = tiktoken.Encoding("t", pat_str=GPT2_PATTERN, mergeable_ranks={b: i for i, b in vocab.items()},
                            special_tokens={})
    assert enc.encode("abc") == [258]


@pytest.mark.parametrize("case", ["same_token_twice", "ids_out_of_merge_order"])
def test_tiktoken_order_conditions(case, capsys):
    if case == "same_token_twice":
        vocab = {**_bytes_vocab(), 256: b"ab", 257: b"bc", 258: b"abc"}
        merges = [(b"a", b"b"), (b"b", b"c"), (b"ab", b"c"), (b"a", b"bc")]
        needle = "both make b'abc'"
    else:
        vocab = {**_bytes_vocab(), 256: b"cd", 257: b"ab"}
        merges = [(b"a", b"b"), (b"c", b"d")]
        needle = "ids must follow merge order"
    with pytest.raises(hf_tokenizer.NotExpressibleError, match=needle):
        hf_tokenizer.tiktoken_ranks(Tokenizer(vocab, merges))
    hf_tokenizer.hf_tokenizer_json(Tokenizer(vocab, merges))  # Hugging Face applies merges by rank: fine


@pytest.mark.parametrize("special,needle", [("<|début|>", "would decode to other text"),  # é is a byte symbol
                                            ("Ġt", "would decode to other text"),
                                            (" t", "also made by a merge")])  # Hugging Face spells b" t" "Ġt"
def test_special_tokens_hf_cannot_express_are_refused(special, needle):
    tok = Tokenizer({**_bytes_vocab(), 256: b" t"}, [(b" ", b"t")], [special])
    with pytest.raises(hf_tokenizer.NotExpressibleError, match=needle):
        hf_tokenizer.hf_tokenizer_json(tok)


def test_special_tokens_outside_the_byte_alphabet_export_exactly(tmp_path):
    tok = Tokenizer(_bytes_vocab(), [], ["<|im start|>", "<|终|>", EOT])
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(hf_tokenizer.hf_tokenizer_json(tok)), encoding="utf-8")
    hf = tokenizers.Tokenizer.from_file(str(path))
    text = "a<|im start|>b <|终|>  <|endoftext|>"
    assert hf.encode(text).ids == tok.encode(text)
    assert hf.decode(tok.encode(text), skip_special_tokens=False) == text
