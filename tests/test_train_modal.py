"""cs336_basics/train_modal.py without the Modal service: what the function declares, the checks before launch, the
plan, the remote body run in stand-in containers (Modal's commit semantics: a container sees only what was committed
before it started), retries, and the local entrypoint with spawn/get stand-ins whose signatures match modal's."""

from __future__ import annotations

import importlib.util
import inspect
import json
import re
import math
import shlex
import sys
from pathlib import Path

import modal
import modal.exception
import numpy as np
import pytest
import torch
import yaml
from fake_modal_volume import FakeVolume, parse_entrypoint_args

import cs336_basics
from cs336_basics import gpus
from cs336_basics import modal_utils as mu
from cs336_basics import train_modal as tm
from cs336_basics.common import EXIT_DIVERGED, EXIT_USER_ERROR, UserError
from cs336_basics.config import config_to_dict, load_config
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
    """A working folder with a tiny config and data/, and a stand-in volume holding the uploaded data."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tm, "COMMIT_RETRY_S", 0.0)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    write_bin(tmp_path / "data" / "train.bin", 4000)
    write_bin(tmp_path / "data" / "val.bin", 1000)
    vol = FakeVolume(tmp_path / "volume")
    for name in ("train.bin", "val.bin"):
        mu.upload(vol, tmp_path / "data" / name, name, "data")
    return tmp_path, vol


class Containers:
    """Starts stand-in containers on a volume, each with a fresh mount folder."""

    def __init__(self, root: Path, vol: FakeVolume):
        self.root, self.vol, self.started = root, vol, 0

    def start(self, **mount_options):
        self.started += 1
        return self.vol.mount(self.root / f"container{self.started}", **mount_options)


def preempt_at(n: int):
    """An after_commit hook: the container is preempted (SIGINT) right after its n-th commit."""
    def hook(count):
        if count == n:
            raise KeyboardInterrupt("preempted by Modal")
    return hook


def _remote(container, launch_id, resume=False, **overrides):
    cfg = load_config("tiny.yaml", [f"{k}={v}" for k, v in overrides.items()])
    return tm.run_training(container.path, config_to_dict(cfg), commit=container.commit, source="tiny.yaml",
                           launch_id=launch_id, resume=resume, gpu="A10G")


def committed(vol: FakeVolume) -> list[str]:
    return sorted(p.name for p in (vol.root / "checkpoints").glob("*.pt"))


def weights(path: Path) -> dict:
    from cs336_basics.checkpoint import read_checkpoint

    return read_checkpoint(path)["model"]


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


def import_fresh(monkeypatch, argv=("pytest",)):
    """Import a fresh copy of train_modal under ``argv``, recording app.function(...) kwargs and the image's steps."""
    recorded = []

    def function(self, **kwargs):
        recorded.append(kwargs)
        return lambda f: f

    monkeypatch.setattr(modal.App, "function", function)
    monkeypatch.setattr(modal, "Image", ImageRecorder)
    monkeypatch.setattr(sys, "argv", list(argv))
    spec = importlib.util.spec_from_file_location("train_modal_recorded", tm.__file__)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return recorded, ImageRecorder.steps


def test_declared_function_options(monkeypatch):
    recorded, _ = import_fresh(monkeypatch)
    (kwargs,) = recorded
    assert kwargs["gpu"] == "A10G"
    assert kwargs["timeout"] == 24 * 60 * 60
    assert kwargs["single_use_containers"] is True  # every attempt (a sweep's runs, retries) in a fresh container
    assert isinstance(kwargs["retries"], modal.Retries) and kwargs["retries"].max_retries >= 2
    ((mount, volume),) = kwargs["volumes"].items()
    assert mount == "/vol" and isinstance(volume, modal.Volume) and volume.name == "transformer-training-vol"
    assert "secrets" not in kwargs  # runs without --wandb need no secret
    inspect.signature(modal.App.function).bind(None, **tm.FUNCTION_OPTIONS)  # real modal accepts every option
    inspect.signature(modal.Retries).bind(max_retries=3, initial_delay=10.0, backoff_coefficient=2.0, max_delay=60.0)


def test_the_modal_run_command_line_declares_gpu_list_and_secret(monkeypatch, tmp_path):
    """Modal takes a fallback list only in the declaration, so `--gpu H100,A100-80GB` must be declared at import."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    monkeypatch.setattr(mu, "has_credentials", lambda: True)
    looked_up = []

    class Secret:
        def hydrate(self):
            return self

    def from_name(name, **kwargs):
        looked_up.append((name, kwargs))
        return Secret()

    monkeypatch.setattr(modal.Secret, "from_name", from_name)
    argv = ["/x/bin/modal", "run", "--detach", "cs336_basics/train_modal.py", "--gpu", "h100,A100-80GB", "--wandb",
            "--config-path", "tiny.yaml"]
    recorded, _ = import_fresh(monkeypatch, argv)
    (kwargs,) = recorded
    assert kwargs["gpu"] == ["H100", "A100-80GB"] and len(kwargs["secrets"]) == 1
    assert looked_up and all(k == ("wandb-secret", {"required_keys": ["WANDB_API_KEY"]}) for k in looked_up)
    module = sys.modules["train_modal_recorded"]
    assert module.RUN_OPTIONS == {"--detach"}
    inspect.signature(modal.App.function).bind(None, gpu=kwargs["gpu"], secrets=kwargs["secrets"])
    inspect.signature(modal.Secret.from_name).bind("wandb-secret", required_keys=["WANDB_API_KEY"])


@pytest.mark.parametrize("args, expected", [
    ("--gpu A10:8", "1 to 4 A10 GPUs, not 8"),
    ("--gpu V100", "unknown GPU 'V100'"),
    ("--config-path missing.yaml", "missing.yaml not found"),
    ("--overrides training.bach_size=8", "did you mean training.batch_size"),
    ("--config-path tiny.yaml --gpu H100:8", "divisible by 8 process(es)"),
    ("--attach 12345", "starts with fc-"),
])
def test_bad_launch_arguments_stop_before_the_credentials(monkeypatch, tmp_path, capsys, args, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    monkeypatch.setattr(mu, "has_credentials", lambda: False)
    with pytest.raises(SystemExit) as done:
        import_fresh(monkeypatch, ["/x/bin/modal", "run", "cs336_basics/train_modal.py", *shlex.split(args)])
    assert done.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1 and "modal setup" not in err, err


def test_a_missing_wandb_secret_stops_before_modal_builds_anything(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(mu, "has_credentials", lambda: True)

    class Missing:
        def hydrate(self):
            raise modal.exception.NotFoundError("Secret 'wandb-secret' is missing required key WANDB_API_KEY")

    monkeypatch.setattr(modal.Secret, "from_name", lambda name, **kwargs: Missing())
    with pytest.raises(SystemExit) as done:
        import_fresh(monkeypatch, ["/x/bin/modal", "run", "cs336_basics/train_modal.py", "--wandb"])
    assert done.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "modal secret create wandb-secret WANDB_API_KEY=" in err and "missing required key" in err
    assert err.count("\n") == 1


def test_image_is_the_locked_project_environment(monkeypatch):
    _, steps = import_fresh(monkeypatch)
    names = [name for name, _, _ in steps]
    assert names == ["debian_slim", "uv_sync", "add_local_python_source"]
    base, sync, source = steps
    assert base[2] == {"python_version": "3.11"}
    project_dir = Path(sync[1][0])
    assert project_dir == Path(cs336_basics.__file__).resolve().parent.parent
    assert (project_dir / "uv.lock").is_file() and (project_dir / "pyproject.toml").is_file()
    assert "--no-dev" in sync[2]["extra_options"]
    assert source[1] == ("cs336_basics",)
    for name, args, kwargs in steps:  # the real modal.Image has these steps with these arguments
        signature = inspect.signature(getattr(REAL_IMAGE, name))
        signature.bind(*args, **kwargs) if name == "debian_slim" else signature.bind(None, *args, **kwargs)


def test_every_modal_api_the_code_calls_exists_in_the_installed_client():
    """Parity of the names train_modal and modal_utils reach in modal (the stand-ins mimic exactly these)."""
    import ast

    used = set()
    for module in (tm, mu):
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if isinstance(node, ast.Attribute):
                chain, inner = [node.attr], node.value
                while isinstance(inner, ast.Attribute):
                    chain.append(inner.attr)
                    inner = inner.value
                if isinstance(inner, ast.Name) and inner.id == "modal":
                    used.add(".".join(reversed(chain)))
    for name in used:
        obj = modal
        for part in name.split("."):
            assert hasattr(obj, part), f"modal {modal.__version__} has no modal.{name}"
            obj = getattr(obj, part)
    assert {"Retries", "Secret.from_name", "FunctionCall.from_id", "Volume.from_name", "App",
            "volume.AbstractVolumeUploadContextManager.resolve"} <= used
    assert "function_call_id" in inspect.signature(modal.FunctionCall.from_id).parameters


# --- pre-flight checks against the volume --------------------------------------------------------------------


def test_preflight_passes_on_good_data(project):
    _, vol = project
    assert tm.preflight(vol, load_config("tiny.yaml")) == []


def test_preflight_applies_the_same_checks_as_local_training(project, monkeypatch):
    import cs336_basics.data as data

    _, vol = project
    calls = []
    real = data.check_token_file

    def spy(label, meta, size_bytes, **kwargs):
        calls.append((label, size_bytes, kwargs["min_tokens"]))
        return real(label, meta, size_bytes, **kwargs)

    monkeypatch.setattr(data, "check_token_file", spy)
    tm.preflight(vol, load_config("tiny.yaml"))
    assert calls == [("/data/train.bin in volume transformer-training-vol", 8000, 17),
                     ("/data/val.bin in volume transformer-training-vol", 2000, 17)]


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
    with pytest.raises(UserError) as err:
        tm.preflight(vol, load_config("tiny.yaml", ["model.vocab_size=10000"]))
    msg = str(err.value)
    assert msg.startswith("vocab_size mismatch: config model.vocab_size=10000 but /data/train.bin in volume")
    assert f"set model.vocab_size: {VOCAB} in tiny.yaml" in msg and f"model.vocab_size={VOCAB}" in msg


def test_preflight_catches_truncated_upload_mixed_tokenizers_short_data_and_notes(project):
    root, vol = project
    (vol.root / "data" / "train.bin").write_bytes(b"\0" * 100)  # shorter than its metadata says
    with pytest.raises(UserError, match=r"is 100 bytes but its metadata says 4,000 uint16 tokens.*--force"):
        tm.preflight(vol, load_config("tiny.yaml"))
    mu.upload(vol, write_bin(root / "other" / "train.bin", 4000, sha="zzz"), "train.bin", "data", force=True)
    with pytest.raises(UserError, match="different tokenizers"):
        tm.preflight(vol, load_config("tiny.yaml"))
    mu.upload(vol, write_bin(root / "short" / "val.bin", 10, sha="zzz"), "val.bin", "data", force=True)
    with pytest.raises(UserError, match="holds 10 tokens, fewer than the 17 needed"):
        tm.preflight(vol, load_config("tiny.yaml"))
    (vol.root / "data" / "val.bin.json").write_text("{not json")
    with pytest.raises(tm.PreflightError, match="cannot read metadata file /data/val.bin.json in volume"):
        tm.preflight(vol, load_config("tiny.yaml"))

    mu.upload(vol, write_bin(root / "other" / "val.bin", 1000, sha="zzz"), "val.bin", "data", force=True)
    (vol.root / "data" / "train.bin.json").unlink()  # old upload without metadata: a note, not an error
    (vol.root / "checkpoints").mkdir()
    (vol.root / "checkpoints" / "checkpoint_iter_2.pt").write_bytes(b"x")
    notes = tm.preflight(vol, load_config("tiny.yaml"))
    assert any("cannot be checked" in n for n in notes)
    assert any("/checkpoints/previous/" in n and "--resume" in n for n in notes)
    assert not any("checkpoint" in n for n in tm.preflight(vol, load_config("tiny.yaml"), resume=True))


def test_preflight_lists_data_once_and_checkpoints_only_for_a_fresh_start(project, monkeypatch):
    _, vol = project
    listed = []
    real = vol.listdir
    monkeypatch.setattr(vol, "listdir", lambda path, **kw: listed.append(path) or real(path, **kw))
    tm.preflight(vol, load_config("tiny.yaml"))
    assert listed == ["/data", "/checkpoints"]
    listed.clear()
    tm.preflight(vol, load_config("tiny.yaml"), resume=True)  # the checkpoints only serve the fresh start's note
    assert listed == ["/data"]


def test_wandb_secret_check_asks_for_the_key():
    def missing(name):
        raise modal.exception.NotFoundError(f"Secret {name!r} not found")

    with pytest.raises(tm.PreflightError, match="modal secret create wandb-secret WANDB_API_KEY="):
        tm.check_wandb_secret(missing)

    def lacks_key(name):
        raise modal.exception.InvalidError("missing required keys: WANDB_API_KEY")

    with pytest.raises(tm.PreflightError, match="with the key WANDB_API_KEY.*missing required keys"):
        tm.check_wandb_secret(lacks_key)
    seen = []
    tm.check_wandb_secret(seen.append)
    assert seen == ["wandb-secret"]


def test_the_secret_lookup_requires_the_key(monkeypatch):
    calls = []

    class Secret:
        def hydrate(self):
            return self

    monkeypatch.setattr(modal.Secret, "from_name", lambda name, **kw: calls.append((name, kw)) or Secret())
    tm._lookup_secret("wandb-secret")
    assert calls == [("wandb-secret", {"required_keys": ["WANDB_API_KEY"]})]


def test_the_launch_trains_on_cuda_whatever_the_config_says(project):
    _, vol = project
    plan = tm.plan_launch(vol, config_path="tiny.yaml")  # tiny.yaml says training.device: cpu
    (call,) = plan.calls
    assert call["config"]["training"]["device"] == "cuda"
    assert any("training.device=cpu is replaced by cuda" in n for n in plan.notes)
    assert call["nproc"] == 1 and call["gpu"] == "A10G" and len(call["launch_id"]) == 32


# --- the plan, and the measured cost ------------------------------------------------------------------------


def test_plan_gives_tokens_time_and_cost_from_the_gpu_table():
    cfg = load_config(None)  # the default config: 100k iterations x 32 x 1024 tokens
    lines = tm.plan_lines(cfg, gpus.parse_gpu_spec("A10G"))
    text = "\n".join(lines)
    assert "100,000 iterations x 32,768 tokens = 3,276,800,000 tokens" in text and "(bf16)" in text
    flops = 3_276_800_000 * tm.model_flops_per_token(cfg.model)
    fast, slow = gpus.estimate_hours(flops, gpus.modal_gpu("A10G"), 1, "bf16")
    assert f"about {fast:.1f} h to {slow:.1f} h" in lines[1]
    assert f"${fast * 1.10:,.2f} to ${slow * 1.10:,.2f} at $1.10/h" in lines[1]
    assert gpus.PRICES_AS_OF in lines[-1] and "MFU" in lines[-1]

    listed = tm.plan_lines(cfg, gpus.parse_gpu_spec("H100:8,RTX-PRO-6000:8"))
    assert "H100 x8 (80 GB each): about" in listed[1] and "$31.60/h" in listed[1]
    assert "RTX-PRO-6000 x8" in listed[2] and "no time estimate" in listed[2] and "modal.com/pricing" in listed[2]
    fp32 = tm.plan_lines(load_config(None, ["training.dtype=float32"]), gpus.parse_gpu_spec("A100"))
    assert "(tf32)" in fp32[0]


def test_cost_line_uses_the_gpu_it_ran_on():
    result = {"wall_s": 2 * 3600, "attempts": 2, "device_name": "NVIDIA A100-SXM4-80GB", "gpu": "H100,A100-80GB",
              "gpu_count": 1}
    line = tm.cost_line(result)
    assert "2:00:00 on 1x NVIDIA A100-SXM4-80GB over 2 attempt(s)" in line and "$5.00 at $2.50/h for A100-80GB" in line
    assert tm.cost_line({**result, "gpu": "RTX-PRO-6000"}).startswith("Time: 2:00:00")


# --- the remote body, in stand-in containers --------------------------------------------------------------------


def test_remote_body_trains_commits_and_resumes_bit_exactly_after_preemption(project):
    root, vol = project
    reference_vol = FakeVolume(root / "reference")  # the same run, never interrupted
    for name in ("train.bin", "val.bin"):
        mu.upload(reference_vol, root / "data" / name, name, "data")
    expected = _remote(Containers(root / "ref", reference_vol).start(), "ref")
    assert expected["iterations"] == 4 and expected["resumed"] is False and expected["attempts"] == 1

    containers = Containers(root, vol)
    first = containers.start(after_commit=preempt_at(2))  # the launch claim, then checkpoint_iter_2, then SIGINT
    with pytest.raises(KeyboardInterrupt):
        _remote(first, "launch-1")
    assert committed(vol) == ["checkpoint_iter_2.pt"]

    again = _remote(containers.start(), "launch-1")  # Modal runs the same call again: it resumes by itself
    assert again["resumed"] is True and again["iterations"] == 4 and again["attempts"] == 2
    assert again["final_val_loss"] == expected["final_val_loss"]
    final, reference = weights(vol.root / "checkpoints" / "checkpoint_final.pt"), \
        weights(reference_vol.root / "checkpoints" / "checkpoint_final.pt")
    assert all(torch.equal(final[k], reference[k]) for k in reference)
    assert committed(vol) == ["checkpoint_final.pt", "checkpoint_iter_2.pt", "checkpoint_iter_4.pt"]

    fresh = _remote(containers.start(), "launch-2")  # a new launch without --resume: starts over
    assert fresh["resumed"] is False and fresh["attempts"] == 1
    (archived,) = (vol.root / "checkpoints" / "previous").iterdir()
    assert sorted(p.name for p in archived.glob("*.pt")) == ["checkpoint_final.pt", "checkpoint_iter_2.pt",
                                                             "checkpoint_iter_4.pt"]
    longer = _remote(containers.start(), "launch-3", resume=True, **{"training.max_iters": 6})
    assert longer["resumed"] is True and longer["iterations"] == 6


def test_the_stand_in_catches_code_that_forgets_to_commit(project, monkeypatch):
    """Had run_training not committed after each checkpoint, the restart above would have started over."""
    root, vol = project
    real, forgetting = tm.commit_with_retries, [True]

    def forgetful(commit, what, *args):
        if forgetting[0] and what == "after checkpoint_iter_4.pt":
            raise KeyboardInterrupt("preempted by Modal")
        if forgetting[0] and what.startswith("after checkpoint"):
            return True  # the bug: no commit after a checkpoint
        return real(commit, what, *args)

    monkeypatch.setattr(tm, "commit_with_retries", forgetful)
    containers = Containers(root, vol)
    with pytest.raises(KeyboardInterrupt):
        _remote(containers.start(), "launch-1")
    assert (containers.root / "container1" / "checkpoints" / "checkpoint_iter_2.pt").is_file()  # written...
    assert committed(vol) == []  # ...but never committed, so the next container cannot see it
    forgetting[0] = False
    assert _remote(containers.start(), "launch-1")["resumed"] is False


def test_a_failed_commit_after_a_checkpoint_is_retried_then_training_goes_on(project, capsys):
    root, vol = project
    containers = Containers(root, vol)
    retried = containers.start()

    def fail_next(count):  # after the launch claim, the next two commits fail: retried, then it works
        if count == 1:
            retried.fail_commits = 2

    retried.after_commit = fail_next
    assert _remote(retried, "a")["iterations"] == 4
    assert "warning" not in capsys.readouterr().err

    gave_up = containers.start()

    def fail_three(count):
        if count == 1:
            gave_up.fail_commits = tm.COMMIT_ATTEMPTS  # checkpoint_iter_2's commit fails every attempt
    gave_up.after_commit = fail_three
    result = _remote(gave_up, "b")
    assert result["iterations"] == 4  # training went on
    err = capsys.readouterr().err
    assert "committing the volume after checkpoint_iter_2.pt failed 3 times" in err and "next checkpoint" in err
    assert committed(vol) == ["checkpoint_final.pt", "checkpoint_iter_2.pt", "checkpoint_iter_4.pt"]


def test_a_final_commit_that_keeps_failing_says_the_checkpoints_are_not_persisted(project):
    root, vol = project
    containers = Containers(root, vol)
    doomed = containers.start()

    def break_after_iter_2(count):
        if count == 2:  # the launch claim and checkpoint_iter_2 are committed; nothing after
            doomed.fail_commits = 1000
    doomed.after_commit = break_after_iter_2
    with pytest.raises(RuntimeError, match=r"NOT persisted.*resumes from the last committed checkpoint"):
        _remote(doomed, "x")
    assert committed(vol) == ["checkpoint_iter_2.pt"]
    retry = _remote(containers.start(), "x")  # Modal's retry
    assert retry["resumed"] is True and retry["iterations"] == 4


def test_user_errors_and_divergence_end_the_call_without_a_retry(project, monkeypatch):
    root, vol = project
    containers = Containers(root, vol)
    result = _remote(containers.start(), "x", **{"model.vocab_size": 32})  # data holds ids up to 63
    assert result["exit_code"] == EXIT_USER_ERROR and "vocab_size" in result["error"] and "\n" not in result["error"]

    import cs336_basics.train as train_mod

    real_step = train_mod.train_step

    def diverge(model, *args, **kwargs):
        loss, norm = real_step(model, *args, **kwargs)
        return loss * math.nan, norm

    monkeypatch.setattr(train_mod, "train_step", diverge)
    result = _remote(containers.start(), "y")
    assert result["exit_code"] == EXIT_DIVERGED and "diverged" in result["error"]


def test_training_reads_a_local_copy_so_commits_are_not_refused(project, tmp_path, capsys):
    """Modal refuses a commit (it reloads) while files of the volume are open: memory-mapped data would block them."""
    from fake_modal_volume import open_files_under

    root, vol = project
    container = Containers(root, vol).start()
    data = container.path / "data"
    held = np.memmap(data / "train.bin", dtype=np.uint16, mode="r")
    assert open_files_under(container.path) == [str((data / "train.bin").resolve())]
    with pytest.raises(RuntimeError, match="open files preventing the operation"):
        container.commit()  # the stand-in is as strict as Modal here
    del held

    cfg = load_config("tiny.yaml", [f"data.data_dir={data}"])
    line = tm.copy_data_locally(cfg, tmp_path / "local")
    assert cfg.data.data_dir == str(tmp_path / "local") and "copied train.bin, val.bin" in line
    assert sorted(p.name for p in (tmp_path / "local").iterdir()) == ["train.bin", "train.bin.json", "val.bin",
                                                                     "val.bin.json"]
    assert (tmp_path / "local" / "train.bin").read_bytes() == (data / "train.bin").read_bytes()
    missing = load_config("tiny.yaml", [f"data.data_dir={data}", "data.val_path=nope.bin"])
    assert tm.copy_data_locally(missing, tmp_path / "other") is None and missing.data.data_dir == str(data)

    result = _remote(container, "x")  # trains on the copy: every checkpoint commit goes through
    assert result["iterations"] == 4 and "warning" not in capsys.readouterr().err
    assert committed(vol) == ["checkpoint_final.pt", "checkpoint_iter_2.pt", "checkpoint_iter_4.pt"]


def test_no_cuda_stops_at_once_with_the_versions_and_the_fix(project, monkeypatch):
    root, vol = project
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(tm, "nvidia_driver_version", lambda: "570.86.15")
    result = _remote(Containers(root, vol).start(), "x", **{"training.device": "cuda"})
    assert result["exit_code"] == EXIT_USER_ERROR
    msg = result["error"]
    assert f"torch {torch.__version__} is built for CUDA {torch.version.cuda}" in msg
    assert "NVIDIA driver 570.86.15" in msg and "cu128" in msg and "\n" not in msg
    if torch.version.cuda and torch.version.cuda.startswith("13."):
        assert "needs NVIDIA driver >= 580" in msg
    assert not (vol.root / "checkpoints").exists()  # nothing was claimed or trained
    assert "no working NVIDIA driver" in tm.cuda_problem("2.15.0+cu132", "13.2", None)
    assert "CPU-only build" in tm.cuda_problem("2.15.0+cpu", None, None)


# --- the local entrypoint, with stand-ins for Function.spawn / FunctionCall.get ----------------------------------


class FakeCall:
    """Stands in for modal.FunctionCall: ``get`` runs the call in stand-in containers, retrying what Modal retries.

    The first container starts when the call is spawned (a sweep's calls start side by side: each sees only what
    was committed before it started), its retries when they happen."""

    def __init__(self, containers, kwargs, hooks=(), object_id="fc-test"):
        self.containers, self.kwargs, self.hooks, self.attempts = containers, kwargs, list(hooks), 0
        self.object_id = object_id
        self.first = containers.start()

    def get(self, timeout: float | None = None, *, index: int = 0):
        while not hasattr(self, "result"):  # Modal's server-side retries (spawned calls): an exception is retried
            self.attempts += 1
            container = self.first if self.attempts == 1 else self.containers.start()
            container.after_commit = self.hooks.pop(0) if self.hooks else None
            try:
                self.result = tm.remote_body(container.path, commit=container.commit, reload=container.reload,
                                             **self.kwargs)
            except BaseException:
                if self.attempts > tm.MAX_RETRIES:
                    raise
        return self.result  # a finished call gives its result again


class FakeFunction:
    """Stands in for the declared modal.Function: ``spawn`` returns a FakeCall."""

    def __init__(self, containers, hooks=()):
        self.containers, self.hooks, self.calls = containers, hooks, []

    def spawn(self, *args, **kwargs):
        self.calls.append(FakeCall(self.containers, kwargs, self.hooks, object_id=f"fc-test{len(self.calls) or ''}"))
        return self.calls[-1]


def test_spawn_and_get_stand_ins_match_modal():
    for fake, real in ((FakeFunction.spawn, modal.Function.spawn), (FakeCall.get, modal.FunctionCall.get)):
        assert list(inspect.signature(fake).parameters) == list(inspect.signature(real).parameters)
    assert hasattr(modal.FunctionCall, "object_id")


def _run_main(monkeypatch, project, argv, hooks=(), run_options=(), remote=None):
    root, vol = project
    remote = remote or FakeFunction(Containers(root, vol), hooks)
    monkeypatch.setattr(tm, "volume", vol)
    monkeypatch.setattr(tm, "train_remote", remote)
    monkeypatch.setattr(tm, "_lookup_secret", lambda name: None)
    monkeypatch.setattr(tm, "RUN_OPTIONS", set(run_options))
    tokens = shlex.split(argv)
    kwargs = parse_entrypoint_args(tm.main, tokens)  # as Modal's CLI passes them: only the last --sweep
    launch = mu.parse_cli_args(tokens, tm.main.info.raw_f, repeatable=("sweep",))  # what the import-time check reads
    monkeypatch.setattr(tm, "LAUNCH_ARGS", launch)
    checked = tm.check_launch_args(**launch) if not kwargs["attach"] else None  # what the import-time check returns
    monkeypatch.setattr(tm, "LAUNCH", checked)
    timeout = checked.timeout_s if checked else tm.TIMEOUT_S
    monkeypatch.setattr(tm, "FUNCTION_OPTIONS", tm.function_options(kwargs["gpu"] or tm.DEFAULT_GPU, kwargs["wandb"],
                                                                    timeout))
    monkeypatch.setattr(tm, "plan_launch", _cpu_plan(tm.plan_launch))
    tm.main.info.raw_f(**kwargs)
    return remote


def _cpu_plan(real):
    """plan_launch, with the configs' device put back to cpu after the launcher forced cuda (no GPU here)."""
    def plan(*args, **kwargs):
        result = real(*args, **kwargs)
        for call in result.calls:
            call["config"]["training"]["device"] = "cpu"
        return result
    return plan


def test_entrypoint_end_to_end(project, monkeypatch, capsys):
    _, vol = project
    remote = _run_main(monkeypatch, project, "--config-path tiny.yaml --run-name t1 --overrides 'training.max_iters=2'")
    (call,) = remote.calls
    assert call.kwargs["run_name"] == "t1" and call.kwargs["gpu"] == "A10G" and call.attempts == 1
    out = capsys.readouterr().out
    assert "Plan: 2 iterations x 64 tokens = 128 tokens" in out and "A10G x1 (24 GB each): about" in out
    assert "Training call fc-test: follow it with `modal app logs" in out and "modal run --detach" in out
    assert "Finished: iteration 2" in out and "Time and cost:" in out and "at $1.10/h for A10G x1" in out
    assert "--action download --remote-name checkpoint_final.pt" in out
    assert "checkpoint_final.pt" in [f.name for f in mu.list_files(vol, "checkpoint")]


def test_a_preempted_attempt_is_retried_and_resumes(project, monkeypatch, capsys):
    remote = _run_main(monkeypatch, project, "--config-path tiny.yaml", hooks=[preempt_at(2)], run_options={"-d"})
    (call,) = remote.calls
    assert call.attempts == 2
    out = capsys.readouterr().out
    assert "Finished (resumed from a checkpoint): iteration 4" in out and "over 2 attempt(s)" in out
    assert "Detached: closing this terminal does not stop training" in out and "--attach fc-test" in out


@pytest.mark.parametrize("argv, code, expected", [
    ("--config-path tiny.yaml --overrides model.vocab_size=32", EXIT_USER_ERROR, "vocab_size"),
])
def test_errors_in_the_container_are_not_retried_and_shown_here(project, monkeypatch, capsys, argv, code, expected):
    root, vol = project
    for name in ("train.bin", "val.bin"):  # ids up to 63, metadata claiming a 32-token vocab: passes the pre-flight
        meta = json.loads((vol.root / "data" / f"{name}.json").read_text())
        (vol.root / "data" / f"{name}.json").write_text(json.dumps({**meta, "vocab_size": 32}))
    with pytest.raises(SystemExit) as done:
        _run_main(monkeypatch, project, argv)
    assert done.value.code == code
    assert tm.train_remote.calls[0].attempts == 1  # not retried
    err = capsys.readouterr().err
    assert expected in err and err.strip().splitlines()[-1].startswith("error: ")


def test_a_diverged_run_exits_3_after_one_attempt(project, monkeypatch, capsys):
    import cs336_basics.train as train_mod

    real_step = train_mod.train_step
    monkeypatch.setattr(train_mod, "train_step", lambda *a, **k: (real_step(*a, **k)[0] * math.nan, torch.tensor(1.0)))
    with pytest.raises(SystemExit) as done:
        _run_main(monkeypatch, project, "--config-path tiny.yaml")
    assert done.value.code == EXIT_DIVERGED and tm.train_remote.calls[0].attempts == 1
    assert "diverged" in capsys.readouterr().err


def test_a_crash_on_every_attempt_ends_with_a_hint_and_the_traceback(project, monkeypatch, capsys):
    import cs336_basics.train as train_mod

    def crash(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(train_mod, "train_step", crash)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        _run_main(monkeypatch, project, "--config-path tiny.yaml")
    assert tm.train_remote.calls[0].attempts == 1 + tm.MAX_RETRIES
    assert "failed on Modal after its retries" in capsys.readouterr().err


def test_attach_waits_for_an_earlier_call(project, monkeypatch, capsys):
    root, vol = project
    cfg = config_to_dict(load_config("tiny.yaml"))
    call = FakeCall(Containers(root, vol), dict(config=cfg, source="tiny.yaml", launch_id="l", gpu="A10G"))
    seen = []
    monkeypatch.setattr(modal.FunctionCall, "from_id", lambda call_id, client=None: seen.append(call_id) or call)
    monkeypatch.setattr(tm, "RUN_OPTIONS", set())
    tm.main.info.raw_f(**parse_entrypoint_args(tm.main, ["--attach", "fc-test"]))
    assert seen == ["fc-test"]
    out = capsys.readouterr().out
    assert "Waiting for fc-test" in out and "Finished: iteration 4" in out and "Time and cost" in out

    def unknown(call_id, client=None):
        raise modal.exception.NotFoundError("no such function call")

    monkeypatch.setattr(modal.FunctionCall, "from_id", unknown)
    with pytest.raises(SystemExit) as done:
        tm.main.info.raw_f(**parse_entrypoint_args(tm.main, ["--attach", "fc-nope"]))
    assert done.value.code == EXIT_USER_ERROR and "no training call fc-nope" in capsys.readouterr().err


def test_ctrl_c_while_waiting_says_what_happens_to_the_run(project, monkeypatch, capsys):
    class Interrupted(FakeFunction):
        def spawn(self, *args, **kwargs):
            call = super().spawn(*args, **kwargs)
            call.get = lambda timeout=None, *, index=0: (_ for _ in ()).throw(KeyboardInterrupt())
            return call

    root, vol = project
    monkeypatch.setattr(tm, "volume", vol)
    for options, expected in (((), "the run stops"), ({"--detach"}, "the run goes on (detached)")):
        monkeypatch.setattr(tm, "train_remote", Interrupted(Containers(root, vol)))
        with pytest.raises(SystemExit) as done:
            monkeypatch.setattr(tm, "RUN_OPTIONS", set(options))
            tm.main.info.raw_f(**parse_entrypoint_args(tm.main, ["--config-path", "tiny.yaml"]))
        assert done.value.code == 130 and expected in capsys.readouterr().err


def test_the_gpu_must_be_the_declared_one(project, monkeypatch, capsys):
    _, vol = project
    monkeypatch.setattr(tm, "volume", vol)
    monkeypatch.setattr(tm, "FUNCTION_OPTIONS", tm.function_options("A10G"))
    with pytest.raises(SystemExit) as done:
        tm.main.info.raw_f(**parse_entrypoint_args(tm.main, ["--config-path", "tiny.yaml", "--gpu", "H100"]))
    assert done.value.code == EXIT_USER_ERROR and "declared with gpu=A10G" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, expected",
    [
        ("--config-path tiny.yaml --overrides model.vocab_size=10000", "vocab_size mismatch"),
        ("--config-path missing.yaml", "missing.yaml not found"),
        ("--config-path tiny.yaml --gpu V100", "unknown GPU 'V100'"),
        ("--config-path tiny.yaml --overrides training.bach_size=8", "did you mean training.batch_size"),
        ("--config-path tiny.yaml --gpu H100:8", "divisible by 8 process(es)"),
    ],
)
def test_entrypoint_stops_before_any_gpu_on_bad_input(project, monkeypatch, capsys, argv, expected):
    _, vol = project
    remote = FakeFunction(Containers(project[0], vol))
    monkeypatch.setattr(tm, "volume", vol)
    monkeypatch.setattr(tm, "train_remote", remote)
    with pytest.raises(SystemExit) as done:
        tm.main.info.raw_f(**parse_entrypoint_args(tm.main, shlex.split(argv)))
    assert done.value.code == EXIT_USER_ERROR and remote.calls == []
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1, err


def test_workflow_training_commands_parse_and_pass_the_checks_before_connecting(monkeypatch):
    monkeypatch.chdir(Path(cs336_basics.__file__).resolve().parent.parent)  # commands run from the project root
    for argv in ("", "--wandb --run-name my-experiment",
                 "--config-path cs336_basics/config.yaml --wandb --run-name tinystories-10k-vocab",
                 "--wandb --run-name experiment-1", "--gpu H100:8 --resume", "--gpu H100,A100-80GB",
                 "--gpu A100 --overrides 'training.batch_size=64 training.max_iters=20000'", "--attach fc-123"):
        kwargs = parse_entrypoint_args(tm.main, shlex.split(argv))
        assert set(kwargs) == {"config_path", "wandb", "run_name", "gpu", "resume", "overrides", "attach", "preset",
                               "sweep", "sweep_name"}
        assert mu.parse_cli_args(shlex.split(argv), tm.main.info.raw_f) == kwargs
        tm.check_launch_args(**kwargs)  # raises for anything the import-time check would refuse
    assert parse_entrypoint_args(tm.main, ["--wandb", "--run-name", "x"])["wandb"] is True


def test_running_the_file_with_python_says_how_to_run_it(capsys):
    import subprocess

    proc = subprocess.run([sys.executable, tm.__file__], capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_USER_ERROR and "modal run cs336_basics/train_modal.py" in proc.stderr


# --- multi-GPU: torchrun launch, exit codes, and the commit watcher --------------------------------------------


def test_torchrun_command_and_environment(tmp_path, monkeypatch):
    cmd = tm.torchrun_command(Path("/tmp/c.yaml"), 8, wandb=True, run_name="r", resume=True)
    assert cmd[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=8"]
    assert cmd[5:] == ["-m", "cs336_basics.modal_worker", "--config-path", "/tmp/c.yaml",
                       "--wandb", "--run-name", "r", "--resume"]
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = tm.torchrun_env(tmp_path)
    assert env["PYTHONPATH"].split(":") == [str(Path(cs336_basics.__file__).resolve().parent.parent), "/elsewhere"]
    assert env[tm.STATUS_ENV] == str(tmp_path)


def test_the_torchrun_worker_records_its_exit_code(tmp_path, monkeypatch, capsys):
    from cs336_basics import modal_worker

    monkeypatch.setenv(modal_worker.STATUS_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    code = modal_worker.main(["--config-path", str(tmp_path / "missing.yaml")])
    assert code == EXIT_USER_ERROR and (tmp_path / "rank1").read_text() == "2"
    (tmp_path / "rank10").write_text("3")
    assert modal_worker.exit_codes(tmp_path) == [2, 3]  # by rank, numerically
    import subprocess

    probe = "import sys, cs336_basics.modal_worker; print(sorted({'modal', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300).stdout
    assert out.strip() == "[]"  # the workers do not pay for importing modal


def test_checkpoint_watcher_commits_on_new_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setattr(tm, "COMMIT_RETRY_S", 0.0)
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


FAKE_TORCHRUN = """\
import os, shutil, sys, time
config, ckpts, made, code, status = sys.argv[1:6]
shutil.copy(config, ckpts + '/../seen_config.yaml')
shutil.copy(made, ckpts + '/.checkpoint_iter_2.pt.tmp')
shutil.move(ckpts + '/.checkpoint_iter_2.pt.tmp', ckpts + '/checkpoint_iter_2.pt')
deadline = time.monotonic() + 120  # wait until the watcher has committed checkpoint_iter_2
while not os.path.exists(ckpts + '/../committed') and time.monotonic() < deadline:
    time.sleep(0.02)
if code == '0':
    shutil.copy(made, ckpts + '/checkpoint_final.pt')
elif code in ('2', '3'):  # like torchrun: the worker records its code, torchrun itself exits 1
    print('error: training loss became nan at iteration 3: the run diverged', file=sys.stderr)
    open(os.path.join(os.environ['CS336_TORCHRUN_STATUS_DIR'], 'rank0'), 'w').write(code)
sys.exit(0 if code == '0' else 1)  # '1': a crash, no code recorded
"""


def test_multi_gpu_path_commits_each_checkpoint_and_stops_on_no_retry_codes(project, monkeypatch, capsys):
    """run_training with nproc > 1, torchrun replaced by a script that writes checkpoints like rank 0."""
    from cs336_basics.checkpoint import save_checkpoint

    root, vol = project
    made = root / "made.pt"
    save_checkpoint(torch.nn.Linear(1, 1), None, 4, made, train_loss=1.5, val_loss=1.25)
    script = root / "fake_torchrun.py"
    script.write_text(FAKE_TORCHRUN)
    launched, exit_code = [], ["0"]
    container = Containers(root, vol).start()
    ckpts = container.path / "checkpoints"

    def command(config_file, nproc, *, wandb, run_name, resume):
        launched.append((nproc, wandb, run_name, resume))
        return [sys.executable, str(script), str(config_file), str(ckpts), str(made), exit_code[0], "x"]

    monkeypatch.setattr(tm, "torchrun_command", command)

    def commit():  # tells the fake torchrun that a commit happened while checkpoint_iter_2 existed
        container.commit()
        if (ckpts / "checkpoint_iter_2.pt").exists():
            (container.path / "committed").touch()

    config = config_to_dict(load_config("tiny.yaml", ["training.batch_size=8"]))
    result = tm.run_training(container.path, config, commit=commit, launch_id="m", nproc=8, run_name="r", poll_s=0.05)
    assert launched == [(8, False, "r", False)]
    assert result["iterations"] == 4 and result["checkpoint"] == str(ckpts / "checkpoint_final.pt")
    assert result["final_train_loss"] == 1.5 and result["final_val_loss"] == 1.25 and result["gpu_count"] == 8
    assert committed(vol) == ["checkpoint_final.pt", "checkpoint_iter_2.pt"]
    seen = load_config(container.path / "seen_config.yaml")  # what the training processes were given
    assert Path(seen.data.data_dir).name.startswith("cs336-data-")  # a local copy, not the volume (see below)
    assert seen.data.checkpoint_dir == str(ckpts) and seen.training.batch_size == 8

    exit_code[0] = "3"  # a diverged worker: torchrun exits 1, but retrying cannot help
    (container.path / "committed").unlink()
    result = tm.run_training(container.path, config, commit=commit, launch_id="m2", nproc=8, poll_s=0.05)
    assert (result["error"], result["exit_code"]) == ("training loss became nan at iteration 3: the run diverged", 3)
    assert result["gpu_count"] == 8 and result["attempts"] == 1 and result["wall_s"] > 0  # its cost is known
    assert "torchrun exited with code 1; its workers with [3]" in capsys.readouterr().out

    exit_code[0] = "1"  # a crash (no status file): raise, so Modal retries (and the retry resumes)
    with pytest.raises(RuntimeError, match="failed .*exit code 1.*none recorded.*Modal retries"):
        tm.run_training(container.path, config, commit=commit, launch_id="m3", nproc=8, poll_s=0.05)


# --- sweeps: one spawned call per run, each in its own container, the table rewritten in the volume ---------------

SWEEP = ("--config-path tiny.yaml --sweep training.max_lr=1e-2,1e6 --sweep-name lr "
         "--overrides 'training.grad_clip=0 training.warmup_iters=0 training.min_lr=0'")


def sweep_dir(vol: FakeVolume, name: str = "lr") -> Path:
    return vol.root / "checkpoints" / "sweeps" / name


def committed_table(vol: FakeVolume, name: str = "lr") -> dict:
    return json.loads((sweep_dir(vol, name) / "sweep.json").read_text())


class ClientGone(FakeFunction):
    """The terminal goes away right after the launch (``modal run --detach``); Modal runs the calls regardless
    (``run`` stands for its servers)."""

    def spawn(self, *args, **kwargs):
        call = super().spawn(*args, **kwargs)
        call.run = call.get
        call.get = lambda timeout=None, *, index=0: (_ for _ in ()).throw(KeyboardInterrupt())
        return call


def test_a_detached_sweep_writes_its_table_in_the_volume_without_the_terminal(project, monkeypatch, capsys):
    root, vol = project
    remote = ClientGone(Containers(root, vol))
    monkeypatch.setattr(tm, "train_remote", remote)
    launch = ["/x/bin/modal", "run", "--detach", "cs336_basics/train_modal.py", *shlex.split(SWEEP)]
    monkeypatch.setattr(sys, "argv", launch)
    with pytest.raises(SystemExit) as done:
        _run_main(monkeypatch, project, SWEEP, run_options={"--detach"}, remote=remote)
    monkeypatch.setattr(sys, "argv", ["/pkg/modal/_container_entrypoint.py"])  # what the containers have
    captured = capsys.readouterr()
    assert done.value.code == 130 and "interrupted: the sweep goes on (detached)" in captured.err
    assert [c.kwargs["run_name"] for c in remote.calls] == ["max_lr=1e-2", "max_lr=1e6"]
    out = captured.out
    assert "Sweep lr: 2 run(s) over training.max_lr, each in its own container on A10G" in out
    assert "  max_lr=1e-2: 256 tokens; about" in out and "Total for 2 run(s) on A10G x1: about $" in out
    assert "Calls: max_lr=1e-2 fc-test, max_lr=1e6 fc-test1" in out
    assert "Detached: closing this terminal does not stop the sweep" in out and "--attach fc-test,fc-test1" in out
    assert not sweep_dir(vol).exists()  # nothing ran yet

    # Modal runs both calls. Their containers started side by side at the launch, so the one ending last saw the
    # other's result only by reloading the volume: the complete table proves it did.
    for call in remote.calls:
        call.run()
    assert [c.attempts for c in remote.calls] == [1, 1]  # the divergence is a result, not retried
    table = committed_table(vol)
    assert table["name"] == "lr" and table["axes"] == [["training.max_lr", ["1e-2", "1e6"]]]
    assert table["command"] == launch  # the launch's command line, not the container's
    assert [(r["name"], r["status"]) for r in table["runs"]] == [("max_lr=1e-2", "finished"),
                                                                  ("max_lr=1e6", "diverged")]
    assert table["best"] == "max_lr=1e-2" and "diverged" in table["runs"][1]["error"]
    folder = sweep_dir(vol)
    assert (folder / "sweep.csv").read_text().count("\n") == 3 and (folder / "curves.png").stat().st_size > 1000
    finished, diverged = folder / "max_lr=1e-2", folder / "max_lr=1e6"
    assert sorted(p.name for p in finished.glob("*.pt")) == ["checkpoint_final.pt", "checkpoint_iter_2.pt",
                                                           "checkpoint_iter_4.pt"]
    assert "checkpoint_final.pt" not in [p.name for p in diverged.glob("*.pt")]
    launches = set()
    for run, status, lr in ((finished, "finished", "1e-2"), (diverged, "diverged", "1e6")):
        record = json.loads((run / "run.json").read_text())
        assert record["status"] == status and record["name"] == run.name and (run / "metrics.jsonl").is_file()
        assert record["sweep"] == {"name": "lr", "values": {"training.max_lr": lr}}
        assert record["config"]["wandb"]["group"] == "lr" and record["config"]["training"]["max_lr"] == float(lr)
        launches.add(json.loads((run / ".launch.json").read_text())["launch_id"])
    assert len(launches) == 2  # each run claimed its own folder
    assert committed(vol) == []  # nothing at the top of /checkpoints/, where single runs go

    # back at a terminal: --attach with the printed ids waits for the calls and shows their rows and cost
    calls = {c.object_id: c for c in remote.calls}
    monkeypatch.setattr(modal.FunctionCall, "from_id", lambda call_id, client=None: calls[call_id])
    for call in remote.calls:
        call.get = call.run
    tm.main.info.raw_f(**parse_entrypoint_args(tm.main, ["--attach", "fc-test,fc-test1"]))
    out = capsys.readouterr().out
    assert "max_lr=1e-2: finished" in out and "max_lr=1e6: diverged: training loss" in out
    assert re.search(r"\*\s+1e-2\s+finished", out) and "Time and cost of 2 run(s):" in out
    assert ("modal run cs336_basics/modal_utils.py --action download --remote-name sweeps/lr/sweep.csv "
            "--local-path checkpoints/sweeps/lr/sweep.csv") in out

    # the same --sweep-name again: every run has ended, so nothing is launched and the table is shown
    again = _run_main(monkeypatch, project, SWEEP)
    assert again.calls == [] and "Every run of sweep lr has ended" in capsys.readouterr().out
    # a run that did not end (here: recorded as running, its launch stopped) runs again, the others are kept
    record = json.loads((diverged / "run.json").read_text())
    (diverged / "run.json").write_text(json.dumps({**record, "status": "running"}))
    third = _run_main(monkeypatch, project, SWEEP)
    assert [c.kwargs["run_name"] for c in third.calls] == ["max_lr=1e6"]
    out = capsys.readouterr().out
    assert "kept (ended: finished, diverged, or out of an unchanged time budget): max_lr=1e-2" in out
    assert "1 run(s) of sweep lr are recorded as running (max_lr=1e6): if the launch that started them" in out
    assert [r["status"] for r in committed_table(vol)["runs"]] == ["finished", "diverged"]


def test_ctrl_c_stops_a_sweep_and_says_how_to_continue_it(project, monkeypatch, capsys):
    root, vol = project
    remote = ClientGone(Containers(root, vol))  # the local wait is interrupted, without --detach
    with pytest.raises(SystemExit) as done:
        _run_main(monkeypatch, project, SWEEP, remote=remote)
    assert done.value.code == 130 and len(remote.calls) == 2
    assert ("interrupted: the sweep stops; its runs' committed checkpoints are kept: continue it with the same "
            "command and --sweep-name lr") in capsys.readouterr().err


def test_a_sweep_whose_run_does_not_fit_the_data_stops_before_any_gpu(project, monkeypatch, capsys):
    _, vol = project
    remote = FakeFunction(Containers(*project))
    monkeypatch.setattr(tm, "train_remote", remote)
    with pytest.raises(SystemExit) as done:
        _run_main(monkeypatch, project, "--config-path tiny.yaml --sweep model.vocab_size=64,128", remote=remote)
    assert done.value.code == EXIT_USER_ERROR and remote.calls == []
    err = capsys.readouterr().err
    assert err.startswith("error: sweep run vocab_size=128: vocab_size mismatch") and err.count("\n") == 1


def test_a_run_that_crashes_is_retried_then_recorded_and_the_sweep_goes_on(project, monkeypatch, capsys):
    import cs336_basics.train as train_mod

    real_step = train_mod.train_step

    def crash_at_high_lr(model, optimizer, *args, **kwargs):  # a GPU fault that hits one run on every attempt
        if optimizer.param_groups[0]["lr"] > 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_step(model, optimizer, *args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", crash_at_high_lr)
    _, vol = project
    remote = _run_main(monkeypatch, project, SWEEP)  # waits for both calls
    assert [c.attempts for c in remote.calls] == [1, 1 + tm.MAX_RETRIES]  # Modal retried the crash
    out = capsys.readouterr().out
    assert "[1/2] max_lr=1e-2: finished" in out
    assert "[2/2] max_lr=1e6: the call failed on Modal after its retries (CUDA error: an illegal memory" in out
    final = out[out.rindex("status"):]  # the table at the end, read from the volume
    assert re.search(r"\*\s+1e-2\s+finished", final) and re.search(r"\n\s+1e6\s+failed", final)
    assert "max_lr=1e6: failed: crash: RuntimeError: CUDA error" in final
    assert "Time and cost of 1 run(s):" in out and "Ctrl-C or closing this terminal stops the sweep" in out
    # each failed attempt recorded itself (the last one is what stays) and rewrote the table in the volume
    assert [r["status"] for r in committed_table(vol)["runs"]] == ["finished", "failed"]
    record = json.loads((sweep_dir(vol) / "max_lr=1e6" / "run.json").read_text())
    assert record["status"] == "failed" and record["error"].startswith("crash: RuntimeError: CUDA error")


def test_a_preempted_sweep_run_resumes_from_its_own_checkpoints(project, monkeypatch, capsys):
    _, vol = project
    remote = _run_main(monkeypatch, project, "--config-path tiny.yaml --sweep training.seed=1 --sweep-name seeds",
                       hooks=[preempt_at(2)])  # its launch record, checkpoint_iter_2, then preempted
    (call,) = remote.calls
    assert call.attempts == 2 and "restarted by Modal (attempt 2): continuing from" in capsys.readouterr().out
    run = sweep_dir(vol, "seeds") / "seed=1"
    assert len(json.loads((run / ".launch.json").read_text())["attempts"]) == 2
    (row,) = committed_table(vol, "seeds")["runs"]
    assert row["status"] == "finished" and row["iterations"] == 4


def test_two_runs_ending_together_leave_a_complete_table(tmp_path):
    """Modal keeps the last commit of a file whole: a table written from a view older than another run's result may
    be committed after that run's complete table. Rewriting until the volume agrees repairs it."""
    from cs336_basics.runs import RunRecord, write_run_record
    from cs336_basics.sweep import parse_sweep, plan_sweep

    axes = parse_sweep(["training.max_lr=1e-3,2e-3"])

    def race(rounds: int) -> list[str]:
        vol = FakeVolume(tmp_path / f"volume{rounds}")
        first, second = vol.mount(tmp_path / f"a{rounds}"), vol.mount(tmp_path / f"b{rounds}")
        points = {}
        for i, container in enumerate((first, second)):  # each container's run has just ended
            points[container] = plan_sweep(axes, container.path / "checkpoints" / "sweeps" / "s")
            run = points[container][i]
            write_run_record(run.run_dir, RunRecord(name=run.name, status="finished", iterations=4, best_val_loss=2.0))

        def publish(container, reload):
            tm.publish_sweep(points[container][0].run_dir.parent, points[container], axes, name="s", started_at=None,
                             commit=container.commit, reload=reload, rounds=rounds)

        def reload_then_the_other_ends():
            first.reload()
            if not second.commits:  # the second run ends (and writes a complete table) right after this reload
                publish(second, second.reload)

        publish(first, reload_then_the_other_ends)
        return [r["status"] for r in json.loads((vol.root / "checkpoints/sweeps/s/sweep.json").read_text())["runs"]]

    assert race(rounds=1) == ["finished", "pending"]  # the stale table won: what a single write would leave
    assert race(rounds=tm.PUBLISH_ROUNDS) == ["finished", "finished"]


def test_the_stand_in_volume_has_modal_commit_semantics(tmp_path):
    vol = FakeVolume(tmp_path / "volume")
    a, b = vol.mount(tmp_path / "a"), vol.mount(tmp_path / "b")
    for container, name in ((a, "a.txt"), (b, "b.txt")):
        (container.path / "x").mkdir()
        (container.path / "x" / name).write_text(name)
    a.commit()
    b.commit()  # concurrent commits of different files: both kept
    assert sorted(p.name for p in (vol.root / "x").iterdir()) == ["a.txt", "b.txt"]
    assert (b.path / "x" / "a.txt").read_text() == "a.txt" and not (a.path / "x" / "b.txt").exists()
    (a.path / "t.txt").write_text("from a")
    (b.path / "t.txt").write_text("from b")
    b.commit()
    a.commit()  # the same file: the last commit wins, whatever its writer had not seen
    assert (vol.root / "t.txt").read_text() == "from a" and (b.path / "t.txt").read_text() == "from b"
    b.reload()  # brings in what others committed
    assert (b.path / "t.txt").read_text() == "from a"
    (b.path / "x" / "a.txt").unlink()
    with pytest.raises(RuntimeError, match=r"uncommitted changes \(x/a.txt\)"):
        b.reload()  # Modal may or may not commit the removal first: code must commit before reloading
    b.commit()  # a removal is a change too
    a.reload()
    assert not (vol.root / "x" / "a.txt").exists() and not (a.path / "x" / "a.txt").exists()
    assert (a.path / "x" / "b.txt").is_file()


@pytest.mark.parametrize("args, expected", [
    ("--sweep training.max_lr", "--sweep 'training.max_lr' must look like section.key=v1,v2"),
    ("--config-path tiny.yaml --sweep training.max_lr=1e-3,abc",
     "sweep run max_lr=abc: override 'training.max_lr=abc'"),
    ("--config-path tiny.yaml --gpu A10:4 --sweep training.batch_size=4,6",
     "sweep run batch_size=6: tiny.yaml: training.batch_size=6 must be divisible by 4"),
    ("--sweep training.max_lr=1e-3 --overrides training.max_lr=1e-2", "both swept"),
    ("--sweep data.data_dir=a,b", "--sweep data.data_dir: on Modal the data is /data/<data.train_path>"),
    ("--sweep-name lr", "--sweep-name needs at least one --sweep"),
    ("--sweep training.max_lr=1e-3,1e-2 --run-name x", "drop --run-name / --resume"),
    ("--sweep training.max_lr=1e-3 --resume", "the same --sweep-name again continues a sweep"),
    ("--sweep training.max_lr=1e-3 --sweep-name a/b", "--sweep-name 'a/b': use up to 120 letters"),
    ("--preset nope", "--preset nope: no such preset; choose one of cpu, leaderboard"),
    ("--preset cpu --config-path tiny.yaml", "give one of them"),
    ("--attach fc-1,2", "each starts with fc-"),
])
def test_bad_sweep_and_preset_arguments_stop_before_the_credentials(monkeypatch, tmp_path, capsys, args, expected):
    test_bad_launch_arguments_stop_before_the_credentials(monkeypatch, tmp_path, capsys, args, expected)


def test_every_repeated_sweep_flag_is_used(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    monkeypatch.setattr(mu, "has_credentials", lambda: True)
    args = ["--config-path", "tiny.yaml", "--sweep", "training.max_lr=1e-3,1e-2", "--sweep=training.batch_size=4,8"]
    import_fresh(monkeypatch, ["/x/bin/modal", "run", "cs336_basics/train_modal.py", *args])
    module = sys.modules["train_modal_recorded"]
    assert parse_entrypoint_args(tm.main, args)["sweep"] == "training.batch_size=4,8"  # Modal's parser: the last one
    assert module.LAUNCH_ARGS["sweep"] == ["training.max_lr=1e-3,1e-2", "training.batch_size=4,8"]
    assert module.checked_launch(parse_entrypoint_args(tm.main, args)) is module.LAUNCH  # what main plans with
    assert module.LAUNCH.axes == [("training.max_lr", ["1e-3", "1e-2"]), ("training.batch_size", ["4", "8"])]
    assert [(c.training.max_lr, c.training.batch_size) for c in module.LAUNCH.configs] == [
        (1e-3, 4), (1e-3, 8), (1e-2, 4), (1e-2, 8)]


def test_modal_run_checks_the_arguments_once(project, monkeypatch):
    """Each run's config is loaded and checked once, before connecting; main plans with that result."""
    import cs336_basics.config as config_mod

    _, vol = project
    loaded = []
    real = config_mod.load_config
    monkeypatch.setattr(config_mod, "load_config", lambda *a, **kw: loaded.append(a) or real(*a, **kw))
    monkeypatch.setattr(mu, "has_credentials", lambda: True)
    args = ["--config-path", "tiny.yaml", "--sweep", "training.max_lr=1e-3,1e-2", "--sweep=training.batch_size=4,8"]
    import_fresh(monkeypatch, ["/x/bin/modal", "run", "cs336_basics/train_modal.py", *args])
    module = sys.modules["train_modal_recorded"]
    assert len(loaded) == 4  # one per run of the sweep
    plans = []
    monkeypatch.setattr(module, "volume", vol)
    monkeypatch.setattr(module, "launch_sweep", lambda plan: plans.append(plan) or 0)
    module.main.info.raw_f(**parse_entrypoint_args(tm.main, args))  # as Modal's CLI calls it: only the last --sweep
    (plan,) = plans
    assert len(loaded) == 4 and plan.sweep.axes == module.LAUNCH.axes and len(plan.calls) == 4


def test_modal_run_looks_up_the_wandb_secret_once(project, monkeypatch):
    _, vol = project
    hydrated = []

    class Secret:
        def hydrate(self):
            hydrated.append(self)
            return self

    monkeypatch.setattr(modal.Secret, "from_name", lambda name, **kwargs: Secret())
    monkeypatch.setattr(mu, "has_credentials", lambda: True)
    args = ["--config-path", "tiny.yaml", "--wandb"]
    import_fresh(monkeypatch, ["/x/bin/modal", "run", "cs336_basics/train_modal.py", *args])
    module = sys.modules["train_modal_recorded"]
    assert len(hydrated) == 1  # before connecting
    plans = []
    monkeypatch.setattr(module, "volume", vol)
    monkeypatch.setattr(module, "launch_run", lambda plan: plans.append(plan) or 0)
    module.main.info.raw_f(**parse_entrypoint_args(tm.main, args))
    assert len(plans) == 1 and plans[0].calls[0]["wandb"] is True and len(hydrated) == 1
    monkeypatch.setattr(module, "LAUNCH", None)  # main called some other way than `modal run`: it checks the secret itself
    module.main.info.raw_f(**parse_entrypoint_args(tm.main, args))
    assert len(plans) == 2 and len(hydrated) == 2


def test_a_sweep_is_checked_run_by_run_not_as_its_base_config(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    # the base alone is invalid twice over: min_lr above the default max_lr, and batch_size 4 not divisible by 8 GPUs
    args = tm.check_launch_args("tiny.yaml", gpu="A100:8", overrides="training.min_lr=1e-3",
                                sweep=["training.max_lr=1e-2,1e-1", "training.batch_size=8,16"])
    assert [(c.training.max_lr, c.training.batch_size) for c in args.configs] == [
        (1e-2, 8), (1e-2, 16), (1e-1, 8), (1e-1, 16)]
    assert args.cfg is args.configs[0]
    with pytest.raises(UserError, match="sweep run max_lr=1e-4_batch_size=8: .*min_lr"):
        tm.check_launch_args("tiny.yaml", gpu="A100:8", overrides="training.min_lr=1e-3",
                             sweep=["training.max_lr=1e-4,1e-2", "training.batch_size=8,16"])


def test_a_time_budget_bounds_each_attempt_and_the_plan_says_so(project, monkeypatch):
    from cs336_basics.config import PRESETS_DIR

    leaderboard = load_config(PRESETS_DIR / "leaderboard.yaml")
    assert tm.attempt_timeout_s([leaderboard]) == 90 * 60 + tm.BUDGET_MARGIN_S
    assert tm.attempt_timeout_s([load_config(None)]) == tm.TIMEOUT_S  # no budget: Modal's maximum
    assert tm.attempt_timeout_s([load_config(None, ["training.max_time=30h"])]) == tm.TIMEOUT_S  # capped
    assert tm.attempt_timeout_s([leaderboard, load_config(None)]) == tm.TIMEOUT_S  # a sweep with a run without one

    # `--preset leaderboard --gpu H100` passes the checks before connecting and declares the budget's timeout
    monkeypatch.setattr(mu, "has_credentials", lambda: True)
    recorded, _ = import_fresh(monkeypatch, ["/x/bin/modal", "run", "cs336_basics/train_modal.py", "--preset",
                                             "leaderboard", "--gpu", "H100"])
    (kwargs,) = recorded
    assert kwargs["gpu"] == "H100" and kwargs["timeout"] == 105 * 60
    assert sys.modules["train_modal_recorded"].LAUNCH.cfg.source.endswith("presets/leaderboard.yaml")
    lines = tm.plan_lines(leaderboard, gpus.parse_gpu_spec("H100"))
    assert lines[1].startswith("Time budget: training.max_time=90m ends a run") and "after 1 h 45 min" in lines[1]
    assert lines[2].startswith("  H100 x1 (80 GB each): the 1.5 h budget ends it, after about")
    assert lines[2].endswith(f"tokens, ${1.5 * 3.95:,.2f} at $3.95/h")

    # a sweep over budgets: each attempt may run the longest one plus the margin
    _, vol = project
    plan = tm.plan_launch(vol, config_path="tiny.yaml", sweep=["training.max_time=30m,1h"], sweep_name="budgets")
    assert plan.timeout_s == 3600 + tm.BUDGET_MARGIN_S and len(plan.calls) == 2
    text = "\n".join(tm.sweep_plan_lines(plan))
    assert "Time budget: training.max_time=1h, 30m ends a run" in text and "after 1 h 15 min" in text
    assert tm.function_options("A10G", timeout_s=plan.timeout_s)["timeout"] == 4500

    # resumed, a run its budget ended is kept while the budget is the same, and continued when it was raised
    from cs336_basics.runs import RunRecord, write_run_record

    for run, budget in (("max_time=30m", "30m"), ("max_time=1h", "20m")):
        write_run_record(vol.root / "checkpoints" / "sweeps" / "budgets" / run, RunRecord(
            name=run, status="out_of_time", config={"training": {"max_time": budget}}))
    again = tm.plan_launch(vol, config_path="tiny.yaml", sweep=["training.max_time=30m,1h"], sweep_name="budgets")
    assert [c["run_name"] for c in again.calls] == ["max_time=1h"]


def test_sweep_helpers_for_runs_made_elsewhere(tmp_path):
    from cs336_basics.runs import RunRecord, read_run_record, write_run_record
    from cs336_basics.sweep import SweepError, check_name, default_name, parse_sweep, plan_sweep, read_rows, run_point

    axes = parse_sweep(["training.max_lr=1e-3,2e-3"])
    assert re.fullmatch(r"sweep-max_lr-\d{8}-\d{6}", default_name(axes))
    assert check_name("lr-sweep_2") == "lr-sweep_2"
    for bad in ("a/b", ".hidden", "", "x" * 121):
        with pytest.raises(SweepError, match="--sweep-name"):
            check_name(bad)
    points = plan_sweep(axes, tmp_path)
    write_run_record(points[0].run_dir, RunRecord(name=points[0].name, status="finished", best_val_loss=1.5))
    assert [(r["status"], r["best_val_loss"]) for r in read_rows(points)] == [("finished", 1.5), ("pending", None)]

    def crash(overrides, name, run_dir):
        raise RuntimeError("lost the GPU")

    with pytest.raises(RuntimeError, match="lost the GPU"):  # for a caller that retries (Modal)...
        run_point(points[1], crash, sweep_name="s", raise_crashes=True)
    record = read_run_record(points[1].run_dir)  # ...recorded first, should no retry be left
    assert record.status == "failed" and record.error == "crash: RuntimeError: lost the GPU"


def test_every_train_modal_command_in_the_guide_passes_the_checks_before_connecting(monkeypatch):
    root = Path(cs336_basics.__file__).resolve().parent.parent
    monkeypatch.chdir(root)  # the guide's commands run from the project root
    blocks = re.findall(r"```bash\n(.*?)```", (root / "MODAL_GUIDE.md").read_text(), re.S)
    commands = re.findall(r"modal run (?:--detach )?cs336_basics/train_modal\.py([^\n#]*)",
                          "\n".join(blocks).replace("\\\n", " "))
    assert len(commands) >= 15
    for args in commands:
        kwargs = mu.parse_cli_args(shlex.split(args), tm.main.info.raw_f, repeatable=("sweep",))
        assert kwargs is not None, args
        tm.check_launch_args(**kwargs)  # raises for anything the import-time check would refuse
