"""Train the Transformer LM on Modal GPUs, with the project's one training loop (cs336_basics/train.py).

    modal run [--detach] cs336_basics/train_modal.py [--config-path cs336_basics/config.yaml] [--wandb]
        [--run-name NAME] [--gpu A10G|H100|H100:8|H100,A100-80GB] [--resume] [--overrides "training.batch_size=16"]
    modal run cs336_basics/train_modal.py --attach fc-...   # wait for a detached run again

Before Modal connects, the arguments and the config are checked, then the credentials (and with ``--wandb`` the
W&B secret); before any GPU starts, the volume must hold the configured data, matching ``model.vocab_size``. Then
the plan (GPU, tokens, estimated time and cost) is printed and the training call is *spawned*: Modal re-runs it
(preemption, a crash, the 24 h timeout; up to ``MAX_RETRIES`` times) on its own side, so retries happen even when
this terminal has gone away (``modal run --detach``). A problem a retry cannot fix (bad config or data, out of GPU
memory, a diverged run, no CUDA) ends the call at once with its one-line message.

The volume ``transformer-training-vol`` is mounted at ``/vol``: data is read from ``/vol/data/`` (upload it with
modal_utils.py) and checkpoints go to ``/vol/checkpoints/``, the volume committed after each one. A restarted call
resumes by itself: each launch writes its id to ``/vol/checkpoints/.launch.json``, and an attempt that finds its own
id there is a restart. A new launch without ``--resume`` starts from scratch after moving the previous run's files
to ``/vol/checkpoints/previous/<UTC time>/``.
"""

from __future__ import annotations

import codecs
import copy
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import modal
import modal.exception

import cs336_basics
from cs336_basics import gpus
from cs336_basics.common import EXIT_CRASH, EXIT_INTERRUPTED, NO_RETRY_EXIT_CODES, UserError, one_line
from cs336_basics.fileio import atomic_output
from cs336_basics.modal_utils import (
    VOLUME_NAME,
    check_before_connecting,
    exit_on_cli_error,
    fail,
    list_files,
    modal_run_args,
    remote_path,
)
from cs336_basics.modal_worker import STATUS_ENV, exit_codes

# The folder holding the cs336_basics package: the project root here, /root in the container (where Modal puts the
# package next to this file, which it mounts as /root/train_modal.py; Path(__file__).parent.parent would be "/").
PROJECT_ROOT = Path(cs336_basics.__file__).resolve().parent.parent
MOUNT = "/vol"  # the volume's /data and /checkpoints are /vol/data and /vol/checkpoints in the container
DEFAULT_GPU = "A10G"  # used when --gpu is not given
TIMEOUT_S = 24 * 60 * 60  # Modal's maximum per attempt; each retry gets a fresh 24 h
MAX_RETRIES = 3
WANDB_SECRET = "wandb-secret"  # modal secret create wandb-secret WANDB_API_KEY=...
LAUNCH_FILE = ".launch.json"
ARCHIVE_DIR = "previous"  # a fresh run moves older checkpoints to checkpoints/previous/<time>/
COMMIT_POLL_S = 30.0  # how often the multi-GPU watcher looks for new checkpoints
COMMIT_ATTEMPTS = 3  # a failed commit after a checkpoint is retried, then training goes on
FINAL_COMMIT_ATTEMPTS = 6  # the last commit must succeed
COMMIT_RETRY_S = 2.0  # first delay between commit attempts, doubled each time
MIN_DRIVER = {12: "525.60.13", 13: "580.65.06"}  # CUDA major -> minimum NVIDIA driver (CUDA release notes, table 3)

app = modal.App("cs336-train")
volume = modal.Volume.from_name(VOLUME_NAME, create_if_missing=True)
image = (
    modal.Image.debian_slim(python_version="3.11")
    .uv_sync(str(PROJECT_ROOT), extra_options="--no-dev")  # the locked dependencies from uv.lock, no dev tools
    .add_local_python_source("cs336_basics")
)


class PreflightError(UserError):
    """The launch would fail on the GPU; the message says what to run or change instead."""


class NoCudaError(UserError):
    """The container's torch sees no GPU; training must not fall back to the CPU while a GPU is billed."""


class TorchrunStopped(UserError):
    """A torchrun worker ended with an exit code a retry cannot change (user error, divergence)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def function_options(gpu: str = DEFAULT_GPU, wandb: bool = False) -> dict[str, Any]:
    """The ``@app.function`` options: the GPU (a type, ``TYPE:N`` or a fallback list), the W&B secret if logging.

    The GPU is declared here, not through ``with_options`` at call time: this modal client accepts a fallback list
    only in the declaration (``with_options(gpu=...)`` takes a string).
    """
    options: dict[str, Any] = dict(
        image=image,
        gpu=gpus.parse_gpu_spec(gpu).modal_value,
        volumes={MOUNT: volume},
        timeout=TIMEOUT_S,
        retries=modal.Retries(max_retries=MAX_RETRIES, initial_delay=10.0, backoff_coefficient=2.0, max_delay=60.0),
    )
    if wandb:
        options["secrets"] = [modal.Secret.from_name(WANDB_SECRET, required_keys=["WANDB_API_KEY"])]
    return options


# ----------------------------------------------------------------------------- launch plan (local)


def upload_command(local: str | Path, remote_name: str) -> str:
    return (f"modal run cs336_basics/modal_utils.py --action upload --local-path {local} "
            f"--remote-name {remote_name} --data-type data")


def read_remote_metadata(vol: Any, remote_name: str) -> dict | None:
    """The metadata JSON beside a .bin in the volume's /data/, checked as local files are; None if absent."""
    from cs336_basics.data import metadata_path, parse_metadata

    meta_name = metadata_path(Path(remote_name)).as_posix()
    if meta_name not in {f.name for f in list_files(vol, "data")}:
        return None
    text = b"".join(vol.read_file("/" + remote_path(meta_name, "data")))
    try:
        return parse_metadata(text, f"/data/{meta_name} in volume {VOLUME_NAME}")
    except ValueError as exc:
        raise PreflightError(str(exc)) from None


def preflight(vol: Any, cfg: Any, *, resume: bool = False) -> list[str]:
    """Check the volume holds the configured data, fitting the model; returns notes to print.

    The checks are data.py's, the ones local training applies, on the volume's listing and metadata. Raises a
    UserError naming the upload command or config change that fixes the first problem found.
    """
    from cs336_basics.data import check_same_tokenizer, check_token_file

    notes = []
    remote = {f.name: f for f in list_files(vol, "data")}
    metas, labels = {}, {}
    where = f"in {cfg.source}" if cfg.source else "in your config"
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
                         f"re-upload it from a folder holding {local.name}.json to enable the check")
        labels[split] = f"/data/{name} in volume {VOLUME_NAME}"
        metas[split] = meta
        check_token_file(labels[split], meta, remote[name].size, vocab_size=cfg.model.vocab_size,
                         min_tokens=cfg.model.context_length + 1, config_hint=where,
                         redo=f"{upload_command(local, name)} --force")
    check_same_tokenizer(metas["train"], metas["val"], labels["train"], labels["val"],
                         "tokenize both with the same tokenizer (prepare_data.py --use-existing-tokenizer) and upload "
                         "them again with --force")
    checkpoints = [f.name for f in list_files(vol, "checkpoint") if f.name.endswith(".pt") and "/" not in f.name]
    if checkpoints and not resume:
        notes.append(f"note: /checkpoints/ holds {len(checkpoints)} checkpoint(s) of an earlier run; this run starts "
                     f"from scratch and moves them to /checkpoints/{ARCHIVE_DIR}/<time>/ (pass --resume to continue "
                     "from them instead)")
    return notes


def check_wandb_secret(lookup: Callable[[str], Any]) -> None:
    """PreflightError unless the W&B secret exists with a WANDB_API_KEY (``lookup`` hydrates the secret)."""
    try:
        lookup(WANDB_SECRET)
    except (modal.exception.NotFoundError, modal.exception.InvalidError) as exc:
        raise PreflightError(
            f"--wandb needs the Modal secret {WANDB_SECRET!r} with the key WANDB_API_KEY (Modal says: {one_line(exc)}): "
            f"create it with `modal secret create {WANDB_SECRET} WANDB_API_KEY=<your key from "
            "https://wandb.ai/authorize>` (add --force to replace one that lacks the key)"
        ) from None


def _lookup_secret(name: str) -> Any:
    return modal.Secret.from_name(name, required_keys=["WANDB_API_KEY"]).hydrate()


def check_launch_args(config_path: str = "", wandb: bool = False, run_name: str = "", gpu: str = "",
                      resume: bool = False, overrides: str = "", attach: str = "") -> tuple[Any, gpus.GPUSpec] | None:
    """The checks that need no network: the GPU spec, the config and overrides, the batch split over the GPUs.

    Returns (config, GPU spec), or None for ``--attach`` (which only waits for an earlier call). Raises UserError.
    """
    if attach:
        if not attach.startswith("fc-"):
            raise PreflightError(f"--attach {attach!r}: give the call id the launch printed (it starts with fc-)")
        return None
    from cs336_basics.config import check_batch_split, load_config

    spec = gpus.parse_gpu_spec(gpu or DEFAULT_GPU)
    try:
        items = shlex.split(overrides)
    except ValueError as exc:
        raise PreflightError(f"--overrides {overrides!r}: {exc} (quote the whole list once)") from None
    cfg = load_config(config_path or None, items)
    check_batch_split(cfg.training.batch_size, spec.count, cfg.training.gradient_accumulation_steps,
                      cfg.source or "config")
    return cfg, spec


@dataclass
class LaunchPlan:
    """What the local entrypoint decided: the GPU, the config, the remote call's arguments, notes to print."""

    spec: gpus.GPUSpec
    cfg: Any
    kwargs: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def plan_launch(
    vol: Any,
    *,
    config_path: str = "",
    overrides: str = "",
    gpu: str = "",
    wandb: bool = False,
    run_name: str = "",
    resume: bool = False,
    secret_lookup: Callable[[str], Any] | None = None,
) -> LaunchPlan:
    """Check the arguments, the config, the volume (and the W&B secret); raise UserError on the first problem."""
    from cs336_basics.config import config_to_dict

    cfg, spec = check_launch_args(config_path, wandb, run_name, gpu, resume, overrides)
    notes = preflight(vol, cfg, resume=resume)
    if wandb and secret_lookup is not None:
        check_wandb_secret(secret_lookup)
    if cfg.training.device not in ("auto", "cuda"):
        notes.append(f"note: training.device={cfg.training.device} is replaced by cuda on Modal (the GPU is what is billed)")
    cfg.training.device = "cuda"  # never train on the CPU while a GPU is billed
    kwargs = dict(config=config_to_dict(cfg), source=cfg.source, wandb=wandb, run_name=run_name or None,
                  resume=resume, launch_id=uuid.uuid4().hex, nproc=spec.count, gpu=str(spec))
    return LaunchPlan(spec=spec, cfg=cfg, kwargs=kwargs, notes=notes)


def model_flops_per_token(model_cfg: Any) -> float:
    """Training FLOPs per token of the configured model (TransformerLM.flops_per_token, built on the meta device)."""
    from cs336_basics.model import TransformerLM

    return float(TransformerLM(model_cfg, device="meta").flops_per_token())


def _hours(h: float) -> str:
    return f"{h * 60:.0f} min" if h < 1 else f"{h:.1f} h"


def plan_lines(cfg: Any, spec: gpus.GPUSpec) -> list[str]:
    """The plan printed before launching: tokens and FLOPs, then time and cost per GPU choice (gpus.py's table)."""
    t, m = cfg.training, cfg.model
    tokens = t.max_iters * t.batch_size * m.context_length
    try:
        flops = tokens * model_flops_per_token(m)
    except ImportError:  # a `modal` installed without torch: no FLOPs, so no estimate
        return [f"Plan: {t.max_iters:,} iterations, {tokens:,} tokens, on {spec} (install torch here for an estimate "
                "of time and cost)"]
    precision = "tf32" if t.dtype == "float32" else "bf16"
    lines = [f"Plan: {t.max_iters:,} iterations x {t.batch_size * m.context_length:,} tokens = {tokens:,} tokens, "
             f"{flops:.2e} FLOPs ({precision}), on {spec}" + (" (Modal tries them in this order)" if len(spec.choices) > 1 else "")]
    for gpu in spec.choices:
        label = f"  {gpu.name} x{spec.count} ({gpu.memory_gb} GB each)"
        price = gpus.hourly_price(gpu, spec.count)
        hours = gpus.estimate_hours(flops, gpu, spec.count, precision)
        cost = (f"${price:.2f}/h" if price is not None else "no price in cs336_basics/gpus.py: see https://modal.com/pricing")
        if hours is None:
            lines.append(f"{label}: no time estimate (no peak FLOP/s for it in cs336_basics/gpus.py); {cost}")
        elif price is None:
            lines.append(f"{label}: about {_hours(hours[0])} to {_hours(hours[1])}; {cost}")
        else:
            lines.append(f"{label}: about {_hours(hours[0])} to {_hours(hours[1])}, ${hours[0] * price:,.2f} to "
                         f"${hours[1] * price:,.2f} at {cost}")
    low, high = gpus.PLAN_MFU
    scaling = f", and {spec.count} GPUs {spec.count}x as fast as one (a small model scales worse)" if spec.count > 1 else ""
    lines.append(f"  (estimates assume {low:.0%} to {high:.0%} MFU{scaling}; GPU prices are Modal's list prices as of "
                 f"{gpus.PRICES_AS_OF}, CPU and memory are billed on top; a resumed run needs less)")
    return lines


def cost_line(result: dict) -> str:
    """Measured time and cost of a finished run, at the table's price for the GPU it ran on."""
    elapsed = float(result.get("wall_s") or 0.0)  # since the first attempt started: what is billed
    attempts = int(result.get("attempts") or 1)
    device = result.get("device_name") or "unknown device"
    where = f"{attempts} attempt(s)" if attempts > 1 else "1 attempt"
    text = f"{timedelta(seconds=int(elapsed))} on {result.get('gpu_count', 1)}x {device} over {where}"
    try:
        spec = gpus.parse_gpu_spec(result.get("gpu") or "")
    except gpus.GPUSpecError:
        return f"Time: {text}"
    row, price = gpus.price_for(spec, device)
    if price is None:
        return f"Time: {text}; no {row.name} price in cs336_basics/gpus.py (see https://modal.com/pricing)"
    return (f"Time and cost: {text}, about ${elapsed / 3600 * price:,.2f} at ${price:.2f}/h for {row.name} "
            f"x{spec.count} (Modal list price as of {gpus.PRICES_AS_OF}; CPU and memory extra)")


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


def _read_launch(ckpt_dir: Path) -> dict:
    try:
        record = json.loads((ckpt_dir / LAUNCH_FILE).read_text())
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


def is_restart(ckpt_dir: Path, launch_id: str) -> bool:
    """True when ``ckpt_dir`` was claimed by this same launch: Modal is running the call again."""
    return bool(launch_id) and _read_launch(ckpt_dir).get("launch_id") == launch_id


def record_attempt(ckpt_dir: Path, launch_id: str, restart: bool, now: float) -> list[float]:
    """Claim ``ckpt_dir`` for ``launch_id`` (or, on a restart, add this attempt); returns every attempt's start."""
    attempts = [float(t) for t in _read_launch(ckpt_dir).get("attempts", [])] if restart else []
    attempts.append(now)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    with atomic_output(ckpt_dir / LAUNCH_FILE) as tmp:
        tmp.write_text(json.dumps({"launch_id": launch_id, "attempts": attempts}))
    return attempts


def commit_with_retries(commit: Callable[[], None], what: str, attempts: int = COMMIT_ATTEMPTS) -> bool:
    """Commit the volume, retrying with growing delays; on failure warn (the next commit tries again), return False."""
    for i in range(attempts):
        try:
            commit()
            return True
        except Exception as exc:  # the client raises RuntimeError for conflicts, grpc errors for the rest
            error = exc
            if i + 1 < attempts:
                time.sleep(COMMIT_RETRY_S * 2**i)
    print(f"[train_modal] warning: committing the volume {what} failed {attempts} times ({one_line(error)}); "
          "training goes on and the next checkpoint commits again", file=sys.stderr, flush=True)
    return False


def nvidia_driver_version() -> str | None:
    """The NVIDIA driver version nvidia-smi reports, or None without a working nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def cuda_problem(torch_version: str, torch_cuda: str | None, driver: str | None) -> str:
    """The one line saying why torch sees no GPU: its CUDA version, the driver's, and the fix."""
    have = f"NVIDIA driver {driver}" if driver else "no working NVIDIA driver (nvidia-smi failed: is a GPU attached?)"
    if torch_cuda is None:
        return (f"CUDA is not available in the Modal container: torch {torch_version} is a CPU-only build "
                f"({have}); lock a CUDA build of torch in uv.lock (uv lock) and launch again")
    need = MIN_DRIVER.get(int(torch_cuda.split(".")[0]))
    needs = f", which needs NVIDIA driver >= {need}" if need else ""
    return (f"CUDA is not available in the Modal container: torch {torch_version} is built for CUDA {torch_cuda}{needs}, "
            f"and the container has {have}; nothing was trained: try another --gpu type, or lock a torch built for an "
            "older CUDA (e.g. a cu128 wheel via [tool.uv.sources] in pyproject.toml, then uv lock) and launch again")


def require_cuda() -> None:
    """NoCudaError (one line: torch's CUDA version, the driver version, the fix) unless torch sees a GPU."""
    import torch

    if not torch.cuda.is_available():
        raise NoCudaError(cuda_problem(torch.__version__, torch.version.cuda, nvidia_driver_version()))


def copy_data_locally(cfg: Any, dest: Path) -> str | None:
    """Copy the configured token files (and their metadata) from the volume to ``dest``; point the config there.

    Training memory-maps its data for hours, and a commit reloads the container's view of the volume, which Modal
    refuses while files of the volume are open ("there are open files preventing the operation"): read from the
    volume, every checkpoint commit would fail. Reading from local disk is also faster for random batches. Returns
    a line to print, or None when a file is missing (training then names the volume path in its error) or the local
    disk is full (training then reads from the volume, and says so).
    """
    from cs336_basics.data import metadata_path

    sources = [Path(cfg.data.data_dir) / rel for rel in dict.fromkeys((cfg.data.train_path, cfg.data.val_path))]
    if not all(src.is_file() for src in sources):
        return None
    start, size = time.monotonic(), 0
    try:
        for src in sources:
            rel = src.relative_to(cfg.data.data_dir)
            for path, target in ((src, dest / rel), (metadata_path(src), metadata_path(dest / rel))):
                if path.is_file():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, target)
                    size += target.stat().st_size
    except OSError as exc:
        return (f"warning: could not copy the data to local disk ({exc}); training reads it from the volume, and "
                "volume commits may fail while it is open")
    volume_dir, cfg.data.data_dir = cfg.data.data_dir, str(dest)
    return (f"copied {', '.join(s.name for s in sources)} from {volume_dir} to local disk "
            f"({size / 2**30:.2f} GiB in {time.monotonic() - start:.0f} s)")


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"


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
    gpu: str = "",
    poll_s: float | None = None,
) -> dict:
    """The body of the Modal function: train on ``mount``/data into ``mount``/checkpoints, committing as it goes.

    A plain function (the volume is the folder ``mount`` and the ``commit`` callback) so tests run it as it runs in
    the container. Returns train.train's summary plus "resumed", "gpu", "gpu_count", "device_name", "wall_s" (since
    the first attempt started) and "attempts";
    or {"error": one line, "exit_code": 2 or 3} for a problem a retry cannot fix, which ends the call without one.
    Anything else (a crash, a preemption, a final commit that keeps failing) raises, and Modal retries.
    """
    from cs336_basics.config import config_from_dict
    from cs336_basics.train import find_latest_checkpoint, train

    started = time.time()
    mount = Path(mount)
    raw = copy.deepcopy(config)
    raw.setdefault("data", {}).update(data_dir=str(mount / "data"), checkpoint_dir=str(mount / "checkpoints"))
    try:
        cfg = config_from_dict(raw, source=source or "config")
        if cfg.training.device.startswith("cuda"):
            require_cuda()
        ckpt_dir = Path(cfg.data.checkpoint_dir)
        restart = is_restart(ckpt_dir, launch_id)
        if not (resume or restart):
            archived = archive_previous_run(ckpt_dir)
            if archived is not None:
                print(f"[train_modal] moved the previous run's files to {archived}/", flush=True)
        attempts = [started]
        if launch_id:
            attempts = record_attempt(ckpt_dir, launch_id, restart, started)
            # A restart runs on a new machine that must find the claim, or it would start over: fail without it.
            if not commit_with_retries(commit, "of the launch record") and not restart:
                raise RuntimeError("could not commit the launch record to the volume; Modal retries the call")
        resume = resume or restart
        latest = find_latest_checkpoint(ckpt_dir) if resume else None
        why = f"restarted by Modal (attempt {len(attempts)})" if restart else "--resume"
        print(f"[train_modal] {why}: continuing from {latest}" if latest else
              f"[train_modal] {'no checkpoint yet: ' if resume else ''}starting from scratch", flush=True)

        with tempfile.TemporaryDirectory(prefix="cs336-data-") as local:
            copied = copy_data_locally(cfg, Path(local))
            if copied:
                print(f"[train_modal] {copied}", flush=True)
            if nproc == 1:
                try:
                    result = train(cfg, wandb=wandb, run_name=run_name, resume=resume,
                                   on_checkpoint=lambda path: commit_with_retries(commit, f"after {path.name}"))
                except UserError:
                    commit_with_retries(commit, "after the error")  # keep the metrics and checkpoints written so far
                    raise
            else:
                result = run_torchrun(cfg, nproc, commit=commit, wandb=wandb, run_name=run_name, resume=resume,
                                      poll_s=poll_s or COMMIT_POLL_S)
    except UserError as exc:
        print(f"[train_modal] error: {one_line(exc)}", file=sys.stderr, flush=True)
        return {"error": one_line(exc), "exit_code": exc.exit_code}
    if not commit_with_retries(commit, "of the final checkpoint", FINAL_COMMIT_ATTEMPTS):
        raise RuntimeError(
            f"training finished but committing the volume failed {FINAL_COMMIT_ATTEMPTS} times: the checkpoints "
            f"written since the last successful commit (including {result.get('checkpoint')}) are NOT persisted; "
            "Modal retries the call, which resumes from the last committed checkpoint"
        )
    summary = {**result, "resumed": latest is not None, "gpu": gpu, "gpu_count": nproc, "device_name": _device_name(),
               "wall_s": time.time() - attempts[0], "attempts": len(attempts)}
    print(f"[train_modal] {cost_line(summary)}", flush=True)
    return summary


def torchrun_command(config_file: Path, nproc: int, *, wandb: bool, run_name: str | None, resume: bool) -> list[str]:
    """``torchrun --nproc-per-node N`` running train.py's main in each process (cs336_basics.modal_worker)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "cs336_basics.modal_worker", "--config-path", str(config_file)]
    if wandb:
        cmd.append("--wandb")
    if run_name:
        cmd += ["--run-name", run_name]
    if resume:
        cmd.append("--resume")
    return cmd


def torchrun_env(status_dir: Path) -> dict[str, str]:
    """The environment of torchrun and its workers: the package importable from any working directory."""
    path = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, STATUS_ENV: str(status_dir)}


def run_teed(cmd: list[str], env: dict[str, str]) -> tuple[int, str | None]:
    """Run ``cmd``, passing its stderr through; returns (exit code, its last ``error: ...`` line without the prefix).

    Interrupted (a preemption), the child is asked to stop (SIGTERM: torchrun stops its workers), then killed.
    """
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    tail = ""
    try:
        while chunk := os.read(proc.stderr.fileno(), 1 << 16):
            text = decoder.decode(chunk)
            sys.stderr.write(text)
            sys.stderr.flush()
            tail = (tail + text)[-(1 << 16):]
        code = proc.wait()
    except BaseException:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    finally:
        proc.stderr.close()
    lines = tail.replace("\r", "\n").splitlines()
    error = next((line[len("error: "):] for line in reversed(lines) if line.startswith("error: ")), None)
    return code, error


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
        if not commit_with_retries(self.commit, "after a new checkpoint", attempts=1):
            self._seen = {}  # try again at the next poll
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
    """Run train.py under torchrun with ``nproc`` processes, committing the volume as checkpoints appear.

    Raises TorchrunStopped when a worker exited 2 (user error) or 3 (diverged): retrying cannot help. Any other
    failure raises RuntimeError, which Modal retries (the retry resumes from the last committed checkpoint).
    """
    import yaml

    from cs336_basics.checkpoint import FINAL_CHECKPOINT, newest_checkpoint
    from cs336_basics.config import config_to_dict

    ckpt_dir = Path(cfg.data.checkpoint_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        config_file, status_dir = Path(tmp) / "config.yaml", Path(tmp) / "status"
        status_dir.mkdir()
        config_file.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        cmd = torchrun_command(config_file, nproc, wandb=wandb, run_name=run_name, resume=resume)
        print(f"[train_modal] {shlex.join(cmd)}", flush=True)
        with CheckpointWatcher(ckpt_dir, commit, poll_s):
            code, error = run_teed(cmd, torchrun_env(status_dir))
        codes = exit_codes(status_dir)
    print(f"[train_modal] torchrun exited with code {code}; its workers with {codes or 'none recorded'}", flush=True)
    if code != 0:
        final = next((c for c in codes if c in NO_RETRY_EXIT_CODES), None)
        if final is not None:
            raise TorchrunStopped(error or f"training under torchrun stopped with exit code {final} (see the log)", final)
        raise RuntimeError(f"training under torchrun failed (exit code {code}; workers' codes {codes or 'none recorded'});"
                           " the log above says why; Modal retries the call, which resumes from the last checkpoint")
    found = newest_checkpoint(ckpt_dir)
    path, saved = found if found else (None, {})
    return {"status": "finished" if path and path.name == FINAL_CHECKPOINT else "failed",
            "iterations": int(saved["iteration"]) if path else None, "elapsed_s": saved.get("elapsed_s"),
            "final_train_loss": saved.get("train_loss"), "final_val_loss": saved.get("val_loss"),
            "best_val_loss": saved.get("best_val_loss"), "checkpoint": str(path) if path else None}


# ----------------------------------------------------------------------------- local entrypoint


def report(result: dict) -> int:
    """Print a finished call's outcome; returns the exit code (0, or the error's 2 / 3)."""
    if "error" in result:
        print(f"error: {result['error']}", file=sys.stderr, flush=True)
        return int(result.get("exit_code") or EXIT_CRASH)

    def loss(key: str) -> str:
        return "n/a" if result.get(key) is None else f"{result[key]:.4f}"

    how = " (resumed from a checkpoint)" if result.get("resumed") else ""
    print(f"Finished{how}: iteration {result.get('iterations')}, train loss {loss('final_train_loss')}, "
          f"val loss {loss('final_val_loss')}; {result.get('checkpoint')}")
    print(cost_line(result))
    print("Download: modal run cs336_basics/modal_utils.py --action download --remote-name checkpoint_final.pt "
          "--local-path checkpoints/checkpoint_final.pt")
    return 0


def _follow_lines(call_id: str) -> list[str]:
    app_id = getattr(app, "app_id", None)
    logs = f"modal app logs -f {app_id}" if app_id else "modal app logs -f <app id>"
    detached = bool(RUN_OPTIONS & {"-d", "--detach"})
    lines = [f"Training call {call_id}: follow it with `{logs}` or on https://modal.com/apps"]
    if detached:
        lines.append("Detached: closing this terminal does not stop training, and Modal still retries it; wait for it "
                     f"again with `modal run cs336_basics/train_modal.py --attach {call_id}`")
    else:
        lines.append("Ctrl-C or closing this terminal stops the run; launch with `modal run --detach ...` to let it "
                     "go on without this terminal")
    return lines


def main(
    config_path: str = "",
    wandb: bool = False,
    run_name: str = "",
    gpu: str = "",
    resume: bool = False,
    overrides: str = "",
    attach: str = "",
) -> None:
    """Check the config and the volume, then train on Modal GPUs (``--gpu``, else DEFAULT_GPU); or wait for a run."""
    try:
        if attach:
            check_launch_args(attach=attach)
            call = modal.FunctionCall.from_id(attach)
            print(f"Waiting for {attach} (Ctrl-C stops waiting; the run goes on)", flush=True)
        else:
            plan = plan_launch(volume, config_path=config_path, overrides=overrides, gpu=gpu, wandb=wandb,
                               run_name=run_name, resume=resume, secret_lookup=_lookup_secret)
            declared = FUNCTION_OPTIONS["gpu"]
            if plan.spec.modal_value != declared or wandb != ("secrets" in FUNCTION_OPTIONS):
                raise PreflightError(f"this app was declared with gpu={declared} and W&B "
                                     f"{'on' if 'secrets' in FUNCTION_OPTIONS else 'off'}: pass --gpu and --wandb on "
                                     "the `modal run cs336_basics/train_modal.py` command line")
            for line in plan.notes + plan_lines(plan.cfg, plan.spec):
                print(line)
            print(f"Launching on {plan.spec} (volume {VOLUME_NAME} at {MOUNT}; up to {TIMEOUT_S // 3600} h per "
                  f"attempt, {MAX_RETRIES} retries, each resuming from the latest committed checkpoint)", flush=True)
            call = train_remote.spawn(**plan.kwargs)
            for line in _follow_lines(call.object_id):
                print(line, flush=True)
        result = call.get()
    except KeyboardInterrupt:
        detached = bool(RUN_OPTIONS & {"-d", "--detach"}) or attach
        fail("interrupted: " + ("the run goes on (detached)" if detached else
                                "the run stops; checkpoints committed so far are kept: continue with --resume"),
             EXIT_INTERRUPTED)
    except Exception as exc:
        if attach and isinstance(exc, modal.exception.NotFoundError):
            fail(f"error: no training call {attach} ({one_line(exc)}): use the call id a launch printed")
        exit_on_cli_error(exc)
        print("error: the training call failed on Modal after its retries (traceback below); checkpoints committed "
              "so far are in /checkpoints/: continue with --resume", file=sys.stderr, flush=True)
        raise
    code = report(result)
    if code:
        raise SystemExit(code)


# Under `modal run`, check the arguments and the config, then the credentials and the W&B secret, before Modal
# connects (it imports this file first); the GPU and the secret must be known here, where the function is declared.
LAUNCH_ARGS = check_before_connecting(sys.argv, "train_modal.py", main, check_launch_args)
RUN_OPTIONS: set[str] = (modal_run_args(sys.argv, "train_modal.py") or ([], set()))[1]
if LAUNCH_ARGS and LAUNCH_ARGS["wandb"] and not LAUNCH_ARGS["attach"]:
    try:
        check_wandb_secret(_lookup_secret)
    except Exception as exc:
        exit_on_cli_error(exc)
        raise
FUNCTION_OPTIONS = function_options(
    (LAUNCH_ARGS or {}).get("gpu") or DEFAULT_GPU, bool(LAUNCH_ARGS and LAUNCH_ARGS["wandb"] and not LAUNCH_ARGS["attach"])
)


@app.function(**FUNCTION_OPTIONS)
def train_remote(config: dict, source: str | None, wandb: bool, run_name: str | None, resume: bool, launch_id: str,
                 nproc: int, gpu: str = "") -> dict:
    """Runs in the GPU container, with the volume mounted at MOUNT."""
    return run_training(MOUNT, config, commit=volume.commit, source=source, wandb=wandb, run_name=run_name,
                        resume=resume, launch_id=launch_id, nproc=nproc, gpu=gpu)


main = app.local_entrypoint()(main)

if __name__ == "__main__":
    fail("error: run this file with Modal's CLI: `modal run cs336_basics/train_modal.py` (options --gpu, --wandb, "
         "--run-name, --resume, --config-path, --overrides, --attach; see MODAL_GUIDE.md), or train locally with "
         "`uv run python cs336_basics/train.py`")
