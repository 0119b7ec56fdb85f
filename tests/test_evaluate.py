"""Evaluation: exact whole-file loss/perplexity, window coverage, input checks, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cs336_basics.evaluate import evaluate, iter_windows, main
from test_generate import TINY, _one_thread, byte_tokenizer, make_checkpoint, tiny_model  # noqa: F401 (fixture)

EOT = "<|endoftext|>"


def reference_loss(model, tokens: np.ndarray, context_length: int) -> tuple[float, int]:
    """Per-window loop: window k predicts tokens[kC+1 : kC+C+1] from tokens[kC : kC+C], the last one shorter."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, context_length):
            window = torch.as_tensor(np.asarray(tokens[start : start + context_length + 1], dtype=np.int64))
            logits = model(window[None, :-1])[0]
            total += float(F.cross_entropy(logits.double(), window[1:], reduction="sum"))
            count += len(window) - 1
    return total / count, count


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=1)


def random_tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, TINY["vocab_size"], size=n).astype(np.uint16)


# ----------------------------------------------------------------------------- windows


def test_windows_score_every_target_exactly_once():
    for num_tokens in range(0, 70):
        for context_length in range(1, 8):
            for batch_size in (1, 2, 5):
                scored = []
                for start, rows, width in iter_windows(num_tokens, context_length, batch_size):
                    assert 1 <= rows <= batch_size and 1 <= width <= context_length
                    scored.extend(range(start + 1, start + rows * width + 1))
                assert scored == list(range(1, num_tokens)), (num_tokens, context_length, batch_size)


def test_partial_final_window_is_its_own_batch():
    # 2 full windows of 16 targets, then 5 leftover targets
    assert list(iter_windows(16 * 2 + 5 + 1, 16, 32)) == [(0, 2, 16), (32, 1, 5)]
    assert list(iter_windows(16 * 3 + 1, 16, 2)) == [(0, 2, 16), (32, 1, 16)]


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("num_tokens", [16 * 5 + 7 + 1, 16 * 3 + 1, 2, 11])
@pytest.mark.parametrize("batch_size", [1, 3, 32])
def test_loss_equals_per_window_reference(model, num_tokens, batch_size):
    tokens = random_tokens(num_tokens)
    expected, count = reference_loss(model, tokens, model.context_length)
    result = evaluate(model, tokens, batch_size=batch_size)
    assert result["num_tokens"] == count == num_tokens - 1
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-12)


def test_shorter_context_and_memmap_input(model, tmp_path):
    tokens = random_tokens(100, seed=3)
    path = tmp_path / "tokens.bin"
    tokens.tofile(path)
    mm = np.memmap(path, dtype=np.uint16, mode="r")
    expected, _ = reference_loss(model, tokens, 5)
    assert evaluate(model, mm, context_length=5, batch_size=4)["loss"] == pytest.approx(expected, rel=1e-5)


def test_random_model_loss_is_near_uniform(model):
    # a freshly initialised model predicts close to uniformly: loss ~ ln(vocab)
    loss = evaluate(model, random_tokens(500))["loss"]
    assert abs(loss - math.log(TINY["vocab_size"])) < 0.5


def test_bad_inputs(model):
    with pytest.raises(ValueError, match="context_length"):
        evaluate(model, random_tokens(50), context_length=model.context_length + 1)
    bad = random_tokens(50)
    bad[40] = TINY["vocab_size"]
    with pytest.raises(ValueError, match="outside the model's vocab"):
        evaluate(model, bad)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        evaluate(model, random_tokens(1))


def test_progress_bar_only_when_asked(model, capsys):
    evaluate(model, random_tokens(40))
    assert capsys.readouterr().err == ""
    evaluate(model, random_tokens(40), progress=True)
    assert "evaluate" in capsys.readouterr().err


def test_restores_training_mode(model):
    model.train()
    try:
        evaluate(model, random_tokens(20))
        assert model.training
    finally:
        model.eval()


# ----------------------------------------------------------------------------- CLI


@pytest.fixture()
def workspace(tmp_path: Path) -> Path:
    from cs336_basics.tokenize_data import tokenize_file

    make_checkpoint(tmp_path)
    text = tmp_path / "val.txt"
    text.write_text(("Once upon a time there was a tiny model." + EOT + "It was happy.\n") * 4, encoding="utf-8")
    tokenize_file(text, tmp_path / "val.bin", byte_tokenizer(), vocab_size=TINY["vocab_size"],
                  special_tokens=[EOT], parallel=False)
    return tmp_path


def test_cli_json_matches_library(workspace, capsys):
    from cs336_basics.data import load_tokens

    rc = main(["--checkpoint", str(workspace / "checkpoint_final.pt"), "--data", str(workspace / "val.bin"),
               "--batch-size", "2", "--device", "cpu", "--json", "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    result = json.loads(out)
    tokens = load_tokens(workspace / "val.bin")
    expected, count = reference_loss(tiny_model(), tokens, TINY["context_length"])
    assert result["num_tokens"] == count == len(tokens) - 1
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_cli_text_output(workspace, capsys):
    rc = main(["--checkpoint", str(workspace / "checkpoint_final.pt"), "--data", str(workspace / "val.bin"),
               "--device", "cpu", "--max-tokens", "50"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["loss", "perplexity", "tokens"]
    loss, ppl = float(lines[0].split()[1]), float(lines[1].split()[1])
    assert ppl == pytest.approx(math.exp(loss), rel=1e-3)
    assert lines[2] == "tokens: 49"


def _assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in err


def test_cli_user_errors(workspace, capsys):
    ckpt, data = str(workspace / "checkpoint_final.pt"), str(workspace / "val.bin")
    rc = main(["--checkpoint", ckpt, "--data", str(workspace / "missing.bin"), "--no-progress"])
    _assert_one_line_error(rc, capsys.readouterr().err, "missing.bin", "not found")

    rc = main(["--checkpoint", str(workspace / "missing.pt"), "--data", data, "--no-progress"])
    _assert_one_line_error(rc, capsys.readouterr().err, "missing.pt", "not found")

    sidecar = workspace / "val.bin.json"
    meta = json.loads(sidecar.read_text())
    meta["vocab_size"] = 10000
    sidecar.write_text(json.dumps(meta))
    rc = main(["--checkpoint", ckpt, "--data", data, "--device", "cpu", "--no-progress"])
    _assert_one_line_error(rc, capsys.readouterr().err, "10000", "257", "val.bin")

    rc = main(["--checkpoint", ckpt, "--data", data, "--batch-size", "0"])
    _assert_one_line_error(rc, capsys.readouterr().err, "--batch-size")


def test_cli_garbage_and_unsafe_checkpoints(workspace, capsys):
    data = str(workspace / "val.bin")
    garbage = workspace / "garbage.pt"
    garbage.write_bytes(b"\x80\x04 definitely not a checkpoint")
    rc = main(["--checkpoint", str(garbage), "--data", data, "--no-progress"])
    _assert_one_line_error(rc, capsys.readouterr().err, "garbage.pt is not a checkpoint")
    assert rc == 2
