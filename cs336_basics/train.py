"""Train a Transformer LM: one loop for a laptop, for torchrun data-parallel, and for Modal.

    uv run python cs336_basics/train.py [--config-path cs336_basics/config.yaml] [--wandb] [--run-name NAME]
                                        [--resume] [--init-from PATH] [section.key=value ...]
    uv run torchrun --nproc-per-node 2 cs336_basics/train.py training.batch_size=64

Batches are sampled at random positions of the memmapped ``train.bin``; each rank draws from its own numpy
generator. ``training.batch_size`` is the number of sequences per optimizer step over all ranks and accumulation
steps, so each rank runs ``batch_size / world_size`` sequences per step in ``gradient_accumulation_steps``
micro-batches. Rank 0 logs, evaluates on a fixed set of validation batches and writes checkpoints, each holding
everything needed (weights, optimizer, every rank's RNG state) for ``--resume`` to continue bit-for-bit.
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
import re
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from cs336_basics.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from cs336_basics.common import DivergedError, UserError, run_cli
from cs336_basics.config import Config, check_batch_split, config_to_dict, load_config
from cs336_basics.data import get_batch, load_tokens
from cs336_basics.device import DeviceError, pick_device
from cs336_basics.fileio import atomic_output
from cs336_basics.model import TransformerLM
from cs336_basics.nn_utils import clip_gradients, cross_entropy
from cs336_basics.optimizer import AdamW, get_lr_cosine_schedule

EVAL_SEED = 1234  # validation batches do not depend on training.seed, so runs with different seeds compare
FINAL_CHECKPOINT = "checkpoint_final.pt"
METRICS_FILE = "metrics.jsonl"
_ITER_CHECKPOINT = re.compile(r"checkpoint_iter_(\d+)\.pt$")
PREPARE_HINT = (
    "uv run python prepare_data.py --train-path data/TinyStoriesV2-GPT4-train.txt "
    "--val-path data/TinyStoriesV2-GPT4-valid.txt --vocab-size {vocab} --output-dir {data_dir}"
)


class TrainingError(UserError):
    """A problem the user can fix (bad data, out of memory); the message says how."""


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


def autocast_for(device: torch.device, dtype: str) -> tuple[Callable[[], object], str]:
    """A factory of autocast contexts for the forward pass, and a label; ``auto`` is bf16 on CUDA only."""
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype == "float32":
        return nullcontext, "float32"
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TrainingError("this GPU has no bfloat16 support: set training.dtype=float32")
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), "bfloat16 autocast (float32 weights)"


# ----------------------------------------------------------------------------- data checks


def open_datasets(cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """Memmap train/val tokens after checking they exist, are long enough and match ``model.vocab_size``."""
    from cs336_basics.data import read_metadata

    vocab = cfg.model.vocab_size
    where = f"in {cfg.source}" if cfg.source else "in your config"
    arrays, metas = [], []
    for split, path in (("train", cfg.data.train_file), ("val", cfg.data.val_file)):
        if not path.is_file():
            hint = PREPARE_HINT.format(vocab=vocab, data_dir=cfg.data.data_dir)
            raise TrainingError(
                f"{split} data {path} not found: create it with `{hint}` "
                f"(or point data.data_dir / data.{split}_path at your .bin files)"
            )
        try:
            meta = read_metadata(path)
        except FileNotFoundError:
            meta = None
        except ValueError as exc:
            raise TrainingError(str(exc)) from None
        if meta is not None and int(meta["vocab_size"]) != vocab:
            n = int(meta["vocab_size"])
            raise TrainingError(
                f"config model.vocab_size={vocab} but {path} was tokenized with a {n}-token vocab: "
                f"set model.vocab_size: {n} {where} or pass model.vocab_size={n}"
            )
        try:
            tokens = load_tokens(path)
        except (OSError, ValueError) as exc:
            raise TrainingError(f"cannot read tokens from {path}: {exc}") from None
        if len(tokens) <= cfg.model.context_length:
            raise TrainingError(
                f"{path} holds {len(tokens):,} tokens, not more than model.context_length={cfg.model.context_length}: "
                "use more data or a smaller model.context_length"
            )
        top = sampled_max_token(tokens)
        if top >= vocab:
            raise TrainingError(
                f"{path} holds token id {top} but model.vocab_size={vocab}: the data was made with a larger vocab; "
                f"set model.vocab_size to its tokenizer's size (at least {top + 1}) {where}, or re-tokenize it"
            )
        arrays.append(tokens)
        metas.append(meta)
    hashes = {m.get("tokenizer_sha256") for m in metas if m is not None} - {None}
    if len(hashes) > 1:
        raise TrainingError(
            f"{cfg.data.train_file} and {cfg.data.val_file} were tokenized with different tokenizers: "
            "re-create both with the same prepare_data.py run"
        )
    _check_tokenizer_dir(cfg, next(iter(hashes), None), where)
    return arrays[0], arrays[1]


def sampled_max_token(tokens: np.ndarray, chunks: int = 16, chunk_len: int = 1 << 16) -> int:
    """Largest token id in ``chunks`` evenly spaced slices (all of a small file): a cheap corruption check."""
    n = len(tokens)
    if n <= chunks * chunk_len:
        return int(tokens.max())
    starts = np.linspace(0, n - chunk_len, chunks).astype(np.int64)
    return max(int(tokens[s : s + chunk_len].max()) for s in starts)


def _check_tokenizer_dir(cfg: Config, data_hash: str | None, where: str) -> None:
    """When ``data.tokenizer_dir`` holds a tokenizer, it must have ``model.vocab_size`` tokens."""
    from cs336_basics.data import tokenizer_sha256
    from cs336_basics.tokenizer import MERGES_FILE, VOCAB_FILE, load_tokenizer

    directory = Path(cfg.data.tokenizer_dir)
    if not (directory / VOCAB_FILE).is_file() or not (directory / MERGES_FILE).is_file():
        return
    try:
        size = load_tokenizer(directory).vocab_size
    except Exception as exc:  # a broken tokenizer does not stop training; the data is what the model learns
        print(f"warning: could not load the tokenizer in {directory} to check vocab_size ({exc})", file=sys.stderr)
        return
    if size != cfg.model.vocab_size:
        raise TrainingError(
            f"config model.vocab_size={cfg.model.vocab_size} but the tokenizer in {directory}/ has {size} tokens: "
            f"set model.vocab_size: {size} {where} (and tokenize the data with it), "
            "or point data.tokenizer_dir at the tokenizer that made the data"
        )
    if data_hash and tokenizer_sha256(directory / VOCAB_FILE, directory / MERGES_FILE) != data_hash:
        print(
            f"warning: {cfg.data.train_file} was not tokenized with the tokenizer in {directory}/ "
            "(its sha256 differs); generate text with the tokenizer that made the data",
            file=sys.stderr,
        )


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
def evaluate(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, autocast: Callable[[], object] = nullcontext
) -> float:
    """Mean next-token cross entropy over the fixed validation sequences ``x``/``y``, ``batch_size`` at a time."""
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


# ----------------------------------------------------------------------------- checkpoints and logs


def find_latest_checkpoint(directory: str | Path) -> Path | None:
    """The checkpoint with the highest iteration in ``directory`` (``checkpoint_final.pt`` wins a tie)."""
    directory = Path(directory)
    found = []
    for path in directory.glob("checkpoint_iter_*.pt"):
        match = _ITER_CHECKPOINT.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), 0, path))
    final = directory / FINAL_CHECKPOINT
    if final.is_file():
        try:
            found.append((int(read_checkpoint(final)["iteration"]), 1, final))
        except CheckpointError as exc:
            raise TrainingError(f"--resume: {exc}") from None
    return max(found)[2] if found else None


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


class MetricsLog:
    """One JSON object per line in ``checkpoint_dir/metrics.jsonl``; a resumed run drops lines past its checkpoint."""

    def __init__(self, path: Path, enabled: bool, resume_from: int | None):
        self.path = path if enabled else None
        if self.path is None:
            return
        kept = []
        if resume_from is not None and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("iteration", 0) <= resume_from:
                        kept.append(line)
                except json.JSONDecodeError:
                    pass  # a line cut short by a crash
        with atomic_output(path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def write(self, record: dict) -> None:
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def _fmt_time(seconds: float) -> str:
    return str(timedelta(seconds=int(seconds)))


def _fmt_count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _read(path: Path, flag: str) -> dict:
    try:
        return read_checkpoint(path)
    except CheckpointError as exc:
        raise TrainingError(f"{flag}: {exc}") from None


def _model_mismatch(saved: dict | None, cfg: Config) -> str | None:
    """``model.key=saved (config: value)`` for each model setting a checkpoint disagrees on, or None."""
    if not saved:
        return None
    current = asdict(cfg.model)
    diffs = [f"model.{k}={saved[k]} (config: {current[k]})" for k in current if k in saved and saved[k] != current[k]]
    return ", ".join(diffs) or None


# ----------------------------------------------------------------------------- the loop


def train(
    cfg: Config,
    *,
    wandb: bool = False,
    run_name: str | None = None,
    resume: bool = False,
    init_from: str | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
) -> dict:
    """Train ``cfg``'s model on ``cfg``'s data; returns {"iteration", "final_train_loss", "final_val_loss", "checkpoint"}.

    ``resume`` continues from the newest checkpoint in ``data.checkpoint_dir`` (from scratch, or ``init_from``, when
    there is none); ``init_from`` starts from a checkpoint's weights with a fresh optimizer at iteration 0.
    ``on_checkpoint(path)`` runs on rank 0 after each checkpoint is completely written. Under torchrun the process
    group is set up here and torn down before returning.
    """
    info = dist_info_from_env()
    started_group = False
    if info.enabled and not dist.is_initialized():
        device = resolve_device(cfg.training.device, info)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        started_group = True
    try:
        return _train(cfg, info, wandb, run_name, resume, init_from, on_checkpoint)
    except BaseException as exc:
        if started_group:  # the traceback's frames hold the DDP wrapper, whose reducer holds the process group
            traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        if started_group:
            close_process_group()


def close_process_group() -> None:
    """Tear down the default process group after every object using it (DDP's reducer) is gone.

    A gloo group destroyed while a DDP reducer still references it is freed later, during interpreter shutdown,
    where its threads can abort the process ("terminate called without an active exception").
    """
    gc.collect()
    dist.destroy_process_group()


def _train(cfg, info, use_wandb, run_name, resume, init_from, on_checkpoint) -> dict:
    t, m = cfg.training, cfg.model
    say = print if info.is_main else (lambda *a, **k: None)
    device = resolve_device(t.device, info)
    autocast, precision = autocast_for(device, t.dtype)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for whatever runs outside autocast
    micro_batch = check_batch_split(t.batch_size, info.world_size, t.gradient_accumulation_steps, cfg.source or "config")
    train_data, val_data = open_datasets(cfg)
    ckpt_dir = Path(cfg.data.checkpoint_dir)
    if info.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)

    # Model and optimizer (same seed on every rank; DDP also broadcasts rank 0's weights).
    torch.manual_seed(t.seed)
    raw_model = TransformerLM(m, device=device)
    optimizer = AdamW(raw_model.parameters(), lr=t.max_lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay)
    sampler = np.random.default_rng([t.seed, info.rank])

    start_iter, extra, source = 0, {}, None
    latest = find_latest_checkpoint(ckpt_dir) if resume else None
    if not resume and any(ckpt_dir.glob("checkpoint_*.pt")):
        say(f"warning: {ckpt_dir}/ already holds checkpoints; this new run overwrites those with the same names "
            "(continue an old run with --resume, or keep it by choosing another data.checkpoint_dir)")
    if resume and latest is None:
        say(f"No checkpoint in {ckpt_dir}/ to resume from: starting {'from ' + init_from if init_from else 'from scratch'}")
    if latest is not None:
        extra = _read(latest, "--resume")
        mismatch = _model_mismatch((extra.get("config") or {}).get("model"), cfg)
        if mismatch:
            raise TrainingError(f"{latest} was trained with {mismatch}: resume with the checkpoint's model settings")
        start_iter = load_checkpoint(extra, raw_model, optimizer)
        extra = {k: v for k, v in extra.items() if k not in ("model", "optimizer")}  # free the copies
        states = extra.get("rng_states") or []
        if len(states) == info.world_size:
            set_rng_state(sampler, states[info.rank])
        else:
            say(f"warning: {latest} was written by {len(states)} process(es), this run has {info.world_size}: "
                "batches are re-seeded, so this run will not repeat an uninterrupted one exactly")
            sampler = np.random.default_rng([t.seed, info.rank, start_iter])
        if start_iter > t.max_iters:
            raise TrainingError(f"{latest} is at iteration {start_iter:,}, past training.max_iters={t.max_iters:,}: "
                                f"pass training.max_iters={start_iter} or more to continue it")
        source = f"resumed from {latest} at iteration {start_iter:,}"
    elif init_from:
        path = Path(init_from)
        if not path.is_file():
            raise TrainingError(f"--init-from {path}: file not found")
        saved = _read(path, "--init-from")
        mismatch = _model_mismatch((saved.get("config") or {}).get("model"), cfg)
        if mismatch:
            raise TrainingError(f"--init-from {path} has {mismatch}: pass the checkpoint's values as overrides")
        load_checkpoint(saved, raw_model)
        del saved
        source = f"weights from {path} (fresh optimizer, iteration 0)"

    model = torch.compile(raw_model) if t.compile else raw_model
    train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if info.enabled else model

    # Fixed validation set: the same sequences every evaluation, whatever the seed, world size or accumulation.
    val_x, val_y = get_batch(val_data, t.eval_batches * t.batch_size, m.context_length, str(device),
                             generator=np.random.default_rng(EVAL_SEED))

    tokens_per_iter = t.batch_size * m.context_length
    n_params = raw_model.num_parameters()
    say("=" * 80)
    say("Training Transformer LM")
    say("=" * 80)
    say(f"Config: {cfg.source or '(in memory)'}")
    say(f"Model: vocab {m.vocab_size:,} | context {m.context_length} | d_model {m.d_model} | {m.num_layers} layers | "
        f"{m.num_heads} heads | d_ff {m.d_ff} | rope_theta {m.rope_theta:g} | attention {m.attention_impl}")
    say(f"Parameters: {n_params:,} ({_fmt_count(raw_model.num_parameters(exclude_embeddings=True))} without embeddings)")
    say(f"Data: {cfg.data.train_file} ({len(train_data):,} tokens), {cfg.data.val_file} ({len(val_data):,} tokens)")
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    say(f"Device: {device}{gpu} | {precision} | compile {'on' if t.compile else 'off'} | processes {info.world_size}")
    say(f"Batch: {t.batch_size} sequences x {m.context_length} tokens = {tokens_per_iter:,} tokens/iteration "
        f"({micro_batch} per micro-batch, {t.gradient_accumulation_steps} accumulation step(s), {info.world_size} process(es))")
    total_tokens = t.max_iters * tokens_per_iter
    say(f"Schedule: {t.max_iters:,} iterations = {_fmt_count(total_tokens)} tokens "
        f"({total_tokens / len(train_data):.2f} epochs, {_fmt_count(raw_model.flops_per_token() * total_tokens)} FLOPs); "
        f"lr {t.max_lr:g} -> {t.min_lr:g}, warmup {t.warmup_iters}, cosine over {t.lr_cycle_iters}")
    say(f"Checkpoints: {ckpt_dir}/ every {t.checkpoint_interval} iterations; metrics: {ckpt_dir / METRICS_FILE}")
    if t.warmup_iters >= t.lr_cycle_iters:
        say(f"warning: training.warmup_iters={t.warmup_iters} is not below the cosine cycle ({t.lr_cycle_iters} "
            f"iterations): the learning rate never decays; lower training.warmup_iters (e.g. {t.lr_cycle_iters // 10})")
    if source:
        say(f"Start: {source}")

    run = None
    run_id = extra.get("wandb_run_id")
    if use_wandb and info.is_main:
        import wandb as wandb_lib

        run = wandb_lib.init(project=cfg.wandb.project, entity=cfg.wandb.entity, name=run_name, id=run_id,
                             resume="allow", config={**config_to_dict(cfg), "world_size": info.world_size,
                                                      "num_parameters": n_params})
        run_id = run.id
        say(f"W&B: run {run.name} ({run.id}) in project {cfg.wandb.project}")

    metrics = MetricsLog(ckpt_dir / METRICS_FILE, info.is_main, start_iter if latest is not None else None)
    elapsed_before = float(extra.get("elapsed_s", 0.0))
    best_val = extra.get("best_val_loss")
    state = {"iteration": start_iter, "train_loss": extra.get("train_loss"), "val_loss": extra.get("val_loss"),
             "checkpoint": None}

    def save(name: str, iteration: int) -> Path:
        states = [None] * info.world_size
        if info.enabled:
            dist.all_gather_object(states, rng_state(sampler))
        else:
            states = [rng_state(sampler)]
        path = ckpt_dir / name
        if info.is_main:
            save_checkpoint(raw_model, optimizer, iteration, path, config=config_to_dict(cfg), rng_states=states,
                            world_size=info.world_size, wandb_run_id=run_id, tokens_seen=iteration * tokens_per_iter,
                            elapsed_s=elapsed_before + time.time() - t0, train_loss=state["train_loss"],
                            val_loss=state["val_loss"], best_val_loss=best_val)
            if on_checkpoint is not None:
                on_checkpoint(path)
        if info.enabled:
            dist.barrier()
        state["checkpoint"] = str(path)
        return path

    def run_eval(iteration: int) -> float:
        nonlocal best_val
        val = None
        if info.is_main:
            val = evaluate(model, val_x, val_y, micro_batch, autocast)
            best_val = val if best_val is None else min(best_val, val)
            tqdm.write(f"iter {iteration:>7,} | val loss {val:.4f} | best {best_val:.4f}")
            metrics.write({"type": "val", "iteration": iteration, "val_loss": val})
            if run is not None:
                run.log({"val/loss": val, "val/best_loss": best_val}, step=iteration)
        if info.enabled:
            dist.barrier()
        state["val_loss"] = val
        return val

    t0 = time.time()
    last_log_time, last_log_iter = t0, start_iter
    bar = tqdm(total=t.max_iters, initial=start_iter, unit="it", dynamic_ncols=True, disable=None if info.is_main else True)
    train_model.train()
    try:
        for it in range(start_iter, t.max_iters):
            lr = get_lr_cosine_schedule(it, t.max_lr, t.min_lr, t.warmup_iters, t.lr_cycle_iters)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = [get_batch(train_data, micro_batch, m.context_length, str(device), generator=sampler)
                       for _ in range(t.gradient_accumulation_steps)]
            loss, grad_norm = train_step(train_model, optimizer, batches, t.grad_clip, autocast)
            done = it + 1
            bar.update(1)
            last = done == t.max_iters
            logging = done % t.log_interval == 0 or last
            evaluating = done % t.eval_interval == 0 or last
            saving = done % t.checkpoint_interval == 0 or last
            if not (logging or evaluating or saving):
                continue
            if info.enabled:  # every rank reaches this line at the same iteration
                loss = loss.clone()
                dist.all_reduce(loss)
                loss /= info.world_size
            loss_value = float(loss)
            if not math.isfinite(loss_value):
                kept = find_latest_checkpoint(ckpt_dir)
                raise DivergedError(
                    f"training loss became {loss_value} at iteration {done}: the run diverged; last good checkpoint: "
                    f"{kept or 'none'} (continue with --resume after lowering training.max_lr, e.g. "
                    f"training.max_lr={t.max_lr / 2:g}, or raising training.warmup_iters)"
                )
            state.update(iteration=done, train_loss=loss_value)
            if logging:
                now = time.time()
                tok_s = (done - last_log_iter) * tokens_per_iter / max(now - last_log_time, 1e-9)
                elapsed = elapsed_before + now - t0
                norm = float(grad_norm)
                last_log_time, last_log_iter = now, done
                if info.is_main:
                    tqdm.write(f"iter {done:>7,}/{t.max_iters:,} | loss {loss_value:.4f} | lr {lr:.3e} | "
                               f"grad norm {norm:.3f} | {tok_s:,.0f} tok/s | elapsed {_fmt_time(elapsed)}")
                    record = {"type": "train", "iteration": done, "loss": loss_value, "lr": lr, "grad_norm": norm,
                              "tokens": done * tokens_per_iter, "tokens_per_sec": tok_s, "elapsed_s": elapsed}
                    metrics.write(record)
                    if run is not None:
                        run.log({"train/loss": loss_value, "train/lr": lr, "train/grad_norm": norm,
                                 "train/tokens": done * tokens_per_iter, "train/tokens_per_sec": tok_s,
                                 "train/elapsed_s": elapsed}, step=done)
            if evaluating:
                run_eval(done)
            if saving and done % t.checkpoint_interval == 0:
                save(f"checkpoint_iter_{done}.pt", done)
            if evaluating or saving:  # tokens/s measures training only
                last_log_time, last_log_iter = time.time(), done
        if start_iter == t.max_iters:  # resumed a finished run: nothing to train, still report and save
            run_eval(t.max_iters)
        final = save(FINAL_CHECKPOINT, t.max_iters)
        if info.is_main:
            say(f"Done: {t.max_iters:,} iterations in {_fmt_time(elapsed_before + time.time() - t0)}; "
                f"final val loss {state['val_loss']:.4f}; saved {final}")
    except torch.cuda.OutOfMemoryError:
        raise TrainingError(
            f"CUDA out of memory ({micro_batch} sequences x {m.context_length} tokens per micro-batch on {device}{gpu}): "
            f"reduce training.batch_size (e.g. training.batch_size={max(1, t.batch_size // 2)}) or raise "
            "training.gradient_accumulation_steps, reduce model.d_model / model.num_layers (e.g. model.d_model=256 "
            "model.num_layers=4), or use a larger GPU (e.g. `--gpu A100` on Modal)"
        ) from None
    finally:
        bar.close()
        if run is not None:
            run.finish(exit_code=0 if state["checkpoint"] and state["iteration"] == t.max_iters else 1)
    return {"iteration": state["iteration"], "final_train_loss": state["train_loss"],
            "final_val_loss": state["val_loss"], "checkpoint": state["checkpoint"]}


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a Transformer LM locally, or data-parallel under torchrun.",
        epilog="Overrides: section.key=value after the flags, e.g. training.batch_size=16 model.d_model=256",
    )
    parser.add_argument("--config-path", default=None, help="YAML config (default: cs336_basics/config.yaml)")
    parser.add_argument("--wandb", action="store_true", help="log to Weights & Biases (project from the config)")
    parser.add_argument("--run-name", default=None, help="W&B run name")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in data.checkpoint_dir")
    parser.add_argument("--init-from", metavar="PATH", default=None, help="start from a checkpoint's weights (fine-tune)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. training.max_iters=5000")
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (see cs336_basics.common: 2 user error, 3 diverged, 130 interrupted)."""
    args = build_parser().parse_args(argv)

    def run() -> None:
        cfg = load_config(args.config_path, args.overrides)
        train(cfg, wandb=args.wandb, run_name=args.run_name, resume=args.resume, init_from=args.init_from)

    return run_cli(run, quiet=not dist_info_from_env().is_main,
                   interrupted="interrupted: continue from the last checkpoint with --resume")


if __name__ == "__main__":
    sys.exit(main())
