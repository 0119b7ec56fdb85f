"""Train the Transformer LM on Modal GPUs, with the project's one training loop (cs336_basics/train.py).

    modal run [--detach] cs336_basics/train_modal.py [--config-path cs336_basics/config.yaml | --preset NAME] [--wandb]
        [--run-name NAME] [--gpu A10G|H100|H100:8|H100,A100-80GB] [--resume] [--overrides "training.batch_size=16"]
    modal run cs336_basics/train_modal.py --sweep training.max_lr=1e-4,3e-4 [--sweep ...] [--sweep-name NAME] ...
    modal run cs336_basics/train_modal.py --attach fc-...[,fc-...]   # wait for detached calls again

Before Modal connects, the arguments and the config are checked, then the credentials (and with ``--wandb`` the
W&B secret); before any GPU starts, the volume must hold the configured data, matching ``model.vocab_size``. Then
the plan (GPU, tokens, estimated time and cost) is printed and the training call is *spawned*: Modal re-runs it
(preemption, a crash, the timeout; up to ``MAX_RETRIES`` times) on its own side, so retries happen even when
this terminal has gone away (``modal run --detach``). A problem a retry cannot fix (bad config or data, out of GPU
memory, a diverged run, no CUDA) ends the call at once with its one-line message. An attempt may run 24 h, or, with
a time budget (``training.max_time``), the budget plus ``BUDGET_MARGIN_S``.

The volume ``transformer-training-vol`` is mounted at ``/vol``: data is read from ``/vol/data/`` (upload it with
modal_utils.py) and checkpoints go to ``/vol/checkpoints/``, the volume committed after each one. A restarted call
resumes by itself: each launch writes its id to ``.launch.json`` in the run's folder, and an attempt that finds its
own id there is a restart. A new launch without ``--resume`` starts from scratch after moving the previous run's
files to ``/vol/checkpoints/previous/<UTC time>/``.

``--sweep`` (sweep.py's grid and run names) spawns one call per run, each on its own GPU container, all at once, each
in ``/vol/checkpoints/sweeps/<sweep name>/<run name>/`` with the same restarts. When a run ends, its container
rewrites the sweep's table (sweep.json, sweep.csv, curves.png) in the sweep's folder from every run's run.json, so the
table is complete after the last run even if no terminal waits. The same ``--sweep-name`` again continues a sweep:
runs that finished or diverged are kept.
"""

from __future__ import annotations

import codecs
import copy
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import modal
import modal.exception

import cs336_basics
from cs336_basics import gpus
from cs336_basics.common import (EXIT_CRASH, EXIT_DIVERGED, EXIT_INTERRUPTED, NO_RETRY_EXIT_CODES, DivergedError,
                                 UserError, fmt_duration, fmt_si, one_line)
from cs336_basics.fileio import atomic_output
from cs336_basics.modal_utils import (
    REMOTE_DIRS,
    VOLUME_NAME,
    check_before_connecting,
    exit_on_cli_error,
    fail,
    list_files,
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
SWEEPS_DIR = "sweeps"  # a sweep's runs go to checkpoints/sweeps/<sweep name>/<run name>/
PUBLISH_ROUNDS = 5  # how often a sweep's container rewrites the table while other containers change it
BUDGET_MARGIN_S = 15 * 60  # an attempt under a time budget may run this much longer: start-up, data copy, last commit
NOT_ON_MODAL = {  # config keys Modal replaces: a sweep over them would run the same config N times
    "data.data_dir": "on Modal the data is /data/<data.train_path> in the volume (sweep data.train_path instead)",
    "data.checkpoint_dir": "on Modal each run of a sweep writes to /checkpoints/sweeps/<sweep name>/<run name>/",
    "training.device": "on Modal training always runs on the GPU (cuda)",
}
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


def function_options(gpu: str = DEFAULT_GPU, wandb: bool = False, timeout_s: int = TIMEOUT_S) -> dict[str, Any]:
    """The ``@app.function`` options: the GPU (a type, ``TYPE:N`` or a fallback list), the timeout of one attempt
    (see :func:`attempt_timeout_s`), the W&B secret if logging.

    The GPU is declared here, not through ``with_options`` at call time: this modal client accepts a fallback list
    only in the declaration (``with_options(gpu=...)`` takes a string). Each attempt gets a container of its own
    (``single_use_containers``): Modal would otherwise hand a finished container the next queued input (a sweep's
    next run, or a retry) with the previous run's process state and its view of the volume, which is stale for
    what other containers committed since.
    """
    options: dict[str, Any] = dict(
        image=image,
        gpu=gpus.parse_gpu_spec(gpu).modal_value,
        volumes={MOUNT: volume},
        timeout=timeout_s,
        retries=modal.Retries(max_retries=MAX_RETRIES, initial_delay=10.0, backoff_coefficient=2.0, max_delay=60.0),
        single_use_containers=True,
    )
    if wandb:
        options["secrets"] = [modal.Secret.from_name(WANDB_SECRET, required_keys=["WANDB_API_KEY"])]
    return options


def attempt_timeout_s(configs: Sequence[Any]) -> int:
    """Modal's timeout for one attempt: with a time budget (``training.max_time``) in every run, the longest budget
    plus BUDGET_MARGIN_S for start-up, copying the data and the last commit (capped at 24 h), so that an attempt
    cannot run, and be billed, far past its budget; otherwise 24 h, Modal's maximum."""
    budgets = [cfg.training.max_time_s for cfg in configs]
    if not budgets or None in budgets:
        return TIMEOUT_S
    return min(TIMEOUT_S, math.ceil(max(budgets) + BUDGET_MARGIN_S))


# ----------------------------------------------------------------------------- launch plan (local)


def upload_command(local: str | Path, remote_name: str) -> str:
    return (f"modal run cs336_basics/modal_utils.py --action upload --local-path {local} "
            f"--remote-name {remote_name} --data-type data")


def read_remote_metadata(vol: Any, remote_name: str, listing: Collection[str]) -> dict | None:
    """The metadata JSON beside a .bin in the volume's /data/, checked as local files are; None if absent from
    ``listing`` (the names /data/ holds, as the caller listed it)."""
    from cs336_basics.data import metadata_path, parse_metadata

    meta_name = metadata_path(Path(remote_name)).as_posix()
    if meta_name not in listing:
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
        meta = read_remote_metadata(vol, name, remote)
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
    if resume:  # the listing below only serves the note for a fresh start
        return notes
    checkpoints = [f.name for f in list_files(vol, "checkpoint") if f.name.endswith(".pt") and "/" not in f.name]
    if checkpoints:
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


@dataclass
class LaunchArgs:
    """The arguments, checked without the network: the GPU, the config, and for a sweep its axes and runs' configs."""

    spec: gpus.GPUSpec
    cfg: Any  # the config (for a sweep, its first run's)
    axes: list[tuple[str, list[str]]] | None = None  # --sweep: the keys and their values (sweep.parse_sweep)
    configs: list[Any] = field(default_factory=list)  # --sweep: each run's config, in grid order

    @property
    def timeout_s(self) -> int:
        return attempt_timeout_s(self.configs or [self.cfg])


def check_launch_args(config_path: str = "", wandb: bool = False, run_name: str = "", gpu: str = "",
                      resume: bool = False, overrides: str = "", attach: str = "", preset: str = "",
                      sweep: str | Sequence[str] = (), sweep_name: str = "") -> LaunchArgs | None:
    """The checks that need no network: the GPU spec, the config (``--config-path`` or ``--preset``) and overrides,
    the batch split over the GPUs; for ``--sweep``, the specs and every run's config and batch split.

    ``sweep`` is one spec (what Modal's parser passes: the last ``--sweep``) or all of them (as
    ``modal_utils.parse_cli_args`` reads them). Returns None for ``--attach`` (which only waits for earlier calls).
    Raises UserError.
    """
    if attach:
        if not all(call_id.strip().startswith("fc-") for call_id in attach.split(",")):
            raise PreflightError(f"--attach {attach!r}: give the call id(s) the launch printed (each starts with fc-; "
                                 "several separated by commas)")
        return None
    from cs336_basics.config import check_batch_split, config_path as preset_or_config, load_config
    from cs336_basics.sweep import SweepError, check_name, parse_sweep, plan_sweep

    spec = gpus.parse_gpu_spec(gpu or DEFAULT_GPU)
    try:
        items = shlex.split(overrides)
    except ValueError as exc:
        raise PreflightError(f"--overrides {overrides!r}: {exc} (quote the whole list once)") from None
    path = preset_or_config(config_path or None, preset or None)

    def checked(extra: list[str]) -> Any:
        cfg = load_config(path, [*items, *extra])
        check_batch_split(cfg.training.batch_size, spec.count, cfg.training.gradient_accumulation_steps,
                          cfg.source or "config")
        return cfg

    specs = ([sweep] if sweep else []) if isinstance(sweep, str) else list(sweep)
    if not specs:
        if sweep_name:
            raise SweepError("--sweep-name needs at least one --sweep KEY=V1,V2 (the values to try)")
        return LaunchArgs(spec, checked([]))
    if run_name or resume:
        raise SweepError("--sweep names its runs after their values and continues unfinished ones by itself: drop "
                         "--run-name / --resume (the same --sweep-name again continues a sweep)")
    if sweep_name:
        check_name(sweep_name)
    axes = parse_sweep(specs, items)
    for key, _ in axes:
        if key in NOT_ON_MODAL:
            raise SweepError(f"--sweep {key}: {NOT_ON_MODAL[key]}, so its runs would all be the same")
    configs = []
    for point in plan_sweep(axes, "."):
        try:
            configs.append(checked(point.overrides))
        except UserError as exc:
            raise SweepError(f"sweep run {point.name}: {one_line(exc)}") from None
    return LaunchArgs(spec, configs[0], axes, configs)  # the base config alone need not be valid (min_lr > max_lr)


def sweep_folder(name: str) -> str:
    """A sweep's folder in the volume: ``/checkpoints/sweeps/<name>`` (``<mount>`` + it in the containers)."""
    return f"/{REMOTE_DIRS['checkpoint']}/{SWEEPS_DIR}/{name}"


def read_remote_record(vol: Any, path: str) -> Any:
    """The RunRecord of ``path`` (a run.json in the volume), or None when it is missing or unreadable."""
    from cs336_basics.runs import RunRecord, RunRecordError

    try:
        data = json.loads(b"".join(vol.read_file(path)))
        return RunRecord.from_dict(data, f"{path} in volume {VOLUME_NAME}")
    except (FileNotFoundError, ValueError, RunRecordError):  # none yet, or damaged: the run runs (again)
        return None


def remote_records(vol: Any, points: Sequence[Any]) -> list[Any]:
    """The committed run.json records of ``points`` (run_dir: their folders in the volume), None where there is none."""
    from cs336_basics.runs import RUN_FILE

    return [read_remote_record(vol, f"{p.run_dir.as_posix()}/{RUN_FILE}") for p in points]


def remote_rows(vol: Any, points: Sequence[Any]) -> list[dict]:
    """The sweep table's rows of ``points`` from their committed run.json."""
    from cs336_basics.sweep import point_row

    return [point_row(p, r) for p, r in zip(points, remote_records(vol, points))]


def has_ended(record: Any, cfg: Any) -> bool:
    """Whether a sweep's run recorded as ``record`` needs no container: it finished or diverged, or its time budget
    ended it and the budget is unchanged (launched again, it would only write its final checkpoint again)."""
    from cs336_basics.sweep import SKIP_STATUSES

    if record is None:
        return False
    same_budget = (record.config.get("training") or {}).get("max_time") == cfg.training.max_time
    return record.status in SKIP_STATUSES or (record.status == "out_of_time" and same_budget)


@dataclass
class SweepPlan:
    """A sweep: its name, axes, runs (``run_dir``: the folder in the volume) with their configs, and each run's row as
    the volume holds it before the launch."""

    name: str
    axes: list[tuple[str, list[str]]]
    points: list[Any]
    configs: list[Any]
    rows: list[dict]


@dataclass
class LaunchPlan:
    """What the local entrypoint decided: the GPU, the config, the arguments of each call, notes to print."""

    spec: gpus.GPUSpec
    cfg: Any
    calls: list[dict[str, Any]]  # train_remote's arguments, one spawned call each (a sweep: the runs left to run)
    notes: list[str] = field(default_factory=list)
    timeout_s: int = TIMEOUT_S
    sweep: SweepPlan | None = None


def plan_launch(
    vol: Any,
    *,
    config_path: str = "",
    overrides: str = "",
    gpu: str = "",
    wandb: bool = False,
    run_name: str = "",
    resume: bool = False,
    preset: str = "",
    sweep: str | Sequence[str] = (),
    sweep_name: str = "",
    secret_lookup: Callable[[str], Any] | None = None,
    launch: LaunchArgs | None = None,
) -> LaunchPlan:
    """Check the arguments, the config(s), the volume (and the W&B secret); raise UserError on the first problem.

    ``launch``: what :func:`check_launch_args` already returned for these arguments (then they are not checked
    again, and the GPU, config and sweep arguments are taken from it). A sweep's runs that the volume records as
    ended (:func:`has_ended`) are left out (``--sweep-name`` resumes it).
    """
    from cs336_basics.config import config_to_dict
    from cs336_basics.runs import utc_now
    from cs336_basics.sweep import default_name, plan_sweep, point_row

    args = launch or check_launch_args(config_path, wandb, run_name, gpu, resume, overrides, preset=preset,
                                       sweep=sweep, sweep_name=sweep_name)
    configs = args.configs or [args.cfg]
    notes: list[str] = []
    checked = set()
    for i, cfg in enumerate(configs):  # the data once (once per data files and vocabulary a sweep tries)
        key = (cfg.data.train_path, cfg.data.val_path, cfg.model.vocab_size, cfg.model.context_length)
        if key in checked:
            continue
        checked.add(key)
        try:
            notes += [n for n in preflight(vol, cfg, resume=resume or args.axes is not None) if n not in notes]
        except UserError as exc:
            if args.axes is None or i == 0:
                raise
            name = plan_sweep(args.axes, ".")[i].name
            raise PreflightError(f"sweep run {name}: {one_line(exc)}") from None
    if wandb and secret_lookup is not None:
        check_wandb_secret(secret_lookup)
    for cfg in configs:
        note = f"note: training.device={cfg.training.device} is replaced by cuda on Modal (the GPU is what is billed)"
        if cfg.training.device not in ("auto", "cuda") and note not in notes:
            notes.append(note)
        cfg.training.device = "cuda"  # never train on the CPU while a GPU is billed
    common = dict(wandb=wandb, nproc=args.spec.count, gpu=str(args.spec))
    if args.axes is None:
        call = dict(config=config_to_dict(args.cfg), source=args.cfg.source, run_name=run_name or None,
                    resume=resume, launch_id=uuid.uuid4().hex, **common)
        return LaunchPlan(args.spec, args.cfg, [call], notes, args.timeout_s)

    name = sweep_name or default_name(args.axes)
    points = plan_sweep(args.axes, sweep_folder(name))
    records = remote_records(vol, points)
    rows = [point_row(p, r) for p, r in zip(points, records)]
    started, calls, running = utc_now(), [], []
    for point, cfg, record, row in zip(points, args.configs, records, rows):
        if has_ended(record, cfg):
            continue
        if row["status"] == "running":
            running.append(point.name)
        cfg.wandb.group = cfg.wandb.group or name  # the sweep's runs side by side in W&B
        calls.append(dict(config=config_to_dict(cfg), source=cfg.source, run_name=point.name, resume=True,
                          launch_id=uuid.uuid4().hex, **common,
                          sweep={"name": name, "axes": args.axes, "run": point.name, "started_at": started,
                                 "command": list(sys.argv)}))
    if running:
        notes.append(f"note: {len(running)} run(s) of sweep {name} are recorded as running ({', '.join(running)}): if "
                     "the launch that started them is still going (`modal app list`), stop it first (`modal app stop "
                     "<app id>`), or both write to the same folders; otherwise they continue from their last "
                     "committed checkpoint")
    return LaunchPlan(args.spec, args.cfg, calls, notes, args.timeout_s,
                      SweepPlan(name, args.axes, points, args.configs, rows))


def model_flops_per_token(model_cfg: Any) -> float:
    """Training FLOPs per token of the configured model (TransformerLM.flops_per_token, built on the meta device)."""
    from cs336_basics.model import TransformerLM

    return float(TransformerLM(model_cfg, device="meta").flops_per_token())


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:g} h" if seconds % 3600 == 0 else fmt_duration(seconds)


def _hours(h: float) -> str:
    return f"{h * 60:.0f} min" if h < 1 else f"{h:.1f} h"


def _tokens(cfg: Any) -> int:
    t = cfg.training
    return t.max_iters * t.batch_size * cfg.model.context_length


def _precision(cfg: Any) -> str:
    """The peak (gpus.py's precision) a run is planned at: tf32 for training.dtype=float32 (train.py sets TF32
    matmuls on CUDA), else bf16 (the bf16 autocast that ``auto`` picks on a GPU supporting it)."""
    return "tf32" if cfg.training.dtype == "float32" else "bf16"


def estimate(cfg: Any, flops_per_token: float, gpu: gpus.ModalGPU,
             count: int) -> tuple[str, tuple[float, float] | None]:
    """What ``cfg``'s run would take on ``count`` x ``gpu`` in words, and its cost range in US$ (None: no estimate).

    The time is its FLOPs at the GPU's dense peak and gpus.PLAN_MFU; a time budget (training.max_time) caps it.
    """
    t = cfg.training
    tokens = _tokens(cfg)
    price = gpus.hourly_price(gpu, count)
    priced = "no price in cs336_basics/gpus.py: see https://modal.com/pricing" if price is None else f"${price:.2f}/h"
    hours = gpus.estimate_hours(tokens * flops_per_token, gpu, count, _precision(cfg))
    if hours is None:
        return f"no time estimate (no peak FLOP/s for it in cs336_basics/gpus.py); {priced}", None
    fast, slow = hours
    budget = t.max_time_s / 3600 if t.max_time_s else math.inf
    low, high = min(fast, budget), min(slow, budget)
    if fast >= budget:
        text = (f"the {_hours(budget)} budget ends it, after about {fmt_si(tokens * budget / slow)} to "
                f"{fmt_si(tokens * budget / fast)} tokens")
    else:
        text = f"about {_hours(low)} to {_hours(high)}" + (" (or the budget ends it)" if slow > budget else "")
    if price is None:
        return f"{text}; {priced}", None
    money = f"${high * price:,.2f}" if low == high else f"${low * price:,.2f} to ${high * price:,.2f}"
    return f"{text}, {money} at {priced}", (low * price, high * price)


def budget_line(configs: Sequence[Any], timeout_s: int) -> str | None:
    """The plan's line about the time budget(s), or None when no run has one."""
    budgets = sorted({cfg.training.max_time for cfg in configs if cfg.training.max_time})
    if not budgets:
        return None
    stop = (f"Modal stops an attempt after {_duration(timeout_s)} (the budget plus {BUDGET_MARGIN_S // 60} min for "
            "start-up, copying the data and the last commit)" if timeout_s < TIMEOUT_S else
            "runs without one may take up to 24 h per attempt")
    return (f"Time budget: training.max_time={', '.join(budgets)} ends a run, final evaluation and checkpoint "
            f"included, whatever training.max_iters says; {stop}")


def _assumptions(spec: gpus.GPUSpec) -> str:
    low, high = gpus.PLAN_MFU
    scaling = (f", and {spec.count} GPUs {spec.count}x as fast as one (a small model scales worse)"
               if spec.count > 1 else "")
    return (f"  (estimates assume {low:.0%} to {high:.0%} MFU{scaling}; GPU prices are Modal's list prices as of "
            f"{gpus.PRICES_AS_OF}, CPU and memory are billed on top; a resumed run needs less)")


def plan_lines(cfg: Any, spec: gpus.GPUSpec) -> list[str]:
    """The plan printed before launching: tokens and FLOPs, then time and cost per GPU choice (gpus.py's table)."""
    t, m = cfg.training, cfg.model
    tokens = _tokens(cfg)
    budget = budget_line([cfg], attempt_timeout_s([cfg]))
    try:
        flops_per_token = model_flops_per_token(m)
    except ImportError:  # a `modal` installed without torch: no FLOPs, so no estimate
        return [f"Plan: {t.max_iters:,} iterations, {tokens:,} tokens, on {spec} (install torch here for an estimate "
                "of time and cost)"] + ([budget] if budget else [])
    lines = [f"Plan: {t.max_iters:,} iterations x {t.batch_size * m.context_length:,} tokens = {tokens:,} tokens, "
             f"{tokens * flops_per_token:.2e} FLOPs ({_precision(cfg)}), on {spec}"
             + (" (Modal tries them in this order)" if len(spec.choices) > 1 else "")]
    if budget:
        lines.append(budget)
    for gpu in spec.choices:
        text, _ = estimate(cfg, flops_per_token, gpu, spec.count)
        lines.append(f"  {gpu.name} x{spec.count} ({gpu.memory_gb} GB each): {text}")
    return lines + [_assumptions(spec)]


def sweep_plan_lines(plan: LaunchPlan) -> list[str]:
    """A sweep's plan: its runs, the time and cost of each on the first GPU choice, and the total."""
    sweep, spec = plan.sweep, plan.spec
    gpu, todo = spec.choices[0], {call["run_name"] for call in plan.calls}
    lines = [f"Sweep {sweep.name}: {len(sweep.points)} run(s) over {', '.join(k for k, _ in sweep.axes)}, each in its "
             f"own container on {spec}, all at once; results in {sweep_folder(sweep.name)}/ of volume {VOLUME_NAME}"]
    done = [p.name for p in sweep.points if p.name not in todo]
    if done:
        lines.append(f"  kept (ended: finished, diverged, or out of an unchanged time budget): {', '.join(done)}")
    total, priced = [0.0, 0.0], True
    for point, cfg in zip(sweep.points, sweep.configs):
        if point.name not in todo:
            continue
        try:
            text, cost = estimate(cfg, model_flops_per_token(cfg.model), gpu, spec.count)
        except ImportError:
            text, cost = "install torch here for an estimate of time and cost", None
        lines.append(f"  {point.name}: {fmt_si(_tokens(cfg))} tokens; {text}")
        priced = priced and cost is not None
        if cost is not None:
            total = [total[0] + cost[0], total[1] + cost[1]]
    if todo and priced:
        lines.append(f"Total for {len(todo)} run(s) on {gpu.name} x{spec.count}: about ${total[0]:,.2f} to "
                     f"${total[1]:,.2f}; the runs go on at the same time, so the sweep takes about as long as its "
                     "longest run (when Modal has that many GPUs free)"
                     + (f" (estimated for {gpu.name}, the first GPU choice)" if len(spec.choices) > 1 else ""))
    budget = budget_line(sweep.configs, plan.timeout_s)
    return lines + ([budget] if budget else []) + [_assumptions(spec)]


def _price(result: dict) -> tuple[gpus.GPUSpec, gpus.ModalGPU, float | None] | None:
    """The --gpu of a finished call, the table row and the hourly price it was billed at; None for an unknown --gpu."""
    try:
        spec = gpus.parse_gpu_spec(result.get("gpu") or "")
    except gpus.GPUSpecError:
        return None
    return (spec, *gpus.price_for(spec, result.get("device_name")))


def cost_line(result: dict) -> str:
    """Measured time and cost of a finished run, at the table's price for the GPU it ran on."""
    elapsed = float(result.get("wall_s") or 0.0)  # since the first attempt started: what is billed
    attempts = int(result.get("attempts") or 1)
    device = result.get("device_name") or "unknown device"
    where = f"{attempts} attempt(s)" if attempts > 1 else "1 attempt"
    text = f"{timedelta(seconds=int(elapsed))} on {result.get('gpu_count', 1)}x {device} over {where}"
    found = _price(result)
    if found is None:
        return f"Time: {text}"
    spec, row, price = found
    if price is None:
        return f"Time: {text}; no {row.name} price in cs336_basics/gpus.py (see https://modal.com/pricing)"
    return (f"Time and cost: {text}, about ${elapsed / 3600 * price:,.2f} at ${price:.2f}/h for {row.name} "
            f"x{spec.count} (Modal list price as of {gpus.PRICES_AS_OF}; CPU and memory extra)")


def total_cost_line(results: Sequence[dict]) -> str | None:
    """Measured GPU time and cost over a sweep's calls, each at its GPU's price; None when none trained."""
    ran = [r for r in results if r.get("wall_s")]
    if not ran:
        return None
    gpu_hours = sum(float(r["wall_s"]) * int(r.get("gpu_count") or 1) for r in ran) / 3600
    longest = timedelta(seconds=int(max(float(r["wall_s"]) for r in ran)))
    prices = [(_price(r) or (None, None, None))[2] for r in ran]
    money = (f", about ${sum(float(r['wall_s']) / 3600 * p for r, p in zip(ran, prices)):,.2f} (Modal list prices as "
             f"of {gpus.PRICES_AS_OF}; CPU and memory extra)" if None not in prices else
             " (no price for its GPU in cs336_basics/gpus.py: see https://modal.com/pricing)")
    return f"Time and cost of {len(ran)} run(s): {gpu_hours:.2f} GPU-hours, the longest run {longest}{money}"


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
    run_dir: str = "",
) -> dict:
    """The body of the Modal function: train on ``mount``/data into ``mount``/checkpoints (or its subfolder
    ``run_dir``, a sweep's run), committing as it goes.

    A plain function (the volume is the folder ``mount`` and the ``commit`` callback) so tests run it as it runs in
    the container. Returns train.train's summary plus "resumed", "gpu", "gpu_count", "device_name", "wall_s" (since
    the first attempt started) and "attempts";
    or {"error": one line, "exit_code": 2 or 3, and those five} for a problem a retry cannot fix, which ends the call
    without one.
    Anything else (a crash, a preemption, a final commit that keeps failing) raises, and Modal retries.
    """
    from cs336_basics.config import config_from_dict
    from cs336_basics.checkpoint import list_checkpoints
    from cs336_basics.train import train

    started = time.time()
    attempts = [started]
    mount = Path(mount)
    raw = copy.deepcopy(config)
    raw.setdefault("data", {}).update(data_dir=str(mount / "data"), checkpoint_dir=str(mount / "checkpoints" / run_dir))

    def billed() -> dict:  # what cost_line needs
        return {"gpu": gpu, "gpu_count": nproc, "device_name": _device_name(), "wall_s": time.time() - attempts[0],
                "attempts": len(attempts)}

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
        if launch_id:
            attempts = record_attempt(ckpt_dir, launch_id, restart, started)
            # A restart runs on a new machine that must find the claim, or it would start over: fail without it.
            if not commit_with_retries(commit, "of the launch record") and not restart:
                raise RuntimeError("could not commit the launch record to the volume; Modal retries the call")
        resume = resume or restart
        # train() resumes from the newest readable one (or stops, naming them, when none can be read): no need
        # to read a checkpoint here too
        resumed = resume and bool(list_checkpoints(ckpt_dir))
        why = f"restarted by Modal (attempt {len(attempts)})" if restart else "--resume"
        print(f"[train_modal] {why}: continuing from the newest readable checkpoint in {ckpt_dir}/" if resumed else
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
        return {"error": one_line(exc), "exit_code": exc.exit_code, **billed()}
    if not commit_with_retries(commit, "of the final checkpoint", FINAL_COMMIT_ATTEMPTS):
        raise RuntimeError(
            f"training finished but committing the volume failed {FINAL_COMMIT_ATTEMPTS} times: the checkpoints "
            f"written since the last successful commit (including {result.get('checkpoint')}) are NOT persisted; "
            "Modal retries the call, which resumes from the last committed checkpoint"
        )
    summary = {**result, "resumed": resumed, **billed()}
    print(f"[train_modal] {cost_line(summary)}", flush=True)
    return summary


def run_sweep_point(mount: str | Path, sweep: dict, *, commit: Callable[[], None], reload: Callable[[], None],
                    config: dict, source: str | None = None, wandb: bool = False, run_name: str | None = None,
                    resume: bool = True, launch_id: str = "", nproc: int = 1, gpu: str = "",
                    poll_s: float | None = None) -> dict:
    """One run of a sweep, in its own container: train it in ``checkpoints/sweeps/<name>/<run>/``, then rewrite the
    sweep's table in the volume (:func:`publish_sweep`).

    ``sweep`` is {"name", "axes", "run", "started_at", "command"}. A run whose committed run.json says finished or diverged is
    not trained again. A diverged run or a user error is the run's result (its row says so), not the call's failure;
    a crash is recorded as failed (table included) and raised, so that Modal retries the call, which continues the
    run from its checkpoints. Returns run_training's summary (empty when skipped) with "row" and "sweep" (the name).
    """
    from cs336_basics.sweep import plan_sweep, run_point

    del run_name, resume  # a sweep's run is named after its values, and always continues from its checkpoints
    mount, name = Path(mount), sweep["name"]
    axes = [(key, list(values)) for key, values in sweep["axes"]]
    sweep_dir = mount / "checkpoints" / SWEEPS_DIR / name
    points = plan_sweep(axes, sweep_dir)
    point = next(p for p in points if p.name == sweep["run"])
    summary: dict = {}

    def run_one(overrides: list[str], run: str, run_dir: Path) -> dict:
        result = run_training(mount, config, commit=commit, source=source, wandb=wandb, run_name=run, resume=True,
                              launch_id=launch_id, nproc=nproc, gpu=gpu, poll_s=poll_s,
                              run_dir=run_dir.relative_to(mount / "checkpoints").as_posix())
        summary.update({k: v for k, v in result.items() if k not in ("error", "exit_code")})  # its time and cost
        if "error" in result:
            raise (DivergedError if result["exit_code"] == EXIT_DIVERGED else UserError)(result["error"])
        return result

    def publish() -> None:
        publish_sweep(sweep_dir, points, axes, name=name, started_at=sweep.get("started_at"), commit=commit,
                      reload=reload, command=sweep.get("command"))

    try:
        row = run_point(point, run_one, sweep_name=name, raise_crashes=True)
    except Exception:
        try:  # should Modal have no retry left, the table says how this run ended
            publish()
        except Exception as exc:
            print(f"[train_modal] warning: could not rewrite the sweep's table ({one_line(exc)})", file=sys.stderr)
        raise
    publish()
    return {**summary, "row": row, "sweep": name}


def _comparable(rows: Sequence[dict]) -> list[dict]:
    """Rows as sweep.json stores them, without run_dir (each container has its own mount point)."""
    from cs336_basics.runs import to_json

    return [{k: v for k, v in row.items() if k != "run_dir"} for row in json.loads(to_json(list(rows)))]


def publish_sweep(sweep_dir: Path, points: Sequence[Any], axes: list, *, name: str, started_at: str | None,
                  commit: Callable[[], None], reload: Callable[[], None], rounds: int = PUBLISH_ROUNDS,
                  command: Sequence[str] | None = None) -> list[dict]:
    """Rewrite sweep.json, sweep.csv and curves.png from every run's committed run.json (pending: none yet).

    Each run's container calls this when its run ends, so the table in the volume is complete once the last run has
    ended, whether or not a terminal waits (``modal run --detach``). Two containers ending together may each miss the
    other's result, and Modal keeps the last commit of a file whole: so after committing the table, the container
    reloads and compares the committed table with the committed runs, and writes it again until they agree. The
    last container to commit is sure to see every result.
    """
    from cs336_basics.sweep import SWEEP_JSON, finish_sweep, read_rows, sweep_table

    if not commit_with_retries(commit, "of the run's record", FINAL_COMMIT_ATTEMPTS):
        raise RuntimeError("could not commit the run's record to the volume; Modal retries the call")
    for _ in range(rounds):
        reload()
        rows = read_rows(points)
        finish_sweep(sweep_dir, rows, axes, name=name, started_at=started_at, quiet=True, command=command)
        if not commit_with_retries(commit, "of the sweep's table", FINAL_COMMIT_ATTEMPTS):
            raise RuntimeError("could not commit the sweep's table to the volume; Modal retries the call")
        reload()  # the commit reloads too, unless Modal's server says it need not
        try:
            committed = json.loads((sweep_dir / SWEEP_JSON).read_text(encoding="utf-8"))["runs"]
        except (OSError, ValueError, KeyError, TypeError):
            committed = None
        if committed is not None and _comparable(committed) == _comparable(read_rows(points)):
            break
    else:
        print(f"[train_modal] warning: the table of sweep {name} changed {rounds} times while it was written; the "
              "next run to end writes it again", file=sys.stderr, flush=True)
    print(f"[train_modal] sweep {name}, {sweep_dir}:\n{sweep_table(rows, axes)}", flush=True)
    return rows


def remote_body(mount: str | Path, *, commit: Callable[[], None], reload: Callable[[], None],
                sweep: dict | None = None, **kwargs: Any) -> dict:
    """What the Modal function runs: a training run (:func:`run_training`) or one run of a sweep."""
    if sweep is None:
        return run_training(mount, commit=commit, **kwargs)
    return run_sweep_point(mount, sweep, commit=commit, reload=reload, **kwargs)


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


def sweep_result_lines(name: str) -> list[str]:
    """Where a sweep's results are and how to get them."""
    folder = f"{SWEEPS_DIR}/{name}"
    return [
        f"Results: {sweep_folder(name)}/ in volume {VOLUME_NAME}: sweep.json, sweep.csv, curves.png and a folder per "
        "run (checkpoints, metrics.jsonl, run.json); each run rewrites the table when it ends",
        "  list them:     modal run cs336_basics/modal_utils.py --action list --data-type checkpoint",
        f"  the table:     modal run cs336_basics/modal_utils.py --action download --remote-name {folder}/sweep.csv "
        f"--local-path checkpoints/{folder}/sweep.csv   (likewise curves.png, sweep.json)",
        f"  everything:    mkdir -p checkpoints/{SWEEPS_DIR} && modal volume get {VOLUME_NAME} {sweep_folder(name)} "
        f"checkpoints/{SWEEPS_DIR}",
    ]


def _point_line(row: dict) -> str:
    return f"{row['name']}: {row['status']}" + (f": {row['error']}" if row.get("error") else "")


def _detached() -> bool:
    return bool(RUN_OPTIONS & {"-d", "--detach"})


def _follow_lines(call_ids: list[str], names: list[str] | None = None) -> list[str]:
    """Where to follow spawned calls (a run's one, or a sweep's, one per name in ``names``), and what closing this
    terminal does to them: stops them, or under ``--detach`` not, and how to wait for them again."""
    app_id = getattr(app, "app_id", None)
    follow = f"`modal app logs -f {app_id or '<app id>'}` or on https://modal.com/apps"
    attach = f"`modal run cs336_basics/train_modal.py --attach {','.join(call_ids)}`"
    if names is None:
        (call_id,) = call_ids
        lines = [f"Training call {call_id}: follow it with {follow}"]
        what, goes_on = "run", f"training, and Modal still retries it; wait for it again with {attach}"
    else:
        lines = [f"Calls: {', '.join(f'{n} {c}' for n, c in zip(names, call_ids))}; follow them with {follow}"]
        what, goes_on = "sweep", ("the sweep, and Modal still retries its runs; each run rewrites the table in the "
                                  f"volume when it ends; wait for them again with {attach}")
    if _detached():
        lines.append(f"Detached: closing this terminal does not stop {goes_on}")
    else:
        lines.append(f"Ctrl-C or closing this terminal stops the {what}; launch with `modal run --detach ...` to let "
                     "it go on without this terminal")
    return lines


def launch_run(plan: LaunchPlan) -> int:
    """Spawn the training call, wait for it, print its outcome; returns the exit code."""
    print(f"Launching on {plan.spec} (volume {VOLUME_NAME} at {MOUNT}; up to {_duration(plan.timeout_s)} per "
          f"attempt, {MAX_RETRIES} retries, each resuming from the latest committed checkpoint)", flush=True)
    call = train_remote.spawn(**plan.calls[0])
    for line in _follow_lines([call.object_id]):
        print(line, flush=True)
    return report(call.get())


def _wait(call: Any, label: str, hint: str) -> dict | None:
    """``call.get()``, or None after one line saying the call failed on Modal after its retries (a sweep goes on)."""
    try:
        return call.get()
    except (modal.exception.AuthError, modal.exception.ConnectionError, modal.exception.NotFoundError):
        raise
    except Exception as exc:  # the run's run.json and the sweep's table say how it ended
        print(f"{label}: the call failed on Modal after its retries ({one_line(exc)}); `modal app logs` shows why; "
              f"{hint}", flush=True)
        return None


def launch_sweep(plan: LaunchPlan) -> int:
    """Spawn one call per run left in the sweep, wait for them all, print the table; returns the exit code (0: a
    diverged or failed run is a result of the sweep)."""
    from cs336_basics.sweep import sweep_table

    sweep = plan.sweep
    if not plan.calls:
        print(f"Every run of sweep {sweep.name} has ended: nothing to launch\n")
        print(sweep_table(sweep.rows, sweep.axes))
        for line in sweep_result_lines(sweep.name):
            print(line)
        return 0
    print(f"Launching {len(plan.calls)} run(s) on {plan.spec}, one container each (up to {_duration(plan.timeout_s)} "
          f"per attempt, {MAX_RETRIES} retries each, resuming from the run's latest committed checkpoint)", flush=True)
    calls = [(kwargs["run_name"], train_remote.spawn(**kwargs)) for kwargs in plan.calls]
    for line in _follow_lines([call.object_id for _, call in calls], [name for name, _ in calls]):
        print(line, flush=True)
    results = []
    for i, (name, call) in enumerate(calls):
        result = _wait(call, f"[{i + 1}/{len(calls)}] {name}", f"the same --sweep-name {sweep.name} runs it again")
        if result is not None:
            results.append(result)
            print(f"[{i + 1}/{len(calls)}] {_point_line(result['row'])}", flush=True)
    print("\n" + sweep_table(remote_rows(volume, sweep.points), sweep.axes))
    for line in filter(None, [total_cost_line(results), *sweep_result_lines(sweep.name)]):
        print(line)
    return 0


def attach_calls(call_ids: list[str]) -> int:
    """Wait for earlier calls (a run, or the runs of a sweep) and print their outcome; returns the exit code."""
    from cs336_basics.sweep import sweep_table

    results = []
    for call_id in call_ids:
        print(f"Waiting for {call_id} (Ctrl-C stops waiting; the run goes on)", flush=True)
        try:
            call = modal.FunctionCall.from_id(call_id)
            result = call.get() if len(call_ids) == 1 else _wait(call, call_id, "its sweep's table says how it ended")
        except modal.exception.NotFoundError as exc:
            fail(f"error: no training call {call_id} ({one_line(exc)}): use the call id a launch printed")
        if result is not None:
            results.append(result)
    rows = [r["row"] for r in results if "row" in r]
    if not rows:
        return max((report(r) for r in results), default=EXIT_CRASH)
    for row in rows:
        print(_point_line(row))
    print("\n" + sweep_table(rows, [(key, []) for key in rows[0]["values"]]))
    names = sorted({r["sweep"] for r in results if r.get("sweep")})
    for line in filter(None, [total_cost_line(results), *(line for n in names for line in sweep_result_lines(n))]):
        print(line)
    return 0


def checked_launch(args: dict[str, Any]) -> LaunchArgs | None:
    """LAUNCH, what the check before connecting returned, when it was made for ``args`` (main's arguments; Modal's
    parser passes only the last ``--sweep``, the check read every one from the command line); None otherwise, and
    plan_launch checks ``args`` itself."""
    if LAUNCH is None or LAUNCH_ARGS is None:
        return None
    specs = LAUNCH_ARGS["sweep"]
    return LAUNCH if {**LAUNCH_ARGS, "sweep": specs[-1] if specs else ""} == args else None


def main(
    config_path: str = "",
    wandb: bool = False,
    run_name: str = "",
    gpu: str = "",
    resume: bool = False,
    overrides: str = "",
    attach: str = "",
    preset: str = "",
    sweep: str = "",
    sweep_name: str = "",
) -> None:
    """Check the config and the volume, then train on Modal GPUs (``--gpu``, else DEFAULT_GPU): one run, or with
    ``--sweep`` one run per combination of values, in parallel; or wait for earlier calls (``--attach``)."""
    what, stopped = "run", "the run stops; checkpoints committed so far are kept: continue with --resume"
    try:
        if attach:
            check_launch_args(attach=attach)
            code = attach_calls([call_id.strip() for call_id in attach.split(",")])
        else:
            args = dict(config_path=config_path, wandb=wandb, run_name=run_name, gpu=gpu, resume=resume,
                        overrides=overrides, attach=attach, preset=preset, sweep=sweep, sweep_name=sweep_name)
            launch = checked_launch(args)  # under `modal run`, the arguments (and the W&B secret) checked at import
            plan = plan_launch(volume, config_path=config_path, overrides=overrides, gpu=gpu, wandb=wandb,
                               run_name=run_name, resume=resume, preset=preset, sweep=sweep, sweep_name=sweep_name,
                               secret_lookup=None if launch else _lookup_secret, launch=launch)
            declared = (FUNCTION_OPTIONS["gpu"], "secrets" in FUNCTION_OPTIONS, FUNCTION_OPTIONS["timeout"])
            if (plan.spec.modal_value, wandb, plan.timeout_s) != declared:
                raise PreflightError(f"this app was declared with gpu={declared[0]}, W&B "
                                     f"{'on' if declared[1] else 'off'} and a {declared[2]} s timeout: pass --gpu, "
                                     "--wandb and the config on the `modal run cs336_basics/train_modal.py` command "
                                     "line")
            if plan.sweep is not None:
                what, stopped = "sweep", (f"the sweep stops; its runs' committed checkpoints are kept: continue it "
                                          f"with the same command and --sweep-name {plan.sweep.name}")
            for line in plan.notes + (sweep_plan_lines(plan) if plan.sweep else plan_lines(plan.cfg, plan.spec)):
                print(line)
            code = launch_sweep(plan) if plan.sweep else launch_run(plan)
    except KeyboardInterrupt:
        fail("interrupted: " + (f"the {what} goes on (detached)" if _detached() or attach else stopped),
             EXIT_INTERRUPTED)
    except Exception as exc:
        exit_on_cli_error(exc)
        if what == "run":
            print("error: the training call failed on Modal after its retries (traceback below); checkpoints "
                  "committed so far are in /checkpoints/: continue with --resume", file=sys.stderr, flush=True)
        raise
    if code:
        raise SystemExit(code)


# Under `modal run`, check the arguments and the config, then the credentials and the W&B secret, before Modal
# connects (it imports this file first); the GPU, the secret and the timeout must be known here, where the function
# is declared. Every --sweep counts: Modal's parser would keep only the last.
_RUN = check_before_connecting(sys.argv, "train_modal.py", main, check_launch_args, repeatable=("sweep",))
RUN_OPTIONS: set[str] = _RUN.options if _RUN else set()
LAUNCH_ARGS: dict[str, Any] | None = _RUN.kwargs if _RUN else None
LAUNCH: LaunchArgs | None = _RUN.checked if _RUN else None  # None also for --attach
_WANDB = bool(LAUNCH and LAUNCH_ARGS["wandb"])
if _WANDB:
    try:
        check_wandb_secret(_lookup_secret)
    except Exception as exc:
        exit_on_cli_error(exc)
        raise
FUNCTION_OPTIONS = function_options((LAUNCH_ARGS or {}).get("gpu") or DEFAULT_GPU, _WANDB,
                                    LAUNCH.timeout_s if LAUNCH else TIMEOUT_S)


@app.function(**FUNCTION_OPTIONS)
def train_remote(config: dict, source: str | None, wandb: bool, run_name: str | None, resume: bool, launch_id: str,
                 nproc: int, gpu: str = "", sweep: dict | None = None) -> dict:
    """Runs in the GPU container, with the volume mounted at MOUNT: a training run, or one run of a sweep."""
    return remote_body(MOUNT, commit=volume.commit, reload=volume.reload, config=config, source=source, wandb=wandb,
                       run_name=run_name, resume=resume, launch_id=launch_id, nproc=nproc, gpu=gpu, sweep=sweep)


main = app.local_entrypoint()(main)

if __name__ == "__main__":
    fail("error: run this file with Modal's CLI: `modal run cs336_basics/train_modal.py` (options --gpu, --wandb, "
         "--run-name, --resume, --config-path, --preset, --overrides, --sweep, --sweep-name, --attach; see "
         "MODAL_GUIDE.md), or train locally with `uv run python cs336_basics/train.py`")
