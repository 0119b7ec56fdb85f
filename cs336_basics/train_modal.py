"""Train the Transformer LM on a Modal GPU, with the project's one training loop (cs336_basics/train.py).

    modal run cs336_basics/train_modal.py [--config-path cs336_basics/config.yaml] [--wandb] [--run-name NAME]
        [--gpu A10G|A100|A100-80GB|H100|H100:8] [--resume] [--overrides "training.batch_size=16 model.d_model=256"]

The volume ``transformer-training-vol`` is mounted at ``/vol``: data is read from ``/vol/data/`` (upload it with
modal_utils.py) and checkpoints go to ``/vol/checkpoints/``, the volume committed after each one. Before any GPU
starts, the local entrypoint checks that the configured data files are in the volume and match ``model.vocab_size``.

Resuming: ``--resume`` continues from the newest checkpoint in ``/vol/checkpoints/``. When Modal restarts the call
(preemption, a crash, or the 24 h timeout, up to ``MAX_RETRIES`` times) the new attempt resumes by itself: each
``modal run`` writes a launch id to ``/vol/checkpoints/.launch.json`` and an attempt that finds its own id there is
a restart. A new ``modal run`` without ``--resume`` starts from scratch after moving the previous run's files to
``/vol/checkpoints/previous/<UTC time>/``, so nothing is overwritten and a restart never resumes another run.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import modal
import modal.exception

from cs336_basics.common import UserError
from cs336_basics.fileio import atomic_output
from cs336_basics.modal_utils import VOLUME_NAME, list_files, remote_path, user_error_line

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MOUNT = "/vol"  # the volume's /data and /checkpoints are /vol/data and /vol/checkpoints in the container
DEFAULT_GPU = "A10G"  # used when --gpu is not given
GPU_TYPES = ("T4", "L4", "A10G", "L40S", "A100", "A100-40GB", "A100-80GB", "H100", "H200", "B200")
TIMEOUT_S = 24 * 60 * 60  # Modal's maximum per attempt; each retry gets a fresh 24 h
MAX_RETRIES = 3
WANDB_SECRET = "wandb-secret"  # modal secret create wandb-secret WANDB_API_KEY=...
LAUNCH_FILE = ".launch.json"
ARCHIVE_DIR = "previous"  # a fresh run moves older checkpoints to checkpoints/previous/<time>/
COMMIT_POLL_S = 30.0  # how often the multi-GPU watcher looks for new checkpoints

app = modal.App("cs336-train")
volume = modal.Volume.from_name(VOLUME_NAME, create_if_missing=True)
image = (
    modal.Image.debian_slim(python_version="3.11")
    .uv_sync(str(PROJECT_ROOT), extra_options="--no-dev")  # the locked dependencies from uv.lock, no dev tools
    .add_local_python_source("cs336_basics")
)
FUNCTION_OPTIONS: dict[str, Any] = dict(
    image=image,
    gpu=DEFAULT_GPU,
    volumes={MOUNT: volume},
    timeout=TIMEOUT_S,
    retries=modal.Retries(max_retries=MAX_RETRIES, initial_delay=10.0, backoff_coefficient=2.0, max_delay=60.0),
)


class PreflightError(UserError):
    """The launch would fail on the GPU; the message says what to run or change instead."""


# ----------------------------------------------------------------------------- launch plan (local)


def gpu_count(spec: str) -> int:
    """Number of GPUs in a Modal GPU spec: 'A100' -> 1, 'H100:8' -> 8; PreflightError for an unknown spec."""
    match = re.fullmatch(r"([A-Za-z0-9-]+)(?::(\d+))?", spec.strip())
    kind = match.group(1).upper() if match else ""
    if kind not in GPU_TYPES:
        raise PreflightError(f"unknown --gpu {spec!r}: use one of {', '.join(GPU_TYPES)}, optionally with :N GPUs (e.g. H100:8)")
    count = int(match.group(2) or 1)
    if not 1 <= count <= 8:
        raise PreflightError(f"--gpu {spec!r}: a container has 1 to 8 GPUs")
    return count


def function_options(gpu: str, wandb: bool) -> dict[str, Any]:
    """Call-time options for ``train_remote.with_options``: the GPU, and the W&B secret only when logging."""
    gpu_count(gpu)
    options: dict[str, Any] = {"gpu": gpu.strip()}
    if wandb:
        options["secrets"] = [modal.Secret.from_name(WANDB_SECRET, required_keys=["WANDB_API_KEY"])]
    return options


def upload_command(local: str | Path, remote_name: str) -> str:
    return (f"modal run cs336_basics/modal_utils.py --action upload --local-path {local} "
            f"--remote-name {remote_name} --data-type data")


def read_remote_metadata(vol: Any, remote_name: str) -> dict | None:
    """The metadata JSON beside a .bin in the volume's /data/, validated as tokenize_data does; None if absent."""
    from cs336_basics.data import metadata_path, read_metadata

    meta_name = metadata_path(Path(remote_name)).as_posix()
    if meta_name not in {f.name for f in list_files(vol, "data")}:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        local_bin = Path(tmp) / Path(remote_name).name
        metadata_path(local_bin).write_bytes(b"".join(vol.read_file("/" + remote_path(meta_name, "data"))))
        try:
            return read_metadata(local_bin)
        except ValueError as exc:
            raise PreflightError(f"/data/{meta_name} in volume {VOLUME_NAME}: {exc}") from None


def preflight(vol: Any, cfg: Any, *, resume: bool = False) -> list[str]:
    """Check the volume holds the configured data, matching ``model.vocab_size``; returns notes to print.

    Raises PreflightError naming the upload command or config change that fixes the first problem found.
    """
    notes = []
    remote = {f.name: f for f in list_files(vol, "data")}
    metas = {}
    for split, rel in (("train", cfg.data.train_path), ("val", cfg.data.val_path)):
        if Path(rel).is_absolute():
            raise PreflightError(
                f"data.{split}_path={rel} is absolute; on Modal it must be a name inside the volume's /data/ "
                f"(e.g. data.{split}_path={Path(rel).name})"
            )
        name = Path(rel).as_posix()
        local = Path(cfg.data.data_dir) / rel
        if name not in remote:
            present = ", ".join(sorted(remote)) or "nothing"
            raise PreflightError(
                f"Data file not found on Modal: /data/{name} (data.{split}_path) is not in volume {VOLUME_NAME} "
                f"(/data/ holds: {present}). Upload it with: {upload_command(local, name)}"
            )
        meta = read_remote_metadata(vol, name)
        if meta is None:
            notes.append(f"note: /data/{name} has no metadata JSON beside it, so its vocab_size cannot be checked; "
                         f"re-upload it from a folder holding {Path(local).name}.json to enable the check")
            continue
        metas[split] = meta
        vocab = int(meta["vocab_size"])
        if vocab != cfg.model.vocab_size:
            where = cfg.source or "the config"
            raise PreflightError(
                f"vocab_size mismatch: config model.vocab_size={cfg.model.vocab_size} but /data/{name} was tokenized "
                f"with a {vocab}-token vocab: set model.vocab_size: {vocab} in {where} (or --overrides "
                f"model.vocab_size={vocab}), or re-tokenize with --vocab-size {cfg.model.vocab_size} and upload again "
                "with --force"
            )
        itemsize = 2 if meta["dtype"] == "uint16" else 4
        expected = int(meta["num_tokens"]) * itemsize
        if remote[name].size != expected:
            raise PreflightError(
                f"/data/{name} in volume {VOLUME_NAME} is {remote[name].size} bytes but its metadata says "
                f"{expected} ({meta['num_tokens']} {meta['dtype']} tokens): the upload is stale or incomplete; "
                f"{upload_command(local, name)} --force"
            )
        if int(meta["num_tokens"]) <= cfg.model.context_length:
            raise PreflightError(
                f"/data/{name} holds {meta['num_tokens']} tokens, not more than model.context_length="
                f"{cfg.model.context_length}: use more data or a smaller context_length"
            )
    if len(metas) == 2 and metas["train"].get("tokenizer_sha256") != metas["val"].get("tokenizer_sha256"):
        raise PreflightError(
            f"/data/{cfg.data.train_path} and /data/{cfg.data.val_path} were tokenized with different tokenizers: "
            "tokenize both with the same tokenizer (prepare_data.py --use-existing-tokenizer) and upload them again"
        )
    checkpoints = [f.name for f in list_files(vol, "checkpoint") if f.name.endswith(".pt") and "/" not in f.name]
    if checkpoints and not resume:
        notes.append(f"note: /checkpoints/ holds {len(checkpoints)} checkpoint(s) of an earlier run; this run starts "
                     f"from scratch and moves them to /checkpoints/{ARCHIVE_DIR}/<time>/ (pass --resume to continue "
                     "from them instead)")
    return notes


def check_wandb_secret(lookup: Callable[[str], Any]) -> None:
    """PreflightError unless the W&B secret exists (``lookup`` hydrates ``modal.Secret.from_name``)."""
    try:
        lookup(WANDB_SECRET)
    except modal.exception.NotFoundError:
        raise PreflightError(
            f"--wandb needs the Modal secret {WANDB_SECRET!r}: create it with "
            f"`modal secret create {WANDB_SECRET} WANDB_API_KEY=<your key from https://wandb.ai/authorize>`"
        ) from None


@dataclass
class LaunchPlan:
    """Everything the local entrypoint decided: what to call remotely and with which options."""

    options: dict[str, Any]
    kwargs: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def plan_launch(
    vol: Any,
    *,
    config_path: str | None,
    overrides: Iterable[str] = (),
    gpu: str = DEFAULT_GPU,
    wandb: bool = False,
    run_name: str | None = None,
    resume: bool = False,
    secret_lookup: Callable[[str], Any] | None = None,
) -> LaunchPlan:
    """Load and check the config and the volume; raise PreflightError / ConfigError / VolumeError on problems."""
    from cs336_basics.config import check_batch_split, config_to_dict, load_config

    nproc = gpu_count(gpu)
    cfg = load_config(config_path or None, list(overrides))
    check_batch_split(cfg.training.batch_size, nproc, cfg.training.gradient_accumulation_steps, cfg.source or "config")
    notes = preflight(vol, cfg, resume=resume)
    if wandb and secret_lookup is not None:
        check_wandb_secret(secret_lookup)
    kwargs = dict(config=config_to_dict(cfg), source=cfg.source, wandb=wandb, run_name=run_name or None,
                  resume=resume, launch_id=uuid.uuid4().hex, nproc=nproc)
    return LaunchPlan(options=function_options(gpu, wandb), kwargs=kwargs, notes=notes)


# ----------------------------------------------------------------------------- remote body


def archive_previous_run(ckpt_dir: Path) -> Path | None:
    """Move the files of an earlier run out of the way (to ``previous/<UTC time>/``); returns that folder."""
    files = [p for p in ckpt_dir.glob("*") if p.is_file() and not p.name.startswith(".")] if ckpt_dir.is_dir() else []
    if not files:
        return None
    dest = ckpt_dir / ARCHIVE_DIR / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dest.mkdir(parents=True, exist_ok=True)
    for path in files:
        os.replace(path, dest / path.name)
    return dest


def is_restart(ckpt_dir: Path, launch_id: str) -> bool:
    """True when ``ckpt_dir`` was claimed by this same launch: Modal is running the call again."""
    if not launch_id:
        return False
    try:
        return json.loads((ckpt_dir / LAUNCH_FILE).read_text())["launch_id"] == launch_id
    except (OSError, ValueError, KeyError, TypeError):
        return False


def claim_launch(ckpt_dir: Path, launch_id: str) -> None:
    """Record ``launch_id`` as the launch now writing to ``ckpt_dir``."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    marker = ckpt_dir / LAUNCH_FILE
    with atomic_output(marker) as tmp:
        tmp.write_text(json.dumps({"launch_id": launch_id, "started": time.time()}))


def run_training(
    mount: str | Path,
    config: dict,
    *,
    commit: Callable[[], None],
    source: str | None = None,
    wandb: bool = False,
    run_name: str | None = None,
    resume: bool = False,
    launch_id: str = "",
    nproc: int = 1,
    poll_s: float = COMMIT_POLL_S,
) -> dict:
    """The body of the Modal function: train on ``mount``/data into ``mount``/checkpoints, committing as it goes.

    A plain function (the volume is only the folder ``mount`` and the ``commit`` callback) so it also runs in tests.
    Returns train.train's summary plus "resumed"; or {"error": message} for a problem the user must fix, which Modal
    must not retry.
    """
    from cs336_basics.config import ConfigError, config_from_dict
    from cs336_basics.train import TrainingError, find_latest_checkpoint, train

    mount = Path(mount)
    raw = copy.deepcopy(config)
    raw.setdefault("data", {}).update(data_dir=str(mount / "data"), checkpoint_dir=str(mount / "checkpoints"))
    try:
        cfg = config_from_dict(raw, source=source or "config")
    except ConfigError as exc:
        return {"error": str(exc)}
    ckpt_dir = Path(cfg.data.checkpoint_dir)
    restart = is_restart(ckpt_dir, launch_id)
    if not (resume or restart):
        archived = archive_previous_run(ckpt_dir)
        if archived is not None:
            print(f"[train_modal] moved the previous run's files to {archived}/", flush=True)
    if launch_id and not restart:
        claim_launch(ckpt_dir, launch_id)
        commit()  # a restarted container (a new machine) must see the claim
    resume = resume or restart
    latest = find_latest_checkpoint(ckpt_dir) if resume else None
    why = "restarted by Modal" if restart else "--resume"
    print(f"[train_modal] {why}: continuing from {latest}" if latest else
          f"[train_modal] {'no checkpoint yet: ' if resume else ''}starting from scratch", flush=True)

    if nproc == 1:
        try:
            result = train(cfg, wandb=wandb, run_name=run_name, resume=resume, on_checkpoint=lambda _: commit())
        except UserError as exc:
            commit()
            return {"error": str(exc)}
    else:
        result = run_torchrun(cfg, nproc, commit=commit, wandb=wandb, run_name=run_name, resume=resume, poll_s=poll_s)
    commit()
    return {**result, "resumed": latest is not None}


def torchrun_command(config_file: Path, nproc: int, *, wandb: bool, run_name: str | None, resume: bool) -> list[str]:
    """``torchrun --nproc-per-node N -m cs336_basics.train ...``: one training process per GPU."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "cs336_basics.train", "--config-path", str(config_file)]
    if wandb:
        cmd.append("--wandb")
    if run_name:
        cmd += ["--run-name", run_name]
    if resume:
        cmd.append("--resume")
    return cmd


class CheckpointWatcher:
    """Calls ``commit`` whenever the set of complete ``*.pt`` files in a folder changes (for torchrun children)."""

    def __init__(self, directory: Path, commit: Callable[[], None], poll_s: float):
        self.directory, self.commit, self.poll_s = Path(directory), commit, poll_s
        self._seen = self._snapshot()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="checkpoint-commit", daemon=True)

    def _snapshot(self) -> dict[str, tuple[int, int]]:
        out = {}
        for path in self.directory.glob("*.pt"):  # writers use a dot-prefixed temporary name, then rename
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            out[path.name] = (st.st_size, st.st_mtime_ns)
        return out

    def poll(self) -> bool:
        """Commit if something changed since the last poll; True when it committed."""
        now = self._snapshot()
        if now == self._seen:
            return False
        self._seen = now
        try:
            self.commit()
        except Exception as exc:  # a failed commit must not kill training; the next change retries it
            print(f"[train_modal] warning: volume commit failed ({exc}); will retry", file=sys.stderr, flush=True)
            self._seen = {}
            return False
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()

    def __enter__(self) -> CheckpointWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()


def run_torchrun(cfg: Any, nproc: int, *, commit: Callable[[], None], wandb: bool, run_name: str | None,
                 resume: bool, poll_s: float) -> dict:
    """Run train.py under torchrun with ``nproc`` processes, committing the volume as checkpoints appear."""
    import yaml

    from cs336_basics.checkpoint import read_checkpoint
    from cs336_basics.config import config_to_dict
    from cs336_basics.train import find_latest_checkpoint

    ckpt_dir = Path(cfg.data.checkpoint_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        config_file = Path(tmp) / "config.yaml"
        config_file.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        cmd = torchrun_command(config_file, nproc, wandb=wandb, run_name=run_name, resume=resume)
        print(f"[train_modal] {shlex.join(cmd)}", flush=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                                          os.environ.get("PYTHONPATH")]))}
        with CheckpointWatcher(ckpt_dir, commit, poll_s):
            code = subprocess.call(cmd, env=env)
    if code != 0:  # exit code 1 is also what an uncaught (maybe transient) crash gives, so let Modal retry
        raise RuntimeError(f"training under torchrun failed with exit code {code}; the log above says why")
    final = find_latest_checkpoint(ckpt_dir)
    return {"iterations": int(read_checkpoint(final)["iteration"]) if final else None,
            "checkpoint": str(final) if final else None}


@app.function(**FUNCTION_OPTIONS)
def train_remote(config: dict, source: str | None, wandb: bool, run_name: str | None, resume: bool, launch_id: str,
                 nproc: int) -> dict:
    """Runs in the GPU container, with the volume mounted at MOUNT."""
    return run_training(MOUNT, config, commit=volume.commit, source=source, wandb=wandb, run_name=run_name,
                        resume=resume, launch_id=launch_id, nproc=nproc)


# ----------------------------------------------------------------------------- local entrypoint


def _lookup_secret(name: str) -> Any:
    return modal.Secret.from_name(name).hydrate()


@app.local_entrypoint()
def main(
    config_path: str = "",
    wandb: bool = False,
    run_name: str = "",
    gpu: str = "",
    resume: bool = False,
    overrides: str = "",
) -> None:
    """Check the config and the volume, then train on a Modal GPU (``--gpu``, else the one declared above)."""
    from cs336_basics.config import ConfigError

    gpu = gpu or FUNCTION_OPTIONS["gpu"]
    try:
        plan = plan_launch(volume, config_path=config_path or None, overrides=shlex.split(overrides), gpu=gpu,
                           wandb=wandb, run_name=run_name or None, resume=resume, secret_lookup=_lookup_secret)
    except (PreflightError, ConfigError) as exc:
        _fail(f"error: {exc}")
    except Exception as exc:
        line = user_error_line(exc)
        if line is None:
            raise
        _fail(line)
    for note in plan.notes:
        print(note)
    print(f"Launching training on {plan.options['gpu']} (volume {VOLUME_NAME} at {MOUNT}; "
          f"timeout {TIMEOUT_S // 3600} h, {MAX_RETRIES} retries resume from the latest checkpoint)")
    result = train_remote.with_options(**plan.options).remote(**plan.kwargs)
    if "error" in result:
        _fail(f"error: {result['error']}")
    print(f"Finished: {json.dumps(result)}")
    print("Download: modal run cs336_basics/modal_utils.py --action download --remote-name checkpoint_final.pt "
          "--local-path checkpoints/checkpoint_final.pt")


def _fail(line: str) -> None:
    print(line, file=sys.stderr)
    raise SystemExit(1)
