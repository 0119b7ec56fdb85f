"""The training loop on a tiny model and a generated corpus: logging, checkpoints, exact resume, fine-tuning,
W&B offline runs, and one-line errors for bad data, divergence and out-of-memory."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cs336_basics.common import EXIT_DIVERGED, EXIT_USER_ERROR
from cs336_basics.config import ModelConfig, load_config
from tiny_run import CONTEXT, PROJECT_ROOT, VOCAB, make_data, read_metrics, tiny_config, tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cli_trains_logs_and_checkpoints(root, capsys):
    from cs336_basics.checkpoint import load_model, read_checkpoint
    from cs336_basics.train import main

    assert main(tiny_overrides(root, max_iters=24, eval_interval=12, checkpoint_interval=8)) == 0
    out = capsys.readouterr().out
    for needle in ("Parameters:", "tokens/iteration", "Device: cpu", "float32", "val loss", "tok/s"):
        assert needle in out
    ckpt = root / "ckpt"
    assert sorted(p.name for p in ckpt.glob("*.pt")) == [
        "checkpoint_final.pt", "checkpoint_iter_16.pt", "checkpoint_iter_24.pt", "checkpoint_iter_8.pt"]
    train = read_metrics(ckpt)
    assert [r["iteration"] for r in train] == list(range(1, 25))
    assert all(r["tokens"] == r["iteration"] * 8 * CONTEXT for r in train)
    assert train[-1]["loss"] < train[0]["loss"] - 1.0, "the tiny model should learn the cyclic stream"
    assert train[0]["lr"] == pytest.approx(0.0) and max(r["lr"] for r in train) == pytest.approx(1e-2)
    val = read_metrics(ckpt, "val")
    assert [r["iteration"] for r in val] == [12, 24] and val[1]["val_loss"] < val[0]["val_loss"]

    saved = read_checkpoint(ckpt / "checkpoint_final.pt")
    assert saved["iteration"] == 24 and saved["config"]["model"]["d_model"] == 32
    assert len(saved["rng_states"]) == 1 and saved["wandb_run_id"] is None
    assert saved["val_loss"] == val[-1]["val_loss"]
    model = load_model(ckpt / "checkpoint_final.pt", "cpu")
    assert model.num_parameters() > 0 and model.vocab_size == VOCAB


def test_evaluation_uses_fixed_batches(root, monkeypatch):
    """Every evaluation sees the same validation batches, whatever the accumulation split, so numbers compare."""
    import cs336_basics.train as train_mod

    monkeypatch.setattr(train_mod, "train_step", lambda *a, **k: (torch.tensor(1.0), torch.tensor(0.0)))  # frozen
    losses = []
    for accum in (1, 2):
        summary = train_mod.train(tiny_config(root, max_iters=4, eval_interval=2, gradient_accumulation_steps=accum))
        val = read_metrics(root / "ckpt", "val")
        assert [r["iteration"] for r in val] == [2, 4] and summary["final_val_loss"] == val[-1]["val_loss"]
        losses += [r["val_loss"] for r in val]
    assert losses[0] == losses[1] and losses[2] == losses[3]  # bit-identical within a run
    assert losses[0] == pytest.approx(losses[2], abs=1e-6)  # across runs: only float summation order differs
    assert 4.0 < losses[0] < 7.0  # about ln(300) = 5.7 for an untrained model


@pytest.mark.parametrize("accum", [1, 2])
def test_resume_reproduces_uninterrupted_run_exactly(root, monkeypatch, accum):
    import cs336_basics.train as train_mod
    from cs336_basics.checkpoint import read_checkpoint

    full_dir, cut_dir = root / "full", root / "cut"
    cfg_full = load_config(None, tiny_overrides(root, gradient_accumulation_steps=accum) + [f"data.checkpoint_dir={full_dir}"])
    cfg_cut = load_config(None, tiny_overrides(root, gradient_accumulation_steps=accum) + [f"data.checkpoint_dir={cut_dir}"])
    written = []

    def on_checkpoint(path: Path) -> None:
        assert path.is_file()  # called once the file is complete
        written.append(path.name)

    train_mod.train(cfg_full, on_checkpoint=on_checkpoint)
    assert written == ["checkpoint_iter_4.pt", "checkpoint_iter_8.pt", "checkpoint_iter_12.pt", "checkpoint_final.pt"]

    real_step, calls = train_mod.train_step, []

    def crash_after_seven(*args, **kwargs):
        calls.append(1)
        if len(calls) == 8:
            raise RuntimeError("simulated crash")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", crash_after_seven)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_mod.train(cfg_cut)
    assert [r["iteration"] for r in read_metrics(cut_dir)] == list(range(1, 8))
    assert not (cut_dir / "checkpoint_final.pt").exists()
    monkeypatch.setattr(train_mod, "train_step", real_step)

    summary = train_mod.train(cfg_cut, resume=True)  # continues from checkpoint_iter_4.pt
    assert summary["iterations"] == 12
    full, cut = read_metrics(full_dir), read_metrics(cut_dir)
    assert [r["iteration"] for r in cut] == list(range(1, 13))  # the crashed run's iterations 5-7 were dropped
    assert [r["loss"] for r in cut] == [r["loss"] for r in full]  # bit-for-bit
    assert [r["grad_norm"] for r in cut] == [r["grad_norm"] for r in full]
    assert [r["val_loss"] for r in read_metrics(cut_dir, "val")] == [r["val_loss"] for r in read_metrics(full_dir, "val")]
    a, b = read_checkpoint(full_dir / "checkpoint_final.pt"), read_checkpoint(cut_dir / "checkpoint_final.pt")
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_resume_without_checkpoint_starts_fresh_and_checks_model(root, capsys):
    from cs336_basics.train import TrainingError, train

    train(tiny_config(root, max_iters=4), resume=True)
    assert "No checkpoint in" in capsys.readouterr().out
    with pytest.raises(TrainingError, match=r"trained with model\.d_model=32 \(config: 64\)"):
        train(load_config(None, tiny_overrides(root, max_iters=8) + ["model.d_model=64"]), resume=True)
    with pytest.raises(TrainingError, match="past training.max_iters=2"):
        train(tiny_config(root, max_iters=2), resume=True)
    # Resuming a finished run re-evaluates and re-saves without training.
    summary = train(tiny_config(root, max_iters=4), resume=True)
    assert summary["iterations"] == 4 and summary["final_val_loss"] is not None


def test_init_from_starts_a_fine_tune(root):
    from cs336_basics.checkpoint import read_checkpoint
    from cs336_basics.train import TrainingError, train

    train(tiny_config(root, max_iters=24))
    pretrained = root / "pretrained.pt"
    (root / "ckpt" / "checkpoint_final.pt").rename(pretrained)
    before = read_metrics(root / "ckpt")
    summary = train(load_config(None, tiny_overrides(root, max_iters=4, max_lr=1e-4, min_lr=1e-5, warmup_iters=0)
                                + [f"data.checkpoint_dir={root / 'ft'}"]), init_from=str(pretrained))
    tuned = read_metrics(root / "ft")
    assert [r["iteration"] for r in tuned] == [1, 2, 3, 4] and summary["iterations"] == 4
    assert tuned[0]["loss"] < before[0]["loss"] - 1.0  # starts from the trained weights, not from scratch
    saved = read_checkpoint(root / "ft" / "checkpoint_final.pt")
    assert saved["iteration"] == 4
    steps = {int(s["step"]) for s in saved["optimizer"]["state"].values() if "step" in s}
    assert steps <= {4}, "fine-tuning starts a fresh optimizer"
    with pytest.raises(TrainingError, match=r"--init-from .* has model\.num_layers=2 \(config: 3\)"):
        train(load_config(None, tiny_overrides(root) + ["model.num_layers=3"]), init_from=str(pretrained))


def test_gradient_accumulation_matches_one_big_batch():
    from cs336_basics.model import TransformerLM
    from cs336_basics.train import forward_backward

    torch.manual_seed(0)
    x = torch.randint(0, 50, (8, 12))
    y = torch.randint(0, 50, (8, 12))
    grads = []
    for parts in (1, 2, 4):
        torch.manual_seed(1)
        model = TransformerLM(ModelConfig(50, 12, 32, 2, 2, 64, 10000.0))
        loss = forward_backward(model, list(zip(x.chunk(parts), y.chunk(parts))))
        grads.append((float(loss), [p.grad.clone() for p in model.parameters()]))
    for loss, g in grads[1:]:
        assert loss == pytest.approx(grads[0][0], abs=1e-6)
        for a, b in zip(g, grads[0][1]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_wandb_offline_run_and_resume_keep_one_run_id(root, monkeypatch):
    from cs336_basics.checkpoint import read_checkpoint
    from cs336_basics.train import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(root))
    train(tiny_config(root, max_iters=4), wandb=True, run_name="tiny")
    run_id = read_checkpoint(root / "ckpt" / "checkpoint_final.pt")["wandb_run_id"]
    assert run_id
    # W&B writes each offline session to its own folder (named by start time, with a suffix when two start within
    # the same second), holding run-<id>.wandb: the id inside is what must stay the same across the resume.
    runs = list((root / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [r.name for r in runs] == [f"run-{run_id}.wandb"]
    train(tiny_config(root, max_iters=8), wandb=True, resume=True)
    runs = list((root / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 2 and {r.name for r in runs} == {f"run-{run_id}.wandb"}
    assert read_checkpoint(root / "ckpt" / "checkpoint_final.pt")["wandb_run_id"] == run_id


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(root, monkeypatch, capsys):
    import cs336_basics.train as train_mod
    from cs336_basics.checkpoint import read_checkpoint

    real_step, calls = train_mod.train_step, []

    def diverge_at_six(model, *args, **kwargs):
        calls.append(1)
        loss, norm = real_step(model, *args, **kwargs)
        if len(calls) >= 6:
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(math.nan)
            loss = loss * math.nan
        return loss, norm

    monkeypatch.setattr(train_mod, "train_step", diverge_at_six)
    assert train_mod.main(tiny_overrides(root)) == EXIT_DIVERGED
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert "loss became nan at iteration 6" in err and "checkpoint_iter_4.pt" in err and "training.max_lr=" in err
    ckpt = root / "ckpt"
    assert sorted(p.name for p in ckpt.glob("*.pt")) == ["checkpoint_iter_4.pt"]
    weights = read_checkpoint(ckpt / "checkpoint_iter_4.pt")["model"]
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_cuda_out_of_memory_gives_the_remedies(root, monkeypatch, capsys):
    import cs336_basics.train as train_mod

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_mod, "train_step", oom)
    assert train_mod.main(tiny_overrides(root)) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith("error: CUDA out of memory")
    for remedy in ("training.batch_size=4", "model.d_model=256", "--gpu A100"):
        assert remedy in err


def test_vocab_mismatch_names_the_fix(root, capsys):
    from cs336_basics.train import main

    assert main(tiny_overrides(root) + ["model.vocab_size=500"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert f"config model.vocab_size=500 but {root / 'data' / 'train.bin'} was tokenized with a {VOCAB}-token vocab" in err
    assert f"set model.vocab_size: {VOCAB} in " in err and f"config.yaml or pass model.vocab_size={VOCAB}" in err


def test_vocab_checked_by_sampling_when_there_is_no_metadata(tmp_path, monkeypatch, capsys):
    from cs336_basics.train import main

    make_data(tmp_path, metadata=False)
    monkeypatch.chdir(tmp_path)
    assert main(tiny_overrides(tmp_path) + ["model.vocab_size=200"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert f"holds token id {VOCAB - 1} but model.vocab_size=200" in err and "at least 300" in err


def test_tokenizer_dir_with_another_vocab_size_is_an_error(root, capsys):
    from cs336_basics.tokenizer import Tokenizer
    from cs336_basics.train import main

    Tokenizer({i: bytes([i]) for i in range(256)}, []).save(root / "tokenizer")
    assert main(tiny_overrides(root)) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert f"the tokenizer in {root / 'tokenizer'}/ has 256 tokens" in err and "model.vocab_size: 256" in err


def test_bad_batch_split_and_missing_data(root, capsys):
    from cs336_basics.train import main

    assert main(tiny_overrides(root, batch_size=6, gradient_accumulation_steps=4)) == EXIT_USER_ERROR
    assert "training.batch_size=6 must be divisible by" in capsys.readouterr().err
    assert main(tiny_overrides(root) + ["data.train_path=nope.bin"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert f"train data {root / 'data' / 'nope.bin'} not found" in err and "prepare_data.py" in err


def test_script_errors_are_one_line_without_traceback(tmp_path):
    """The real command line: run as a script (cs336_basics/ is sys.path[0]), exit 1, one line on stderr."""
    env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "cs336_basics" / "train.py"), f"data.data_dir={tmp_path}", "training.device=cpu"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
    )
    assert proc.returncode == EXIT_USER_ERROR
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert f"train data {tmp_path / 'train.bin'} not found" in proc.stderr and "prepare_data.py" in proc.stderr
