"""Train a Transformer LM: one loop for a laptop, for torchrun data-parallel, and for Modal.

    uv run python cs336_basics/train.py [--config-path PATH | --preset NAME] [--wandb] [--run-name NAME]
                                        [--resume] [--init-from PATH] [section.key=value ...]
    uv run torchrun --nproc-per-node 2 cs336_basics/train.py training.batch_size=64

A run goes through three stages, one function each: ``build`` (device, checked data, model, optimizer, the fixed
validation batches), ``restore`` (``--resume`` or ``--init-from``) and ``fit`` (the loop). What changes from step
to step is one :class:`RunState`; a checkpoint is that state plus weights, optimizer and every rank's RNG streams,
so ``--resume`` continues bit for bit. One :class:`~cs336_basics.logger.Logger` owns the console, ``metrics.jsonl``,
``run.json`` and W&B.

Batches are sampled at random positions of the memmapped ``train.bin``, each rank from its own numpy generator.
``training.batch_size`` counts sequences per optimizer step over all ranks and accumulation steps. Rank 0 logs,
evaluates on fixed validation batches and writes checkpoints. Exit codes: see :mod:`cs336_basics.common`.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: import the package, not sibling files, by absolute name
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import argparse
import gc
import json
import math
import os
import time
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from cs336_basics.checkpoint import (FINAL_CHECKPOINT, CheckpointError, list_checkpoints, load_checkpoint,
                                     newest_checkpoint, read_checkpoint, save_checkpoint)
from cs336_basics.common import (DiskFullError, DivergedError, UserError, fmt_duration, one_line,
                                 run_command)
from cs336_basics.config import Config, check_batch_split, config_path, config_to_dict, load_config, preset_names
from cs336_basics.data import (DataError, check_same_tokenizer, get_batch, open_token_file, sampled_max_token,
                               tokenizer_sha256)
from cs336_basics.device import DeviceError, autocast_for, pick_device
from cs336_basics.fileio import prepare_output_dir
from cs336_basics.logger import Logger, banner, check_wandb_login, start_wandb
from cs336_basics.model import TransformerLM
from cs336_basics.nn_utils import clip_gradients, cross_entropy
from cs336_basics.optimizer import AdamW, get_lr_budget_schedule, get_lr_cosine_schedule

EVAL_SEED = 1234  # validation batches do not depend on training.seed, so runs with different seeds compare
DIVERGENCE_FACTOR = 1.5  # a logged loss above this multiple of the first one ends the run as diverged
BUDGET_MARGIN = 1.25  # the time kept for the last step, final evaluation and checkpoint: 25% over the longest seen
SAVE_BYTES_PER_S = 100e6  # a checkpoint's write speed assumed under a time budget until one has been timed,
SAVE_MIN_S = 1.0  # plus this (fsync, a network volume): weights and two Adam moments at float32
PREPARE_HINT = (
    "uv run python prepare_data.py --train-path data/TinyStoriesV2-GPT4-train.txt "
    "--val-path data/TinyStoriesV2-GPT4-valid.txt --vocab-size {vocab} --output-dir {data_dir}"
)


class TrainingError(UserError):
    """A problem the user can fix (out of memory, an unusable checkpoint); the message says how."""


# ----------------------------------------------------------------------------- processes and devices


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a torchrun job (world_size 1 when run directly)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info_from_env() -> DistInfo:
    """Read torchrun's RANK / LOCAL_RANK / WORLD_SIZE environment variables."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistInfo(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world)


def resolve_device(name: str, info: DistInfo = DistInfo()) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; under torchrun each CUDA process gets GPU ``LOCAL_RANK``."""
    if info.enabled and name.startswith("mps"):
        raise TrainingError("data-parallel training on mps is not supported: run without torchrun")
    try:
        device = pick_device(name, allow_mps=not info.enabled)
    except DeviceError as exc:
        raise TrainingError(f"training.device={name}: {exc}: use training.device=auto or cpu") from None
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
    return device


# ----------------------------------------------------------------------------- data


def open_datasets(cfg: Config) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Memmap train/val tokens after the shared checks (data.check_token_file); returns them and the tokenizer hash."""
    vocab, where = cfg.model.vocab_size, config_hint(cfg)
    redo = PREPARE_HINT.format(vocab=vocab, data_dir=cfg.data.data_dir)
    arrays, metas = [], []
    for split, path in (("train", cfg.data.train_file), ("val", cfg.data.val_file)):
        tokens, meta = open_token_file(
            path, not_found=f"{split} data {path} not found: create it with `{redo}` (or point data.data_dir / "
            f"data.{split}_path at your .bin files)", vocab_size=vocab, min_tokens=cfg.model.context_length + 1,
            config_hint=where, redo=redo)
        top = sampled_max_token(tokens)
        if top >= vocab:
            raise DataError(f"{path} holds token id {top} but model.vocab_size={vocab}: the data was made with a larger "
                            f"vocab; set model.vocab_size to its tokenizer's size (at least {top + 1}) {where}, "
                            "or re-tokenize it")
        arrays.append(tokens)
        metas.append(meta)
    check_same_tokenizer(metas[0], metas[1], str(cfg.data.train_file), str(cfg.data.val_file),
                         "re-create both with the same prepare_data.py run")
    data_hash = next((m["tokenizer_sha256"] for m in metas if m and m.get("tokenizer_sha256")), None)
    return arrays[0], arrays[1], _check_tokenizer_dir(cfg, data_hash, where) or data_hash


def config_hint(cfg: Config) -> str:
    return f"in {cfg.source}" if cfg.source else "in your config"


def _check_tokenizer_dir(cfg: Config, data_hash: str | None, where: str) -> str | None:
    """When ``data.tokenizer_dir`` holds a tokenizer it must have ``model.vocab_size`` tokens; returns its hash."""
    from cs336_basics.tokenizer import MERGES_FILE, VOCAB_FILE, load_tokenizer

    directory = Path(cfg.data.tokenizer_dir)
    vocab_file, merges_file = directory / VOCAB_FILE, directory / MERGES_FILE
    if not vocab_file.is_file() or not merges_file.is_file():
        return None
    try:
        size = load_tokenizer(directory).vocab_size
    except Exception as exc:  # a broken tokenizer does not stop training; the data is what the model learns
        print(f"warning: could not load the tokenizer in {directory}/ to check vocab_size ({one_line(exc, 200)})",
              file=sys.stderr)
        return None
    if size != cfg.model.vocab_size:
        raise DataError(
            f"config model.vocab_size={cfg.model.vocab_size} but the tokenizer in {directory}/ has {size} tokens: "
            f"set model.vocab_size: {size} {where} (and tokenize the data with it), "
            "or point data.tokenizer_dir at the tokenizer that made the data"
        )
    own = tokenizer_sha256(vocab_file, merges_file)
    if data_hash and own != data_hash:
        print(f"warning: {cfg.data.train_file} was not tokenized with the tokenizer in {directory}/ "
              "(its sha256 differs); generate text with the tokenizer that made the data", file=sys.stderr)
        return None
    return own


# ----------------------------------------------------------------------------- one step


def forward_backward(
    model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], autocast: Callable[[], object] = nullcontext
) -> torch.Tensor:
    """Accumulate gradients of the mean loss over equal-sized micro-batches; returns that loss (detached).

    Under DDP the gradients are all-reduced once, on the last micro-batch (``no_sync`` before it).
    """
    total = None
    for i, (x, y) in enumerate(batches):
        sync = model.no_sync() if isinstance(model, DDP) and i < len(batches) - 1 else nullcontext()
        with sync:
            with autocast():
                logits = model(x)
                loss = cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            (loss / len(batches)).backward()
        total = loss.detach() if total is None else total + loss.detach()
    return total / len(batches)


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    grad_clip: float,
    autocast: Callable[[], object] = nullcontext,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step; returns (mean loss, gradient L2 norm before clipping) as device tensors (no sync)."""
    loss = forward_backward(model, batches, autocast)
    params = [p for p in model.parameters() if p.grad is not None]
    norm = clip_gradients(params, grad_clip if grad_clip > 0 else math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, torch.as_tensor(norm)


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, autocast: Callable[[], object] = nullcontext
) -> float:
    """Mean next-token cross entropy over the fixed validation sequences ``x``/``y``, ``batch_size`` at a time.

    (``evaluate.py`` scores a whole token file instead; this is the cheap estimate the loop logs.)
    """
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        with autocast():
            logits = model(xb)
        loss = cross_entropy(logits.reshape(-1, logits.shape[-1]), yb.reshape(-1))
        total += loss.double() * len(xb)
    model.train(was_training)
    return float(total) / len(x)


# ----------------------------------------------------------------------------- run state


@dataclass
class RunState:
    """What changes as a run goes; every checkpoint stores these fields (beside weights, optimizer, RNG streams)."""

    iteration: int = 0
    train_loss: float | None = None
    val_loss: float | None = None
    best_val_loss: float | None = None
    first_loss: float | None = None  # the first logged loss: divergence is measured against it
    elapsed_s: float = 0.0  # time in the training loop over all attempts
    wandb_run_id: str | None = None

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> RunState:
        return cls(**{f.name: ckpt[f.name] for f in fields(cls) if f.name in ckpt})


@dataclass
class Run:
    """Everything ``build`` makes for a run, and its :class:`RunState`; ``fit`` trains it."""

    cfg: Config
    info: DistInfo
    device: torch.device
    autocast: Callable[[], AbstractContextManager]
    precision: str
    micro_batch: int
    train_data: np.ndarray
    val_data: np.ndarray
    val_x: torch.Tensor
    val_y: torch.Tensor
    model: TransformerLM  # the plain model: checkpoints and the optimizer see this one
    optimizer: AdamW
    sampler: np.random.Generator
    tokenizer_sha256: str | None
    state: RunState = field(default_factory=RunState)
    step_model: torch.nn.Module | None = None  # what the loop calls: the model, compiled and/or DDP-wrapped
    last_good: Path | None = None  # the newest checkpoint known to hold finite weights
    start: str | None = None  # where the weights came from (resume, --init-from), for the banner

    @property
    def ckpt_dir(self) -> Path:
        return Path(self.cfg.data.checkpoint_dir)

    @property
    def tokens_per_iter(self) -> int:
        return self.cfg.training.batch_size * self.cfg.model.context_length


def build(cfg: Config, info: DistInfo) -> Run:
    """Stage 1: device and precision, checked data, a freshly initialised model and optimizer."""
    t, m = cfg.training, cfg.model
    device = resolve_device(t.device, info)
    try:
        autocast, precision = autocast_for(device, t.dtype)
    except DeviceError as exc:
        raise TrainingError(f"training.dtype={t.dtype}: {exc}") from None
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for whatever runs outside autocast
    micro_batch = check_batch_split(t.batch_size, info.world_size, t.gradient_accumulation_steps, cfg.source or "config")
    if info.is_main:
        prepare_output_dir(cfg.data.checkpoint_dir, "data.checkpoint_dir")
    train_data, val_data, tok_hash = open_datasets(cfg)
    torch.manual_seed(t.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = TransformerLM(m, device=device)
    optimizer = AdamW(model.parameters(), lr=t.max_lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay)
    # Fixed validation set: the same sequences every evaluation, whatever the seed, world size or accumulation.
    val_x, val_y = get_batch(val_data, t.eval_batches * t.batch_size, m.context_length, device,
                             generator=np.random.default_rng(EVAL_SEED))
    return Run(cfg, info, device, autocast, precision, micro_batch, train_data, val_data, val_x, val_y, model,
               optimizer, np.random.default_rng([t.seed, info.rank]), tok_hash)


def restore(run: Run, resume: bool, init_from: str | None, log: Callable[[str], None]) -> None:
    """Stage 2: continue the newest readable checkpoint (``resume``), or start from ``init_from``'s weights."""
    t, info = run.cfg.training, run.info
    found = None
    if resume:
        found = newest_checkpoint(run.ckpt_dir, lambda p, e: log(f"warning: skipping damaged checkpoint {p}: {e}"))
        if found is None:
            damaged = [str(p) for p in list_checkpoints(run.ckpt_dir)]
            if damaged:
                raise TrainingError(f"--resume: no readable checkpoint in {run.ckpt_dir}/ ({', '.join(damaged)} "
                                    "could not be read); move them away to start from scratch")
            log(f"No checkpoint in {run.ckpt_dir}/ to resume from: starting "
                f"{'from ' + init_from if init_from else 'from scratch'}")
    elif list_checkpoints(run.ckpt_dir):
        log(f"warning: {run.ckpt_dir}/ already holds checkpoints; this new run overwrites those with the same names "
            "(continue an old run with --resume, or keep it by choosing another data.checkpoint_dir)")
    if found is not None:
        path, ckpt = found
        _check_same_model(ckpt, run.cfg, f"{path} was trained with {{}}: resume with the checkpoint's model settings")
        try:
            load_checkpoint(ckpt, run.model, run.optimizer, name=str(path))
        except CheckpointError as exc:
            raise TrainingError(f"--resume: {exc}") from None
        run.state = RunState.from_checkpoint(ckpt)
        if run.state.iteration > t.max_iters:
            raise TrainingError(f"{path} is at iteration {run.state.iteration:,}, past training.max_iters="
                                f"{t.max_iters:,}: pass training.max_iters={run.state.iteration} or more to continue it")
        states = ckpt.get("rng_states") or []
        if len(states) == info.world_size:
            set_rng_state(run.sampler, states[info.rank])
        else:
            log(f"warning: {path} was written by {len(states)} process(es), this run has {info.world_size}: "
                "batches are re-seeded, so this run will not repeat an uninterrupted one exactly")
            run.sampler = np.random.default_rng([t.seed, info.rank, run.state.iteration])
        run.last_good, run.start = path, f"resumed from {path} at iteration {run.state.iteration:,}"
    elif init_from:
        path = Path(init_from)
        try:
            ckpt = read_checkpoint(path)
            _check_same_model(ckpt, run.cfg, f"--init-from {path} has {{}}: pass the checkpoint's values as overrides")
            load_checkpoint(ckpt, run.model, name=str(path))
        except CheckpointError as exc:
            raise TrainingError(f"--init-from: {exc}") from None
        run.start = f"weights from {path} (fresh optimizer, iteration 0)"


def _check_same_model(ckpt: dict, cfg: Config, message: str) -> None:
    """TrainingError (``message`` with the differences) when the checkpoint's model settings differ from cfg's."""
    saved = (ckpt.get("config") or {}).get("model") or {}
    current = asdict(cfg.model)
    diffs = [f"model.{k}={saved[k]} (config: {current[k]})" for k in current if k in saved and saved[k] != current[k]]
    if diffs:
        raise TrainingError(message.format(", ".join(diffs)))


def rng_state(generator: np.random.Generator) -> dict:
    """This process's random state: the batch sampler's numpy generator, torch CPU and CUDA generators."""
    return {
        "numpy": json.dumps(generator.bit_generator.state),  # a string: its 128-bit ints survive any loader
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
    }


def set_rng_state(generator: np.random.Generator, state: dict) -> None:
    generator.bit_generator.state = json.loads(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------- the loop


def fit(run: Run, log: Logger, on_checkpoint: Callable[[Path], None] | None = None) -> str:
    """Stage 3: train until ``training.max_iters`` or the time budget; returns the run's status.

    Statuses: ``finished`` (max_iters reached), ``out_of_time`` (the budget ended it, after its final evaluation
    and checkpoint). A diverged run raises DivergedError.
    """
    t, s = run.cfg.training, run.state
    n_params = run.model.num_parameters()
    clock = Clock(t.max_time_s, s.elapsed_s, save_estimate_s=SAVE_MIN_S + 3 * 4 * n_params / SAVE_BYTES_PER_S)
    model = run.step_model
    model.train()
    if s.iteration == t.max_iters or clock.budget_s is not None:
        validate(run, log, clock)  # a finished run still reports; a budget needs to know how long evaluating takes
    fraction, out_of_time = clock.check(run)
    stop = s.iteration >= t.max_iters or out_of_time
    while not stop:
        it = s.iteration
        if clock.budget_s is None:
            lr = get_lr_cosine_schedule(it, t.max_lr, t.min_lr, t.warmup_iters, t.lr_cycle_iters)
        else:
            lr = get_lr_budget_schedule(it, fraction, t.max_lr, t.min_lr, t.warmup_iters)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        batches = [get_batch(run.train_data, run.micro_batch, run.cfg.model.context_length, run.device,
                             generator=run.sampler) for _ in range(t.gradient_accumulation_steps)]
        loss, grad_norm = train_step(model, run.optimizer, batches, t.grad_clip, run.autocast)
        s.iteration = done = it + 1
        s.elapsed_s = clock.elapsed()
        log.step()
        fraction, out_of_time = clock.check(run)
        stop = done == t.max_iters or out_of_time  # decided once: the last step is logged and evaluated
        logging, evaluating = log_due(done, t.log_interval) or stop, done % t.eval_interval == 0 or stop
        saving = done % t.checkpoint_interval == 0
        if not (logging or evaluating or saving):
            continue
        s.train_loss = mean_over_ranks(loss, run.info)  # every rank reaches this line at the same iteration
        check_divergence(run)
        if logging:
            log.train(run, lr=lr, grad_norm=float(grad_norm), clock=clock)
        if evaluating:
            validate(run, log, clock)
        if saving:
            save(run, log, f"checkpoint_iter_{done}.pt", on_checkpoint, clock)
    s.elapsed_s = clock.elapsed()
    save(run, log, FINAL_CHECKPOINT, on_checkpoint, clock, final=True)
    s.elapsed_s = clock.elapsed()  # run.json's time includes the final checkpoint
    return "finished" if s.iteration == t.max_iters else "out_of_time"


def log_due(iteration: int, interval: int) -> bool:
    """Every ``interval`` iterations, and at 1, 2, 4, 8, ... before the first, so a slow run reports early."""
    return iteration % interval == 0 or (iteration < interval and iteration & (iteration - 1) == 0)


def mean_over_ranks(loss: torch.Tensor, info: DistInfo) -> float:
    if info.enabled:
        loss = loss.clone()
        dist.all_reduce(loss)
        loss /= info.world_size
    return float(loss)


def check_divergence(run: Run) -> None:
    """DivergedError when the loss is not finite or far above its first logged value."""
    s, t = run.state, run.cfg.training
    loss = s.train_loss
    if s.first_loss is None and math.isfinite(loss):
        s.first_loss = loss
    if math.isfinite(loss) and loss <= DIVERGENCE_FACTOR * s.first_loss:
        return
    why = f"became {loss}" if not math.isfinite(loss) else \
        f"rose to {loss:.4f}, over {DIVERGENCE_FACTOR:g}x its first value {s.first_loss:.4f}"
    raise DivergedError(f"training loss {why} at iteration {s.iteration:,}: the run diverged; last good checkpoint: "
                        f"{run.last_good or 'none'} (continue with --resume after lowering training.max_lr, e.g. "
                        f"training.max_lr={t.max_lr / 2:g}, or raising training.warmup_iters)")


def validate(run: Run, log: Logger, clock: Clock) -> None:
    """Validation loss on the fixed batches (rank 0), logged; other ranks wait."""
    started = time.time()
    s = run.state
    if run.info.is_main:  # not through DDP: its forward would wait for the other ranks
        model = run.step_model.module if isinstance(run.step_model, DDP) else run.step_model
        s.val_loss = validation_loss(model, run.val_x, run.val_y, run.micro_batch, run.autocast)
        s.best_val_loss = s.val_loss if s.best_val_loss is None else min(s.best_val_loss, s.val_loss)
        log.val(run)
    if run.info.enabled:
        dist.barrier()
    clock.spent_on("eval", time.time() - started)
    log.exclude_time(s.iteration)


def weights_are_finite(run: Run) -> bool:
    tensors = [p for p in run.model.parameters()]
    tensors += [v for st in run.optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    return bool(torch.stack([torch.isfinite(x).all() for x in tensors]).all())


def save(run: Run, log: Logger, name: str, on_checkpoint: Callable[[Path], None] | None, clock: Clock,
         final: bool = False) -> None:
    """Write a checkpoint (rank 0) after checking the weights are finite; every rank takes part.

    A full disk: a periodic checkpoint is skipped with a warning (training goes on and the next one tries again);
    the final one stops the run with the error.
    """
    started = time.time()
    s, info = run.state, run.info
    states = [rng_state(run.sampler)]
    if info.enabled:
        states = [None] * info.world_size
        dist.all_gather_object(states, rng_state(run.sampler))
    if not weights_are_finite(run):  # the same on every rank: DDP keeps weights and optimizer states equal
        raise DivergedError(f"the weights became non-finite by iteration {s.iteration:,}, so no checkpoint was "
                            f"written; last good checkpoint: {run.last_good or 'none'} (continue with --resume "
                            f"after lowering training.max_lr, e.g. training.max_lr={run.cfg.training.max_lr / 2:g})")
    path, error = run.ckpt_dir / name, [None]
    if info.is_main:
        try:
            save_checkpoint(run.model, run.optimizer, s.iteration, path, config=config_to_dict(run.cfg),
                            rng_states=states, world_size=info.world_size, tokens_seen=s.iteration * run.tokens_per_iter,
                            tokenizer_sha256=run.tokenizer_sha256,
                            **{k: v for k, v in asdict(s).items() if k != "iteration"})
        except DiskFullError as exc:
            error = [str(exc)]
    if info.enabled:
        dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        if final:
            raise DiskFullError(f"{error[0]}; the final checkpoint was not written (last good: "
                                f"{run.last_good or 'none'}, continue with --resume once there is space)")
        log.warn(f"{error[0]}; training goes on and the next checkpoint tries again")
        return
    run.last_good = path
    log.checkpointed(run)
    if info.is_main and on_checkpoint is not None:
        on_checkpoint(path)
    if info.enabled:
        dist.barrier()
    clock.spent_on("save", time.time() - started)
    log.exclude_time(s.iteration)


class Clock:
    """Time in the training loop (plus earlier attempts), and the time budget ``training.max_time``.

    The run stops when the time left would not cover one more step, a final evaluation and the final checkpoint
    (the latest step, the longest evaluation and checkpoint so far, plus a margin; under a budget ``fit`` evaluates
    once before the first step to time it, and a checkpoint's time is estimated from its size until one is
    written); the learning rate's decay follows the fraction of the budget used.
    """

    def __init__(self, budget_s: float | None, elapsed_before: float, save_estimate_s: float = 0.0):
        self.budget_s, self.before, self.t0 = budget_s, elapsed_before, time.time()
        self.longest = {"eval": 0.0, "save": save_estimate_s}
        self.last_step = 0.0  # the latest, not the longest: the first step includes compiling and warm-up
        self._last = self.t0

    def elapsed(self) -> float:
        """Training time so far; called once per step, it also times the step."""
        now = time.time()
        self.last_step, self._last = now - self._last, now
        return self.before + now - self.t0

    def spent_on(self, kind: str, seconds: float) -> None:
        self.longest[kind] = max(self.longest[kind], seconds)
        self._last = time.time()  # evaluations and checkpoints are not step time

    def reserve(self) -> float:
        return BUDGET_MARGIN * (self.last_step + self.longest["eval"] + self.longest["save"])

    def out_of_time(self) -> bool:
        if self.budget_s is None:
            return False
        return self.before + time.time() - self.t0 + self.reserve() >= self.budget_s

    def fraction(self) -> float:
        """Share of the usable budget spent (1.0 when the final evaluation and checkpoint must start)."""
        usable = max(self.budget_s - BUDGET_MARGIN * (self.longest["eval"] + self.longest["save"]), 1e-9)
        return (self.before + time.time() - self.t0) / usable

    def check(self, run: Run) -> tuple[float, bool]:
        """(fraction of the budget used, out of time), the same on every rank: rank 0's clock decides, since
        ranks that stopped at different steps, or set different learning rates, would hang or drift apart."""
        if self.budget_s is None:
            return 0.0, False
        if not run.info.enabled:  # one process: no device tensor, so no host-device sync per step
            return self.fraction(), self.out_of_time()
        values = torch.tensor([self.fraction(), float(self.out_of_time())], dtype=torch.float64, device=run.device)
        dist.broadcast(values, src=0)
        fraction, out = values.tolist()
        return fraction, out > 0


# ----------------------------------------------------------------------------- one run, end to end


def train(
    cfg: Config,
    *,
    wandb: bool = False,
    run_name: str | None = None,
    resume: bool = False,
    init_from: str | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
) -> dict:
    """Train ``cfg``'s model on ``cfg``'s data; returns a summary of the run (see ``summary``).

    ``resume`` continues from the newest readable checkpoint in ``data.checkpoint_dir`` (from scratch, or
    ``init_from``, when there is none); ``init_from`` starts from a checkpoint's weights with a fresh optimizer at
    iteration 0. ``on_checkpoint(path)`` runs on rank 0 after each checkpoint is completely written. Under torchrun
    the process group is set up here and torn down before returning. Raises UserError subclasses for problems the
    user can fix (DivergedError when the loss diverges).
    """
    info = dist_info_from_env()
    if wandb and info.is_main:
        check_wandb_login()
    started_group = False
    if info.enabled and not dist.is_initialized():
        device = resolve_device(cfg.training.device, info)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        started_group = True
    try:
        return _run(cfg, info, wandb, run_name, resume, init_from, on_checkpoint)
    except BaseException as exc:
        if started_group:  # the traceback's frames hold the DDP wrapper, whose reducer holds the process group
            traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        if started_group:
            close_process_group()


def _run(cfg, info, use_wandb, run_name, resume, init_from, on_checkpoint) -> dict:
    def say(line: str) -> None:
        if info.is_main:
            print(line, file=sys.stderr if line.startswith("warning:") else sys.stdout, flush=True)

    run = build(cfg, info)
    restore(run, resume, init_from, say)
    model = torch.compile(run.model) if cfg.training.compile else run.model
    run.step_model = DDP(model, device_ids=[run.device.index] if run.device.type == "cuda" else None) \
        if info.enabled else model
    for line in banner(run):
        say(line)
    wb = start_wandb(run, run_name) if use_wandb and info.is_main else None
    if wb is not None:
        say(f"W&B: run {wb.name} ({wb.id}) in project {cfg.wandb.project}")
    log = Logger(run, wb, run_name, resumed=run.last_good is not None)
    status, error = "failed", None
    try:
        status = fit(run, log, on_checkpoint)
        s = run.state
        if info.is_main:  # the other ranks hold no validation loss
            say(f"Done ({status.replace('_', ' ')}): {s.iteration:,} iterations in {fmt_duration(s.elapsed_s)}; "
                f"final val loss {s.val_loss:.4f}; saved {run.last_good}")
    except DivergedError as exc:
        status, error = "diverged", exc
        raise
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    except torch.cuda.OutOfMemoryError:
        t, m = cfg.training, cfg.model
        error = TrainingError(
            f"CUDA out of memory ({run.micro_batch} sequences x {m.context_length} tokens per micro-batch on "
            f"{run.device}): reduce training.batch_size (e.g. training.batch_size={max(1, t.batch_size // 2)}) or raise "
            "training.gradient_accumulation_steps, reduce model.d_model / model.num_layers (e.g. model.d_model=256 "
            "model.num_layers=4), or use a larger GPU (e.g. `--gpu A100` on Modal)"
        )
        raise error from None
    except BaseException as exc:
        error = exc if isinstance(exc, UserError) else f"crash: {type(exc).__name__}: {exc}"
        raise
    finally:
        log.close(run, status, error)
    return summary(run, status)


def summary(run: Run, status: str) -> dict:
    """What a finished run reports to its caller (the CLI, a sweep, Modal)."""
    s = run.state
    return {"status": status, "iterations": s.iteration, "tokens_seen": s.iteration * run.tokens_per_iter,
            "elapsed_s": s.elapsed_s, "final_train_loss": s.train_loss, "final_val_loss": s.val_loss,
            "best_val_loss": s.best_val_loss, "checkpoint": str(run.last_good) if run.last_good else None}


def close_process_group() -> None:
    """Tear down the default process group after every object using it (DDP's reducer) is gone.

    A gloo group destroyed while a DDP reducer still references it is freed later, during interpreter shutdown,
    where its threads can abort the process ("terminate called without an active exception").
    """
    gc.collect()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a Transformer LM locally, or data-parallel under torchrun.",
        epilog="Overrides: section.key=value after the flags, e.g. training.batch_size=16 model.d_model=256",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config-path", default=None, help="YAML config (default: cs336_basics/config.yaml)")
    source.add_argument("--preset", default=None, help=f"a packaged config: {', '.join(preset_names())}")
    parser.add_argument("--wandb", action="store_true", help="log to Weights & Biases (project from the config)")
    parser.add_argument("--run-name", default=None, help="W&B run name")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in data.checkpoint_dir")
    parser.add_argument("--init-from", metavar="PATH", default=None, help="start from a checkpoint's weights (fine-tune)")
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="train every combination of the given values, one run after another (repeatable), "
                             "e.g. --sweep training.max_lr=1e-4,3e-4,1e-3")
    parser.add_argument("--sweep-name", default=None, help="the sweep's folder under data.checkpoint_dir and its "
                        "W&B group (default: sweep-<keys>-<UTC time>); the same name again resumes the sweep")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. training.max_iters=5000")
    return parser


def command(args: argparse.Namespace) -> None:
    """One run (or, with ``--sweep``, a sweep of runs) from the parsed command line."""
    if args.sweep or args.sweep_name:
        sweep(args)
        return
    cfg = load_config(config_path(args.config_path, args.preset), args.overrides)
    train(cfg, wandb=args.wandb, run_name=args.run_name, resume=args.resume, init_from=args.init_from)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (see cs336_basics.common: 2 user error, 3 diverged, 130 interrupted)."""
    return run_command(build_parser(), command, argv, quiet=not dist_info_from_env().is_main,
                       interrupted="interrupted: continue from the last checkpoint with --resume")


def sweep(args: argparse.Namespace) -> list[dict]:
    """``--sweep``: every grid point as its own run (folder, run.json, metrics.jsonl, W&B run in one group), in turn."""
    from cs336_basics.sweep import check_name, default_name, grid, parse_sweep, run_sweep

    if not args.sweep:
        raise UserError("--sweep-name needs at least one --sweep KEY=V1,V2 (the values to try)")
    if args.init_from or args.run_name or dist_info_from_env().enabled:
        raise UserError("--sweep runs its own runs: drop --init-from / --run-name, and run it without torchrun")
    path = config_path(args.config_path, args.preset)
    axes = parse_sweep(args.sweep, args.overrides)
    first = [f"{k}={v}" for k, v in grid(axes)[0].items()]  # the base alone may be invalid (min_lr above its max_lr)
    base = load_config(path, [*args.overrides, *first])
    name = check_name(args.sweep_name) if args.sweep_name else default_name(axes)
    out_dir = Path(base.data.checkpoint_dir) / name

    def point_config(overrides: list[str], run_dir: Path | None = None) -> Config:
        extra = [f"data.checkpoint_dir={run_dir}"] if run_dir is not None else []
        group = [] if base.wandb.group else [f"wandb.group={name}"]
        return load_config(path, [*args.overrides, *overrides, *extra, *group])

    def run_one(overrides: list[str], run_name: str, run_dir: Path) -> dict:
        return train(point_config(overrides, run_dir), wandb=args.wandb, run_name=run_name, resume=True)

    return run_sweep(axes, run_one, out_dir, name=name, validate=point_config)


if __name__ == "__main__":
    sys.exit(main())
