"""The training loop under hostile conditions (issue 8's faults), and the run features built on its stages:
NaN-safe checkpoints, a full disk, damaged checkpoints, stale temporaries, missing W&B login, early log lines with
ETA, time budgets, ablations, run.json and a local sweep with a diverging run."""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cs336_basics.common import EXIT_DIVERGED, EXIT_USER_ERROR
from tiny_run import CONTEXT, PROJECT_ROOT, make_data, read_metrics, tiny_config, tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")


def _finite(ckpt: dict) -> bool:
    tensors = list(ckpt["model"].values())
    tensors += [v for s in ckpt["optimizer"]["state"].values() for v in s.values() if isinstance(v, torch.Tensor)]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


# ----------------------------------------------------------------------------- 1. NaN weights are never saved


def test_divergence_never_saves_nonfinite_weights_and_names_a_resumable_checkpoint(root, capsys):
    from cs336_basics.checkpoint import read_checkpoint
    from cs336_basics.train import main

    args = tiny_overrides(root, max_lr=1e6, grad_clip=0, checkpoint_interval=3, eval_interval=3, log_interval=3,
                          warmup_iters=0, max_iters=30)
    assert main(args) == EXIT_DIVERGED
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "diverged" in err and "last good checkpoint" in err
    saved = sorted((root / "ckpt").glob("*.pt"))
    assert all(_finite(read_checkpoint(p)) for p in saved)  # whatever was written holds finite numbers
    named = err.split("last good checkpoint: ")[1].split(" (")[0]
    if named != "none":
        assert Path(named) in saved
        # the suggested --resume works from the named checkpoint (lowering the learning rate as advised)
        assert main(tiny_overrides(root, max_lr=1e-2, checkpoint_interval=3, max_iters=12) + ["--resume"]) == 0
    run = json.loads((root / "ckpt" / "run.json").read_text())
    assert run["status"] in ("diverged", "finished")


def test_weights_turning_nan_between_logs_stop_before_the_checkpoint(root, monkeypatch, capsys):
    """The loss is computed before the optimizer step, so weights can be NaN while the logged loss is finite."""
    import cs336_basics.train as train_mod
    from cs336_basics.checkpoint import read_checkpoint

    real_step, calls = train_mod.train_step, []

    def nan_weights_at_eight(model, optimizer, *args, **kwargs):
        calls.append(1)
        loss, norm = real_step(model, optimizer, *args, **kwargs)
        if len(calls) == 8:  # a checkpoint iteration
            with torch.no_grad():
                next(model.parameters()).fill_(math.nan)  # after the step: this iteration's loss stays finite
        return loss, norm

    monkeypatch.setattr(train_mod, "train_step", nan_weights_at_eight)
    assert train_mod.main(tiny_overrides(root, log_interval=100, eval_interval=100)) == EXIT_DIVERGED
    err = capsys.readouterr().err
    assert "no checkpoint was written" in err and f"last good checkpoint: {root / 'ckpt' / 'checkpoint_iter_4.pt'}" in err
    assert sorted(p.name for p in (root / "ckpt").glob("*.pt")) == ["checkpoint_iter_4.pt"]
    assert _finite(read_checkpoint(root / "ckpt" / "checkpoint_iter_4.pt"))


# ----------------------------------------------------------------------------- 2. a full disk


def _disk_fills_at(monkeypatch, calls_ok: int):
    """torch.save fails as on a full disk (OSError ENOSPC re-raised by torch as RuntimeError) after ``calls_ok``."""
    import cs336_basics.checkpoint as ckpt_mod

    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) > calls_ok:
            f.write(b"\0" * 100)
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos 64 vs 0")  # noqa: B904
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod.torch, "save", save)


def test_full_disk_skips_a_periodic_checkpoint_with_a_warning_and_keeps_training(root, monkeypatch, capsys):
    from cs336_basics.train import main

    _disk_fills_at(monkeypatch, calls_ok=1)  # checkpoint_iter_4 fits, _8 does not, then the final does not
    assert main(tiny_overrides(root)) == EXIT_USER_ERROR
    captured = capsys.readouterr()
    warning = [line for line in captured.err.splitlines() if "checkpoint_iter_8.pt" in line]
    assert warning and warning[0].startswith("warning: no space left in") and "training goes on" in warning[0]
    assert "iter      12/12" in captured.out  # it kept training past the failed checkpoint
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith(f"error: no space left in {root / 'ckpt'}/ to write checkpoint_final.pt")
    assert "needed" in last and "free" in last and f"last good: {root / 'ckpt' / 'checkpoint_iter_4.pt'}" in last
    assert "Traceback" not in captured.err
    assert sorted(p.name for p in (root / "ckpt").iterdir() if p.suffix == ".pt") == ["checkpoint_iter_4.pt"]
    assert not [p for p in (root / "ckpt").iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------- 3. user errors without tracebacks


def test_checkpoint_dir_that_is_a_file_or_read_only(root, monkeypatch, capsys):
    from cs336_basics.train import main

    (root / "afile").write_text("x")
    assert main(tiny_overrides(root) + [f"data.checkpoint_dir={root / 'afile'}"]) == EXIT_USER_ERROR
    assert f"data.checkpoint_dir {root / 'afile'} is a file, not a folder" in capsys.readouterr().err

    real = Path.write_bytes

    def read_only(self, data):
        if ".write-test" in self.name:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    assert main(tiny_overrides(root)) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "is not a writable folder (read-only file system)" in err and err.count("\n") == 1


def test_wandb_without_login_stops_before_training(root, monkeypatch, capsys):
    from cs336_basics.train import main

    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(root / "no-netrc"))
    monkeypatch.setenv("HOME", str(root))
    assert main(tiny_overrides(root) + ["--wandb"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "wandb login" in err and "WANDB_API_KEY" in err and err.count("\n") == 1
    assert not (root / "ckpt").exists()  # nothing started


def test_config_error_blames_the_override_not_the_file(root, capsys):
    from cs336_basics.train import main

    assert main(tiny_overrides(root) + ["training.batch_size=-4"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error: override 'training.batch_size=-4': training.batch_size must be > 0")
    assert "config.yaml" not in err


# ----------------------------------------------------------------------------- 4. stale temporaries, 6. damaged checkpoints


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_resume_removes_temporaries_of_killed_writers_and_skips_a_damaged_newest_checkpoint(root, capsys):
    import socket

    from cs336_basics.train import main

    assert main(tiny_overrides(root, max_iters=8)) == 0
    ckpt = root / "ckpt"
    host = socket.gethostname().replace(".", "_")
    stale = ckpt / f".checkpoint_iter_8.pt.{host}.{_dead_pid()}.tmp"
    stale.write_bytes(b"\0" * 1000)  # what kill -9 during a save leaves behind
    (ckpt / "checkpoint_final.pt").write_bytes(b"garbage, not a checkpoint")  # a damaged newest checkpoint
    capsys.readouterr()
    assert main(tiny_overrides(root, max_iters=12) + ["--resume"]) == 0
    out, err = capsys.readouterr()
    assert f"warning: skipping damaged checkpoint {ckpt / 'checkpoint_final.pt'}" in err
    assert "not a checkpoint" in err
    assert f"resumed from {ckpt / 'checkpoint_iter_8.pt'} at iteration 8" in out
    assert not stale.exists()
    assert [r["iteration"] for r in read_metrics(ckpt)] == list(range(1, 13))


def test_resume_with_only_unreadable_checkpoints_says_so(root, capsys):
    from cs336_basics.train import main

    (root / "ckpt").mkdir()
    (root / "ckpt" / "checkpoint_iter_4.pt").write_bytes(b"PK\x03\x04 truncated")
    assert main(tiny_overrides(root) + ["--resume"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "no readable checkpoint" in err and "checkpoint_iter_4.pt" in err


# ----------------------------------------------------------------------------- 11. a run says early what it costs


def test_first_iterations_are_logged_with_eta_and_readable_flops(root, capsys):
    from cs336_basics.train import log_due, main

    assert [i for i in range(1, 300) if log_due(i, 100)] == [1, 2, 4, 8, 16, 32, 64, 100, 200]
    assert main(tiny_overrides(root, log_interval=10, max_iters=12, eval_interval=12)) == 0
    out = capsys.readouterr().out
    iters = [int(line.split()[1].split("/")[0]) for line in out.splitlines() if line.startswith("iter") and "loss" in line
             and "val" not in line]
    assert iters == [1, 2, 4, 8, 10, 12]
    assert all(" | eta " in line for line in out.splitlines() if line.startswith("iter") and "tok/s" in line)
    schedule = next(line for line in out.splitlines() if line.startswith("Schedule:"))
    assert "FLOP)" in schedule and "B FLOPs" not in schedule


def test_a_plan_of_many_epochs_and_more_than_a_day_is_called_out(root, capsys, monkeypatch):
    import cs336_basics.logger as logger_mod
    import cs336_basics.train as train_mod

    make_data(root, n_train=2_000)  # 200 iterations x 128 tokens = 12.8 passes over it
    monkeypatch.setattr(logger_mod, "LONG_RUN_S", 0.0)  # any run "takes more than a day" here
    assert train_mod.main(tiny_overrides(root, max_iters=200, log_interval=100, eval_interval=100,
                                         checkpoint_interval=100)) == 0
    err = capsys.readouterr().err
    assert "warning: the schedule passes" in err and "memorise" in err and "training.max_iters=" in err
    assert err.count("per iteration this run needs about") == 1  # said once
    assert "--preset cpu" in err and "training.max_time=" in err


# ----------------------------------------------------------------------------- time budget (issue 10)


def test_time_budget_stops_on_time_with_final_checkpoint_and_minimum_lr(root, capsys):
    import time

    from cs336_basics.checkpoint import read_checkpoint
    from cs336_basics.train import main

    budget = 6.0
    started = time.time()
    args = tiny_overrides(root, max_iters=10**9, log_interval=1, eval_interval=10**8, checkpoint_interval=10**8,
                          max_time=f"{budget}s", warmup_iters=2)
    assert main(args) == 0
    took = time.time() - started
    final = read_checkpoint(root / "ckpt" / "checkpoint_final.pt")
    run = json.loads((root / "ckpt" / "run.json").read_text())
    # the loop, final evaluation and checkpoint inside the budget (5% for a loaded machine's scheduling jitter)
    assert final["elapsed_s"] < run["elapsed_s"] <= budget * 1.05
    assert took < budget + 30  # start-up (imports, data checks) comes on top of the budget
    train_records = read_metrics(root / "ckpt")
    lrs = [r["lr"] for r in train_records]
    assert len(lrs) > 10 and lrs[-1] == pytest.approx(1e-3, abs=2e-4)  # decayed to min_lr as the budget ended
    assert max(lrs) > 5e-3
    vals = read_metrics(root / "ckpt", "val")
    assert vals[0]["iteration"] == 0 and vals[-1]["iteration"] == final["iteration"]  # timed first, then final
    assert run["status"] == "out_of_time" and run["iterations"] == final["iteration"]
    assert "Done (out of time)" in capsys.readouterr().out


def test_budget_schedule_reaches_min_at_the_end():
    from cs336_basics.optimizer import get_lr_budget_schedule

    assert get_lr_budget_schedule(0, 0.0, 1.0, 0.1, 10) == 0.0
    assert get_lr_budget_schedule(5, 0.0, 1.0, 0.1, 10) == pytest.approx(0.5)
    assert get_lr_budget_schedule(50, 0.5, 1.0, 0.1, 10) == pytest.approx(0.55)
    assert get_lr_budget_schedule(50, 1.0, 1.0, 0.1, 10) == pytest.approx(0.1)
    assert get_lr_budget_schedule(50, 1.7, 1.0, 0.1, 10) == pytest.approx(0.1)


def test_max_time_values():
    from cs336_basics.config import ConfigError, load_config, parse_duration

    assert parse_duration("90m") == 5400 and parse_duration("1h30m") == 5400 and parse_duration("45m") == 2700
    assert parse_duration("2h") == 7200 and parse_duration("3600s") == 3600 and parse_duration("12.5") == 12.5
    for bad in ("soon", "-5m", "0s", "1x"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    with pytest.raises(ConfigError, match="override 'training.max_time=soon'"):
        load_config(None, ["training.max_time=soon"])


# ----------------------------------------------------------------------------- ablations (issue 10)


@pytest.mark.parametrize("switch", [None, "model.norm=none", "model.norm_position=post", "model.position_embedding=none",
                                    "model.ffn=silu"])
def test_each_ablation_trains_and_reloads_as_the_same_architecture(root, switch):
    from cs336_basics.checkpoint import load_model, read_checkpoint
    from cs336_basics.train import train

    extra = [switch] if switch else []
    cfg = tiny_config(root, max_iters=4, eval_interval=4)
    from cs336_basics.config import load_config

    cfg = load_config(None, tiny_overrides(root, max_iters=4, eval_interval=4) + extra)
    result = train(cfg)
    assert result["status"] == "finished" and math.isfinite(result["final_val_loss"])
    path = root / "ckpt" / "checkpoint_final.pt"
    model = load_model(path)
    assert model.config == cfg.model  # the switches are recorded and rebuilt
    ckpt = read_checkpoint(path)
    ids = torch.randint(0, cfg.model.vocab_size, (1, CONTEXT))
    from cs336_basics.model import TransformerLM

    again = TransformerLM(cfg.model)
    again.load_state_dict(ckpt["model"])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), again.eval()(ids))


def test_ablation_architectures_differ_as_named():
    from cs336_basics.config import ModelConfig
    from cs336_basics.model import RMSNorm, SiLUFeedForward, SwiGLU, TransformerLM

    base = dict(vocab_size=10_000, context_length=256, d_model=512, num_layers=4, num_heads=16)
    swiglu = TransformerLM(ModelConfig(**base), device="meta")
    silu = TransformerLM(ModelConfig(**base, ffn="silu"), device="meta")
    assert swiglu.config.d_ff == 1344 and silu.config.d_ff == 2048
    assert isinstance(swiglu.layers[0].ffn, SwiGLU) and isinstance(silu.layers[0].ffn, SiLUFeedForward)
    assert abs(silu.num_parameters() - swiglu.num_parameters()) / swiglu.num_parameters() < 0.01
    n_ffn = sum(p.numel() for p in swiglu.layers[0].ffn.parameters())
    assert abs(sum(p.numel() for p in silu.layers[0].ffn.parameters()) - n_ffn) / n_ffn < 0.02
    nonorm = TransformerLM(ModelConfig(**base, norm="none"), device="meta")
    assert not any(isinstance(m, RMSNorm) for m in nonorm.modules())
    assert "layers.0.ln1.weight" not in nonorm.state_dict() and "ln_final.weight" not in nonorm.state_dict()
    nope = TransformerLM(ModelConfig(**base, position_embedding="none"), device="meta")
    assert all(layer.attn.rope is None for layer in nope.layers)
    assert swiglu.layers[0].attn.rope is swiglu.layers[3].attn.rope  # one table, shared, given at construction
    assert [layer.attn.layer_idx for layer in swiglu.layers] == [0, 1, 2, 3]


def test_post_norm_and_nope_compute_what_they_say():
    from cs336_basics.config import ModelConfig
    from cs336_basics.model import TransformerLM

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, context_length=8, d_model=16, num_layers=1, num_heads=2, norm_position="post")
    model = TransformerLM(cfg).eval()
    block = model.layers[0]
    x = torch.randn(2, 8, 16)
    with torch.no_grad():
        h = block.ln1(x + block.attn(x))
        torch.testing.assert_close(block(x), block.ln2(h + block.ffn(h)))
    nope = TransformerLM(ModelConfig(**{**cfg.__dict__, "norm_position": "pre", "position_embedding": "none"})).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():  # without positions, the last token's output cannot depend on the order before it
        a = nope(ids)[0, -1]
        b = nope(torch.tensor([[7, 6, 5, 8]]))[0, -1]
    torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- run.json and a local sweep (issue 10)


def test_run_json_records_the_run(root):
    from cs336_basics.runs import read_run_record
    from cs336_basics.train import main

    assert main(tiny_overrides(root, max_iters=4, eval_interval=4) + ["--run-name", "tiny-run"]) == 0
    record = read_run_record(root / "ckpt" / "run.json")
    assert record.name == "tiny-run" and record.status == "finished" and record.iterations == 4
    assert record.tokens_seen == 4 * 8 * CONTEXT and record.device == "cpu" and record.gpu is None
    assert record.config["model"]["d_model"] == 32 and record.ended_at is not None
    assert record.best_val_loss == pytest.approx(record.final_val_loss)


def test_local_sweep_with_a_diverging_run(root, capsys):
    from cs336_basics.train import main

    # min_lr=1e-3 is above the default max_lr (3e-4) but below every swept one: the base config alone is invalid
    args = [a for a in tiny_overrides(root, max_iters=8, eval_interval=4, checkpoint_interval=4, grad_clip=0,
                                      warmup_iters=0, min_lr=1e-3) if not a.startswith("training.max_lr=")]
    args += ["--sweep", "training.max_lr=1e-2,1e6", "--sweep-name", "lr"]
    assert main(args) == 0  # a diverged run is a result of the sweep, not its failure
    out_dir = root / "ckpt" / "lr"
    rows = json.loads((out_dir / "sweep.json").read_text())["runs"]
    status = {r["values"]["training.max_lr"]: r["status"] for r in rows}
    assert status == {"1e-2": "finished", "1e6": "diverged"}
    for row in rows:
        run_dir = out_dir / row["name"]
        assert (run_dir / "metrics.jsonl").is_file() and (run_dir / "run.json").is_file()
        assert json.loads((run_dir / "run.json").read_text())["status"] == row["status"]
    assert (out_dir / "sweep.csv").read_text().count("\n") == 3
    assert (out_dir / "curves.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "finished" in out and "diverged" in out


def test_sweep_errors_are_one_line(root, capsys):
    from cs336_basics.train import main

    assert main(tiny_overrides(root) + ["--sweep", "training.max_lr=1e-2,abc"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "training.max_lr" in err
    assert main(tiny_overrides(root) + ["--sweep-name", "x"]) == EXIT_USER_ERROR
    assert "--sweep" in capsys.readouterr().err


def test_presets_are_valid_configs():
    from cs336_basics.config import PRESETS_DIR, load_config, preset_names

    assert {"tinystories", "owt", "leaderboard", "cpu"} <= set(preset_names())
    for name in preset_names():
        cfg = load_config(PRESETS_DIR / f"{name}.yaml")
        assert cfg.model.vocab_size in (10_000, 32_000)
    ts = load_config(PRESETS_DIR / "tinystories.yaml")
    assert ts.training.max_iters * ts.training.batch_size * ts.model.context_length == 327_680_000
    cpu = load_config(PRESETS_DIR / "cpu.yaml")
    assert 40e6 <= cpu.training.max_iters * cpu.training.batch_size * cpu.model.context_length <= 41e6
    assert load_config(PRESETS_DIR / "leaderboard.yaml").training.max_time_s == 90 * 60


def test_script_run_of_a_diverging_config_exits_3_with_one_line(tmp_path):
    make_data(tmp_path)
    env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    args = tiny_overrides(tmp_path, max_lr=1e6, grad_clip=0, warmup_iters=0, log_interval=2, max_iters=20)
    proc = subprocess.run([sys.executable, str(PROJECT_ROOT / "cs336_basics" / "train.py"), *args],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == EXIT_DIVERGED, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and proc.stderr.strip().splitlines()[-1].startswith("error: training loss")


def test_mfu_is_printed_and_logged_when_the_device_peak_is_known(root, monkeypatch, capsys):
    import cs336_basics.logger as logger_mod
    import cs336_basics.train as train_mod

    monkeypatch.setattr(logger_mod, "device_peak_flops", lambda device, precision: 1e10)  # a 10 GFLOP/s "GPU"
    assert train_mod.main(tiny_overrides(root, max_iters=4, eval_interval=4)) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "tok/s" in line]
    assert lines and all(" | mfu " in line for line in lines)
    from cs336_basics.model import TransformerLM

    cfg = tiny_config(root)
    per_token = TransformerLM(cfg.model, device="meta").flops_per_token()
    for r in read_metrics(root / "ckpt"):
        assert r["mfu"] == pytest.approx(per_token * r["tokens_per_sec"] / 1e10)


def test_no_mfu_on_cpu(root, capsys):
    from cs336_basics.logger import device_peak_flops
    from cs336_basics.train import main

    assert device_peak_flops(torch.device("cpu"), "float32") is None
    assert main(tiny_overrides(root, max_iters=2, eval_interval=2)) == 0
    assert " | mfu " not in capsys.readouterr().out
    assert all("mfu" not in r for r in read_metrics(root / "ckpt"))
