"""Text generation: KV-cache vs full recompute, nucleus filtering, temperature, eos, streaming decode, CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cs336_basics.config import ModelConfig
from cs336_basics.generate import TextStreamer, generate, main, sample_next, stream_tokens, top_p_filter
from cs336_basics.model import TransformerLM
from cs336_basics.tokenizer import Tokenizer

PROJECT_ROOT = Path(__file__).resolve().parent.parent
EOT = "<|endoftext|>"
# 256 byte tokens + <|endoftext|> (id 256): the vocab of the CLI tests' tokenizer.
TINY = dict(vocab_size=257, context_length=16, d_model=32, num_layers=2, num_heads=4, d_ff=64, rope_theta=10000.0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny per-token ops: intra-op threads only add sync overhead (very costly on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(seed: int = 0, **overrides) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(ModelConfig(**{**TINY, **overrides})).eval()


def byte_tokenizer(special_tokens=(EOT,)) -> Tokenizer:
    return Tokenizer({i: bytes([i]) for i in range(256)}, [], list(special_tokens))


def make_checkpoint(directory: Path, *, seed: int = 0, tokenizer_dir: str | None = None, **overrides) -> Path:
    """A tiny random TransformerLM saved the way training saves it; returns the checkpoint path."""
    from cs336_basics.checkpoint import save_checkpoint

    model = tiny_model(seed, **overrides)
    path = directory / "checkpoint_final.pt"
    config = {
        "model": {**TINY, **overrides},
        "training": {},
        "data": {"tokenizer_dir": tokenizer_dir if tokenizer_dir is not None else str(directory / "tokenizer")},
    }
    save_checkpoint(model, None, 0, path, config=config)  # torch.optim would import torch._dynamo (slow)
    return path


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-6, rtol: float = 1e-6) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol), (actual, expected)


def reference_greedy(model: TransformerLM, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding written out directly: argmax of the logits for the last context_length tokens."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            window = torch.tensor([tokens[-model.context_length :]])
            tokens.append(int(model(window)[0, -1].argmax()))
    return tokens[len(prompt) :]


# ----------------------------------------------------------------------------- KV cache


@pytest.fixture(scope="module")
def model() -> TransformerLM:
    return tiny_model()


PROMPT = [72, 101, 108, 108, 111]


def test_greedy_with_and_without_cache_match_reference_beyond_context(model):
    n = 3 * model.context_length  # runs well past the context: exercises the sliding-window re-prefill
    expected = reference_greedy(model, PROMPT, n)
    assert generate(model, PROMPT, n, temperature=0.0) == expected
    assert generate(model, PROMPT, n, temperature=0.0, use_kv_cache=False) == expected
    assert len(set(expected)) > 3  # a non-degenerate sequence, so the comparison means something


@pytest.mark.parametrize("temperature,top_p,seed", [(1.0, 1.0, 0), (0.7, 0.9, 1), (1.3, 0.5, 2)])
def test_sampling_with_and_without_cache_match(model, temperature, top_p, seed):
    n = 2 * model.context_length + 3
    kwargs = dict(temperature=temperature, top_p=top_p)
    cached = generate(model, PROMPT, n, generator=torch.Generator().manual_seed(seed), **kwargs)
    full = generate(model, PROMPT, n, generator=torch.Generator().manual_seed(seed), use_kv_cache=False, **kwargs)
    assert cached == full
    assert len(cached) == n


def test_prompt_longer_than_context(model):
    prompt = list(range(40, 40 + 2 * model.context_length + 1))
    expected = reference_greedy(model, prompt, 10)
    assert generate(model, prompt, 10, temperature=0.0) == expected
    assert generate(model, prompt, 10, temperature=0.0, use_kv_cache=False) == expected


def test_kv_cache_feeds_each_position_once(model):
    """Inside the context, the cached path runs prompt + (n - 1) positions in total; the uncached path
    re-runs the whole prefix for every token (quadratic)."""
    fed = []
    handle = model.register_forward_pre_hook(lambda module, args: fed.append(args[0].shape[-1]))
    try:
        n = 10
        generate(model, PROMPT, n, temperature=0.0)
        assert fed == [len(PROMPT)] + [1] * (n - 1)
        fed.clear()
        generate(model, PROMPT, n, temperature=0.0, use_kv_cache=False)
        assert fed == [len(PROMPT) + i for i in range(n)]
    finally:
        handle.remove()


def test_kv_cache_refills_when_full(model):
    """Once the cache holds context_length positions, the next step re-runs the last context_length tokens."""
    fed = []
    handle = model.register_forward_pre_hook(lambda module, args: fed.append(args[0].shape[-1]))
    try:
        c = model.context_length
        generate(model, PROMPT, c + 2 - len(PROMPT) + 1, temperature=0.0)
    finally:
        handle.remove()
    # prefill, singles until the cache holds c positions, then a full re-prefill per step
    assert fed == [len(PROMPT)] + [1] * (c - len(PROMPT)) + [c, c]


# ----------------------------------------------------------------------------- sampling


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([0.1, 0.5, 0.15, 0.25])
    # sorted: 0.5, 0.25, 0.15, 0.1 -> 0.5 + 0.25 >= 0.7, so two tokens stay
    assert_close(top_p_filter(probs, 0.7), torch.tensor([0.0, 0.5, 0.0, 0.25]) / 0.75)
    assert_close(top_p_filter(probs, 0.76), torch.tensor([0.0, 0.5, 0.15, 0.25]) / 0.9)
    assert_close(top_p_filter(probs, 1.0), probs)


def test_top_p_boundary_is_inclusive():
    probs = torch.tensor([0.125, 0.5, 0.125, 0.25])  # exact in binary: the mass reaches p exactly
    assert_close(top_p_filter(probs, 0.75), torch.tensor([0.0, 2 / 3, 0.0, 1 / 3]))
    assert_close(top_p_filter(probs, 0.5), torch.tensor([0.0, 1.0, 0.0, 0.0]))


def test_top_p_always_keeps_top1_and_breaks_ties_by_id():
    probs = torch.tensor([0.2, 0.3, 0.5])
    assert_close(top_p_filter(probs, 1e-6), torch.tensor([0.0, 0.0, 1.0]))
    uniform = torch.full((4,), 0.25)
    assert_close(top_p_filter(uniform, 0.5), torch.tensor([0.5, 0.5, 0.0, 0.0]))


def test_top_p_rows_are_independent():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
    out = top_p_filter(probs, 0.75)
    assert_close(out, torch.tensor([[2 / 3, 1 / 3, 0.0], [0.0, 0.0, 1.0]]))


@pytest.mark.parametrize("p", [0.0, -0.1, 1.5])
def test_top_p_rejects_bad_p(p):
    with pytest.raises(ValueError, match="top_p"):
        top_p_filter(torch.tensor([0.5, 0.5]), p)


def _frequencies(logits: torch.Tensor, temperature: float, rows: int = 40_000) -> torch.Tensor:
    ids = sample_next(logits.expand(rows, -1), temperature=temperature, generator=torch.Generator().manual_seed(0))
    return torch.bincount(ids, minlength=logits.shape[-1]).float() / rows


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_scales_the_distribution(temperature):
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0])
    expected = torch.softmax(logits / temperature, dim=-1)
    assert_close(_frequencies(logits, temperature), expected, atol=0.012, rtol=0)


def test_extreme_temperatures():
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.0], [5.0, 1.0, 0.0, 2.0]])
    assert sample_next(logits, temperature=0.0).tolist() == [2, 0]
    assert_close(_frequencies(logits[:1], 1e3), torch.full((4,), 0.25), atol=0.012, rtol=0)
    assert _frequencies(logits[:1], 1e-3)[2] == 1.0


def test_tiny_temperature_sampling_equals_greedy(model):
    sampled = generate(model, PROMPT, 20, temperature=1e-4, generator=torch.Generator().manual_seed(5))
    assert sampled == generate(model, PROMPT, 20, temperature=0.0)


def test_seed_makes_samples_reproducible(model):
    def run(seed):
        return generate(model, PROMPT, 30, temperature=1.0, generator=torch.Generator().manual_seed(seed))

    assert run(7) == run(7)
    assert run(7) != run(8)


# ----------------------------------------------------------------------------- stopping and arguments


def test_stops_at_eos_and_excludes_it(model):
    greedy = generate(model, PROMPT, 12, temperature=0.0)
    k = 4
    eos = greedy[k]
    first = greedy.index(eos)
    assert generate(model, PROMPT, 12, temperature=0.0, eos_id=eos) == greedy[:first]
    assert generate(model, PROMPT, 12, temperature=0.0, eos_id=eos, use_kv_cache=False) == greedy[:first]
    absent = next(i for i in range(TINY["vocab_size"]) if i not in greedy)
    assert generate(model, PROMPT, 12, temperature=0.0, eos_id=absent) == greedy


def test_zero_new_tokens_and_bad_arguments(model):
    assert generate(model, PROMPT, 0) == []
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], 5)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, PROMPT, 5, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, PROMPT, 5, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, PROMPT, -1)


def test_generation_leaves_no_modes_behind(model):
    """Eval and inference mode hold only inside each step, not in the caller's code between tokens."""
    model.train()
    try:
        stream = stream_tokens(model, PROMPT, 3, temperature=0.0)
        next(stream)
        assert model.training and torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        assert len(list(stream)) == 2
        assert model.training
    finally:
        model.eval()


# ----------------------------------------------------------------------------- streaming decode


def test_streamer_holds_back_partial_utf8():
    vocab = {0: b"\xe2", 1: b"\x82", 2: b"\xac", 3: b" ok", 4: b"\xff"}
    streamer = TextStreamer(vocab)
    assert [streamer.push(i) for i in (0, 1, 2, 3)] == ["", "", "\u20ac", " ok"]
    assert streamer.push(0) == ""
    assert streamer.flush() == "\ufffd"  # an unfinished character at the end becomes U+FFFD
    assert streamer.push(4) == "\ufffd"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=4), max_size=12))
def test_streamer_equals_one_shot_decode(pieces):
    vocab = dict(enumerate(pieces))
    streamer = TextStreamer(vocab)
    streamed = "".join(streamer.push(i) for i in range(len(pieces))) + streamer.flush()
    assert streamed == b"".join(pieces).decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------- CLI


@pytest.fixture()
def workspace(tmp_path: Path) -> Path:
    byte_tokenizer().save(tmp_path / "tokenizer")
    make_checkpoint(tmp_path)
    return tmp_path


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_greedy_output_equals_library(workspace, capsys):
    ckpt = workspace / "checkpoint_final.pt"
    prompt = "Once upon a time"
    args = ["--checkpoint", ckpt, "--prompt", prompt, "--max-new-tokens", 40, "--temperature", 0, "--device", "cpu"]
    rc, out, err = _run(capsys, *args)
    assert rc == 0, err
    tok = byte_tokenizer()
    new_ids = generate(tiny_model(), tok.encode(prompt), 40, temperature=0.0, eos_id=tok.eot_id)
    assert out == prompt + tok.decode(new_ids) + "\n"
    rc, out_full, _ = _run(capsys, *args, "--no-kv-cache")
    assert rc == 0 and out_full == out


def test_cli_streams_while_generating(workspace, monkeypatch):
    class Recorder:
        def __init__(self):
            self.writes, self.flushes = [], 0

        def write(self, text):
            self.writes.append(text)

        def flush(self):
            self.flushes += 1

    out = Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    rc = main(["--checkpoint", str(workspace / "checkpoint_final.pt"), "--prompt", "Hey", "--max-new-tokens", "20",
               "--temperature", "0", "--device", "cpu"])
    assert rc == 0
    assert out.writes[0] == "Hey"
    assert len(out.writes) > 10 and out.flushes > 10  # piece by piece, not one write at the end


def test_cli_seeded_sampling_is_reproducible(workspace, capsys):
    args = ["--checkpoint", workspace / "checkpoint_final.pt", "--prompt", "Hi", "--max-new-tokens", 30,
            "--temperature", 1.0, "--top-p", 0.95, "--seed", 3, "--num-samples", 2, "--device", "cpu"]
    rc, first, _ = _run(capsys, *args)
    rc2, second, _ = _run(capsys, *args)
    assert rc == rc2 == 0
    assert first == second
    assert first.count("--- sample ") == 2
    samples = first.split("--- sample 2/2 ---\n")
    assert samples[0].split("---\n", 1)[1].strip() != samples[1].strip()  # the two samples differ


def test_cli_tokenizer_dir_from_checkpoint_then_default(tmp_path, capsys, monkeypatch):
    byte_tokenizer().save(tmp_path / "tok_elsewhere")
    make_checkpoint(tmp_path, tokenizer_dir=str(tmp_path / "tok_elsewhere"))
    common = ["--prompt", "a", "--max-new-tokens", 3, "--temperature", 0, "--device", "cpu"]
    rc, out, err = _run(capsys, "--checkpoint", tmp_path / "checkpoint_final.pt", *common)
    assert rc == 0, err
    # a checkpoint trained elsewhere (its tokenizer_dir does not exist here) falls back to ./tokenizer
    other = tmp_path / "run"
    other.mkdir()
    make_checkpoint(other, tokenizer_dir="/nonexistent/remote/tokenizer")
    monkeypatch.chdir(tmp_path)
    rc, _, err = _run(capsys, "--checkpoint", other / "checkpoint_final.pt", *common)
    assert rc != 0 and "tokenizer/" in err  # ./tokenizer does not exist yet
    byte_tokenizer().save(tmp_path / "tokenizer")
    rc, out2, err = _run(capsys, "--checkpoint", other / "checkpoint_final.pt", *common)
    assert rc == 0, err
    assert out2 == out


def _assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err


def test_cli_user_errors(workspace, tmp_path, capsys):
    ckpt = workspace / "checkpoint_final.pt"
    rc, out, err = _run(capsys, "--checkpoint", tmp_path / "missing.pt")
    _assert_one_line_error(rc, err, "missing.pt", "not found")
    assert out == ""

    rc, _, err = _run(capsys, "--checkpoint", ckpt, "--tokenizer-dir", tmp_path / "nowhere", "--device", "cpu")
    _assert_one_line_error(rc, err, "nowhere", "vocab.pkl")

    byte_tokenizer(special_tokens=()).save(tmp_path / "small_tok")  # 256 tokens vs the model's 257
    rc, _, err = _run(capsys, "--checkpoint", ckpt, "--tokenizer-dir", tmp_path / "small_tok", "--device", "cpu")
    _assert_one_line_error(rc, err, "256", "257", "small_tok")

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    rc, _, err = _run(capsys, "--checkpoint", garbage, "--device", "cpu")
    _assert_one_line_error(rc, err, "garbage.pt", "is not a checkpoint")

    rc, _, err = _run(capsys, "--checkpoint", ckpt, "--top-p", 1.5)
    _assert_one_line_error(rc, err, "--top-p")

    for bad in ("nan", "inf", "-1"):
        rc, _, err = _run(capsys, "--checkpoint", ckpt, "--temperature", bad)
        _assert_one_line_error(rc, err, "--temperature", bad)
    assert rc == 2


def test_cli_warns_when_the_tokenizer_is_not_the_one_trained_with(workspace, tmp_path, capsys):
    from cs336_basics.checkpoint import read_checkpoint, save_checkpoint
    from cs336_basics.data import tokenizer_sha256

    ckpt_path = workspace / "checkpoint_final.pt"
    ckpt = read_checkpoint(ckpt_path)
    tok = workspace / "tokenizer"
    trained_with = tokenizer_sha256(tok / "vocab.pkl", tok / "merges.pkl")
    model = tiny_model()
    model.load_state_dict(ckpt["model"])
    save_checkpoint(model, None, 0, ckpt_path, config=ckpt["config"], tokenizer_sha256=trained_with)
    args = ["--checkpoint", ckpt_path, "--prompt", "a", "--max-new-tokens", 2, "--device", "cpu", "--seed", 0]
    rc, _, err = _run(capsys, *args)
    assert rc == 0 and "warning" not in err
    other = Tokenizer({i: bytes([255 - i]) for i in range(256)}, [], [EOT])  # same size, other tokens
    other.save(tmp_path / "other_tok")
    rc, _, err = _run(capsys, *args, "--tokenizer-dir", tmp_path / "other_tok")
    assert rc == 0 and "warning: the tokenizer in" in err and "not the one this model was trained with" in err


def test_cli_runs_as_a_script(workspace):
    script = PROJECT_ROOT / "cs336_basics" / "generate.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny model: threads only add overhead
    ok = subprocess.run(
        [sys.executable, str(script), "--checkpoint", str(workspace / "checkpoint_final.pt"), "--prompt", "The",
         "--max-new-tokens", "8", "--seed", "0", "--device", "cpu"],
        cwd=workspace, env=env, capture_output=True, text=True, timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("The")
