"""cs336_basics/train_modal.py without the Modal service: declared options, pre-flight checks, and the remote body
run locally on a temporary folder standing in for the mounted volume (tiny model, CPU)."""

from __future__ import annotations

import importlib.util
import inspect
import json
import shlex
import sys
from pathlib import Path

import modal
import modal.exception
import numpy as np
import pytest
import yaml
from fake_modal_volume import FakeVolume, parse_entrypoint_args

from cs336_basics import modal_utils as mu
from cs336_basics import train_modal as tm
from cs336_basics.config import load_config
from cs336_basics.data import metadata_path

VOCAB = 64
REAL_IMAGE = modal.Image  # the `declared` fixture swaps modal.Image for a recorder
TINY = {
    "model": {"vocab_size": VOCAB, "context_length": 16, "d_model": 32, "num_layers": 1, "num_heads": 2, "d_ff": 64},
    "training": {"batch_size": 4, "max_iters": 4, "warmup_iters": 1, "eval_interval": 2, "eval_batches": 1,
                 "log_interval": 1, "checkpoint_interval": 2, "device": "cpu", "dtype": "float32", "seed": 3},
    "data": {"data_dir": "data", "train_path": "train.bin", "val_path": "val.bin", "checkpoint_dir": "checkpoints"},
}


def write_bin(path: Path, n_tokens: int, vocab: int = VOCAB, sha: str | None = "abc") -> Path:
    """Token file + metadata sidecar in tokenize_data's format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n_tokens)
    rng.integers(0, vocab, n_tokens, dtype=np.uint16).tofile(path)
    meta = {"format_version": 1, "dtype": "uint16", "vocab_size": vocab, "num_tokens": n_tokens,
            "special_tokens": ["<|endoftext|>"], "source": {"name": "t.txt", "size_bytes": n_tokens},
            "tokenizer_sha256": sha}
    metadata_path(path).write_text(json.dumps(meta))
    return path


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A working folder with a tiny config and data/, and a fake volume holding the uploaded data."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    write_bin(tmp_path / "data" / "train.bin", 4000)
    write_bin(tmp_path / "data" / "val.bin", 1000)
    vol = FakeVolume(tmp_path / "volume")
    for name in ("train.bin", "val.bin"):
        mu.upload(vol, tmp_path / "data" / name, name, "data")
    return tmp_path, vol


class Commits:
    """The commit callback: counts calls and can simulate the container dying at the n-th one."""

    def __init__(self, die_at: int | None = None):
        self.n, self.die_at = 0, die_at

    def __call__(self):
        self.n += 1
        if self.n == self.die_at:
            raise KeyboardInterrupt("container preempted")  # not an Exception: like SIGINT from Modal


# --- what the Modal function declares ------------------------------------------------------------------------


class ImageRecorder:
    """Stands in for modal.Image while the module is imported, recording the build steps."""

    steps: list = []

    @classmethod
    def debian_slim(cls, *args, **kwargs):
        cls.steps = [("debian_slim", args, kwargs)]
        return cls()

    def __getattr__(self, name):
        def step(*args, **kwargs):
            ImageRecorder.steps.append((name, args, kwargs))
            return self

        return step


@pytest.fixture
def declared(monkeypatch):
    """Import a fresh copy of train_modal while recording app.function(...) kwargs and the image's build steps."""
    recorded = []

    def function(self, **kwargs):
        recorded.append(kwargs)
        return lambda f: f

    monkeypatch.setattr(modal.App, "function", function)
    monkeypatch.setattr(modal, "Image", ImageRecorder)
    spec = importlib.util.spec_from_file_location("train_modal_recorded", tm.__file__)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return recorded, ImageRecorder.steps


def test_declared_function_options(declared):
    recorded, _ = declared
    (kwargs,) = recorded
    assert kwargs["gpu"] == "A10G"
    assert kwargs["timeout"] == 24 * 60 * 60
    assert isinstance(kwargs["retries"], modal.Retries) and kwargs["retries"].max_retries >= 2
    ((mount, volume),) = kwargs["volumes"].items()
    assert mount == "/vol" and isinstance(volume, modal.Volume) and volume.name == "transformer-training-vol"
    assert "secrets" not in kwargs  # the W&B secret is attached per call, so runs without --wandb need none
    inspect.signature(modal.App.function).bind(None, **tm.FUNCTION_OPTIONS)  # real modal accepts every option


def test_image_is_the_locked_project_environment(declared):
    _, steps = declared
    names = [name for name, _, _ in steps]
    assert names == ["debian_slim", "uv_sync", "add_local_python_source"]
    base, sync, source = steps
    assert base[2] == {"python_version": "3.11"}
    project_dir = Path(sync[1][0])
    assert (project_dir / "uv.lock").is_file() and (project_dir / "pyproject.toml").is_file()
    assert "--no-dev" in sync[2]["extra_options"]
    assert source[1] == ("cs336_basics",)
    for name, args, kwargs in steps:  # the real modal.Image has these steps with these arguments
        signature = inspect.signature(getattr(REAL_IMAGE, name))
        signature.bind(*args, **kwargs) if name == "debian_slim" else signature.bind(None, *args, **kwargs)


def test_gpu_choice_and_wandb_secret_are_call_time_options():
    assert [tm.gpu_count(g) for g in ("A10G", "A100", "A100-80GB", "H100", "H100:8", "h100:2")] == [1, 1, 1, 1, 8, 2]
    for bad in ("V100", "H100:9", "H100:0", "A10G x2", ""):
        with pytest.raises(tm.PreflightError, match="--gpu"):
            tm.gpu_count(bad)
    plain = tm.function_options("A100", wandb=False)
    assert plain == {"gpu": "A100"}
    logged = tm.function_options("H100:8", wandb=True)
    assert logged["gpu"] == "H100:8" and len(logged["secrets"]) == 1
    for options in (plain, logged):
        inspect.signature(modal.Function.with_options).bind(None, **options)


# --- pre-flight checks against the volume --------------------------------------------------------------------


def test_preflight_passes_on_good_data(project):
    _, vol = project
    cfg = load_config("tiny.yaml")
    assert tm.preflight(vol, cfg) == []


def test_preflight_missing_data_names_the_upload_command(project):
    _, vol = project
    mu.delete(vol, "val.bin", "data")
    with pytest.raises(tm.PreflightError) as err:
        tm.preflight(vol, load_config("tiny.yaml"))
    msg = str(err.value)
    assert msg.startswith("Data file not found on Modal: /data/val.bin")
    assert ("modal run cs336_basics/modal_utils.py --action upload --local-path data/val.bin "
            "--remote-name val.bin --data-type data") in msg
    assert "\n" not in msg


def test_preflight_vocab_mismatch_says_which_setting_to_change(project):
    _, vol = project
    with pytest.raises(tm.PreflightError) as err:
        tm.preflight(vol, load_config("tiny.yaml", ["model.vocab_size=10000"]))
    msg = str(err.value)
    assert msg.startswith("vocab_size mismatch: config model.vocab_size=10000")
    assert f"set model.vocab_size: {VOCAB} in tiny.yaml" in msg and f"model.vocab_size={VOCAB}" in msg


def test_preflight_catches_truncated_upload_mixed_tokenizers_and_notes(project):
    root, vol = project
    (vol.root / "data" / "train.bin").write_bytes(b"\0" * 100)  # shorter than its metadata says
    with pytest.raises(tm.PreflightError, match=r"is 100 bytes but its metadata says 8000.*--force"):
        tm.preflight(vol, load_config("tiny.yaml"))
    mu.upload(vol, write_bin(root / "other" / "train.bin", 4000, sha="zzz"), "train.bin", "data", force=True)
    with pytest.raises(tm.PreflightError, match="different tokenizers"):
        tm.preflight(vol, load_config("tiny.yaml"))

    (vol.root / "data" / "train.bin.json").unlink()  # old upload without metadata: a note, not an error
    (vol.root / "checkpoints").mkdir()
    (vol.root / "checkpoints" / "checkpoint_iter_2.pt").write_bytes(b"x")
    notes = tm.preflight(vol, load_config("tiny.yaml"))
    assert any("cannot be checked" in n for n in notes)
    assert any("/checkpoints/previous/" in n and "--resume" in n for n in notes)
    assert not any("checkpoint" in n for n in tm.preflight(vol, load_config("tiny.yaml"), resume=True))


def test_wandb_secret_check():
    def missing(name):
        raise modal.exception.NotFoundError(f"Secret {name!r} not found")

    with pytest.raises(tm.PreflightError, match="modal secret create wandb-secret WANDB_API_KEY="):
        tm.check_wandb_secret(missing)
    seen = []
    tm.check_wandb_secret(seen.append)
    assert seen == ["wandb-secret"]


# --- the remote body, run locally on a folder standing in for the volume mount ----------------------------------


def _remote(mount, commit, launch_id, resume=False, **overrides):
    cfg = load_config("tiny.yaml", [f"{k}={v}" for k, v in overrides.items()])
    from cs336_basics.config import config_to_dict

    return tm.run_training(mount, config_to_dict(cfg), commit=commit, source="tiny.yaml", launch_id=launch_id,
                           resume=resume)


def test_remote_body_trains_commits_and_resumes_after_preemption(project):
    root, vol = project
    ckpts = vol.root / "checkpoints"

    reference = FakeVolume(root / "reference")  # the same run, never interrupted
    for name in ("train.bin", "val.bin"):
        mu.upload(reference, root / "data" / name, name, "data")
    commits = Commits()
    expected = _remote(reference.root, commits, "ref")
    assert expected["iterations"] == 4 and expected["resumed"] is False
    assert commits.n >= 4  # the launch claim, two checkpoints, the end

    dying = Commits(die_at=2)  # the claim commits, then the container dies committing checkpoint_iter_2.pt
    with pytest.raises(KeyboardInterrupt):
        _remote(vol.root, dying, "launch-1")
    assert sorted(p.name for p in ckpts.glob("*.pt")) == ["checkpoint_iter_2.pt"]

    again = _remote(vol.root, Commits(), "launch-1")  # Modal runs the same call again: it resumes by itself
    assert again["resumed"] is True and again["iterations"] == 4
    assert again["final_val_loss"] == pytest.approx(expected["final_val_loss"], rel=1e-5)
    assert sorted(p.name for p in ckpts.glob("*.pt")) == ["checkpoint_final.pt", "checkpoint_iter_2.pt",
                                                          "checkpoint_iter_4.pt"]

    fresh = _remote(vol.root, Commits(), "launch-2")  # a new `modal run` without --resume: starts over
    assert fresh["resumed"] is False
    (archived,) = (ckpts / "previous").iterdir()
    assert sorted(p.name for p in archived.glob("*.pt")) == ["checkpoint_final.pt", "checkpoint_iter_2.pt",
                                                             "checkpoint_iter_4.pt"]
    longer = _remote(vol.root, Commits(), "launch-3", resume=True, **{"training.max_iters": 6})
    assert longer["resumed"] is True and longer["iterations"] == 6


def test_remote_body_reports_user_errors_without_raising(project):
    _, vol = project
    result = _remote(vol.root, Commits(), "x", **{"model.vocab_size": 32})  # data holds ids up to 63
    assert "error" in result and "vocab_size" in result["error"]


# --- the local entrypoint, end to end, with the remote call run in-process --------------------------------------


class FakeRemote:
    """Stands in for the Modal Function: records with_options and runs .remote() on the fake volume."""

    def __init__(self, vol):
        self.vol, self.options, self.calls = vol, None, 0

    def with_options(self, **options):
        self.options = options
        return self

    def remote(self, **kwargs):
        self.calls += 1
        return tm.run_training(self.vol.root, commit=self.vol.commit, **kwargs)


def _run_main(monkeypatch, vol, argv, secret_lookup=None):
    remote = FakeRemote(vol)
    monkeypatch.setattr(tm, "volume", vol)
    monkeypatch.setattr(tm, "train_remote", remote)
    monkeypatch.setattr(tm, "_lookup_secret", secret_lookup or (lambda name: None))
    tm.main.info.raw_f(**parse_entrypoint_args(tm.main, shlex.split(argv)))
    return remote


def test_entrypoint_end_to_end(project, monkeypatch, capsys):
    _, vol = project
    remote = _run_main(monkeypatch, vol, "--config-path tiny.yaml --run-name t1 --overrides 'training.max_iters=2'")
    assert remote.options == {"gpu": "A10G"}
    out = capsys.readouterr().out
    assert "Launching training on A10G" in out and '"iterations": 2' in out
    assert "checkpoint_final.pt" in [f.name for f in mu.list_files(vol, "checkpoint")]
    assert vol.commits >= 2


def test_entrypoint_uses_the_declared_gpu_unless_told(project, monkeypatch):
    _, vol = project
    monkeypatch.setitem(tm.FUNCTION_OPTIONS, "gpu", "A100")  # as if the decorator's gpu= had been edited
    remote = _run_main(monkeypatch, vol, "--config-path tiny.yaml --overrides 'training.max_iters=1'")
    assert remote.options == {"gpu": "A100"}
    remote = _run_main(monkeypatch, vol, "--config-path tiny.yaml --gpu H100 --resume")
    assert remote.options == {"gpu": "H100"}


def test_entrypoint_wandb_needs_the_secret(project, monkeypatch, capsys):
    _, vol = project

    def missing(name):
        raise modal.exception.NotFoundError("not found")

    with pytest.raises(SystemExit) as done:
        _run_main(monkeypatch, vol, "--config-path tiny.yaml --wandb --gpu H100", secret_lookup=missing)
    assert done.value.code == 1
    err = capsys.readouterr().err
    assert "modal secret create wandb-secret" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "argv, expected",
    [
        ("--config-path tiny.yaml --overrides model.vocab_size=10000", "vocab_size mismatch"),
        ("--config-path missing.yaml", "missing.yaml not found"),
        ("--config-path tiny.yaml --gpu V100", "unknown --gpu 'V100'"),
        ("--config-path tiny.yaml --overrides training.bach_size=8", "did you mean training.batch_size"),
        ("--config-path tiny.yaml --gpu H100:8", "divisible by 8 process(es)"),
    ],
)
def test_entrypoint_stops_before_any_gpu_on_bad_input(project, monkeypatch, capsys, argv, expected):
    _, vol = project
    remote = FakeRemote(vol)
    monkeypatch.setattr(tm, "volume", vol)
    monkeypatch.setattr(tm, "train_remote", remote)
    with pytest.raises(SystemExit) as done:
        tm.main.info.raw_f(**parse_entrypoint_args(tm.main, shlex.split(argv)))
    assert done.value.code == 1 and remote.calls == 0
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1, err


def test_workflow_training_commands_parse():
    for argv in ("", "--wandb --run-name my-experiment",
                 "--config-path cs336_basics/config.yaml --wandb --run-name tinystories-10k-vocab",
                 "--wandb --run-name experiment-1", "--gpu H100:8 --resume"):
        kwargs = parse_entrypoint_args(tm.main, shlex.split(argv))
        assert set(kwargs) == {"config_path", "wandb", "run_name", "gpu", "resume", "overrides"}
    assert parse_entrypoint_args(tm.main, ["--wandb", "--run-name", "x"])["wandb"] is True


# --- multi-GPU: torchrun launch and the commit watcher ---------------------------------------------------------


def test_torchrun_command():
    cmd = tm.torchrun_command(Path("/tmp/c.yaml"), 8, wandb=True, run_name="r", resume=True)
    assert cmd[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=8"]
    assert cmd[5:] == ["-m", "cs336_basics.train", "--config-path", "/tmp/c.yaml", "--wandb", "--run-name", "r",
                       "--resume"]


def test_checkpoint_watcher_commits_on_new_checkpoints(tmp_path):
    commits = []
    watcher = tm.CheckpointWatcher(tmp_path, lambda: commits.append(1), poll_s=3600)
    assert watcher.poll() is False
    (tmp_path / ".checkpoint_iter_2.pt.tmp").write_bytes(b"partial")  # a temporary name is not a checkpoint
    assert watcher.poll() is False
    (tmp_path / "checkpoint_iter_2.pt").write_bytes(b"done")
    assert watcher.poll() is True and watcher.poll() is False

    def failing():
        raise RuntimeError("commit failed")

    flaky = tm.CheckpointWatcher(tmp_path, failing, poll_s=3600)
    (tmp_path / "checkpoint_iter_4.pt").write_bytes(b"done")
    assert flaky.poll() is False  # logged, not raised; retried at the next poll
    with tm.CheckpointWatcher(tmp_path, lambda: commits.append(2), poll_s=3600):
        (tmp_path / "checkpoint_final.pt").write_bytes(b"done")
    assert commits == [1, 2]  # the final poll on exit commits what the last interval missed


def test_multi_gpu_path_runs_the_launcher_and_commits_each_checkpoint(project, monkeypatch):
    """run_training with nproc > 1, the torchrun launch replaced by a script that writes checkpoints like rank 0."""
    import torch

    from cs336_basics.checkpoint import save_checkpoint

    root, vol = project
    made = root / "made.pt"
    save_checkpoint(torch.nn.Linear(1, 1), None, 4, made)
    script = root / "fake_torchrun.py"
    script.write_text(
        "import os, shutil, sys, time\n"
        "config, ckpts, made, code = sys.argv[1:5]\n"
        "shutil.copy(config, ckpts + '/../seen_config.yaml')\n"
        "shutil.copy(made, ckpts + '/.checkpoint_iter_2.pt.tmp')\n"
        "shutil.move(ckpts + '/.checkpoint_iter_2.pt.tmp', ckpts + '/checkpoint_iter_2.pt')\n"
        "deadline = time.monotonic() + 120\n"  # wait until the watcher has committed checkpoint_iter_2
        "while not os.path.exists(ckpts + '/../committed') and time.monotonic() < deadline:\n"
        "    time.sleep(0.02)\n"
        "shutil.copy(made, ckpts + '/checkpoint_final.pt')\n"
        "sys.exit(int(code))\n"
    )
    launched = []
    exit_code = ["0"]

    def command(config_file, nproc, *, wandb, run_name, resume):
        launched.append((nproc, wandb, run_name, resume))
        return [sys.executable, str(script), str(config_file), str(vol.root / "checkpoints"), str(made), exit_code[0]]

    monkeypatch.setattr(tm, "torchrun_command", command)
    counted = Commits()

    def commits():  # tells the fake torchrun that a commit happened while checkpoint_iter_2 existed
        counted()
        if (vol.root / "checkpoints" / "checkpoint_iter_2.pt").exists():
            (vol.root / "committed").touch()

    from cs336_basics.config import config_to_dict

    config = config_to_dict(load_config("tiny.yaml", ["training.batch_size=8"]))
    result = tm.run_training(vol.root, config, commit=commits, launch_id="m", nproc=8, run_name="r", poll_s=0.05)
    assert launched == [(8, False, "r", False)]
    assert result == {"iterations": 4, "checkpoint": str(vol.root / "checkpoints" / "checkpoint_final.pt"),
                      "resumed": False}
    assert counted.n >= 4  # claim, checkpoint_iter_2 (seen while running), checkpoint_final, end
    seen = load_config(vol.root / "seen_config.yaml")  # what the training processes were given
    assert seen.data.data_dir == str(vol.root / "data") and seen.data.checkpoint_dir == str(vol.root / "checkpoints")
    assert seen.training.batch_size == 8

    exit_code[0] = "3"  # a crashed rank: raise, so Modal retries (and the retry resumes)
    with pytest.raises(RuntimeError, match="exit code 3"):
        tm.run_training(vol.root, config, commit=Commits(), launch_id="m", nproc=8, poll_s=0.05)
