"""Where a training run's numbers go: the console (with a progress bar), ``metrics.jsonl``, ``run.json`` and W&B.

:class:`Logger` is the one object that writes them, so a metric is recorded in one place; :func:`banner` says what a
run is about to do (and warns about plans that look like mistakes) before its first step.
"""

from __future__ import annotations

import json
import netrc
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import torch
from tqdm import tqdm

from cs336_basics.common import UserError, fmt_duration, fmt_si, one_line
from cs336_basics.config import config_to_dict
from cs336_basics.fileio import atomic_output
from cs336_basics.gpus import mfu, peak_flops, training_precision
from cs336_basics.runs import METRICS_FILE, RUN_FILE, RunRecord, write_run_record

if TYPE_CHECKING:
    from cs336_basics.train import Clock, Run

LONG_RUN_S = 24 * 3600  # a run that would take longer than this at the measured speed gets one warning
MANY_EPOCHS = 10.0  # a schedule with more passes over the training data than this gets a warning


class MetricsLog:
    """One JSON object per line in ``checkpoint_dir/metrics.jsonl``; a resumed run drops lines past its checkpoint."""

    def __init__(self, path: Path, enabled: bool, resume_from: int | None):
        self.path = path if enabled else None
        if self.path is None:
            return
        kept = []
        if resume_from is not None and path.is_file():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    if json.loads(line).get("iteration", 0) <= resume_from:
                        kept.append(line)
                except (json.JSONDecodeError, AttributeError):
                    pass  # a line cut short by a crash
        with atomic_output(path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def write(self, record: dict) -> None:
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


class Logger:
    """Where a run's numbers go: the console and a progress bar (rank 0 only), ``metrics.jsonl`` and W&B.

    Each record is written once, here; the loop only says what happened.
    """

    def __init__(self, run: Run, wandb_run=None, run_name: str | None = None, resumed: bool = False):
        self.main = run.info.is_main
        t = run.cfg.training
        self.metrics = MetricsLog(run.ckpt_dir / METRICS_FILE, self.main, run.state.iteration if resumed else None)
        self.wandb = wandb_run
        self.peak, self.devices = device_peak_flops(run.device, run.precision), run.info.world_size
        self.record = None
        if self.main:  # run.json: what ran, where, and (when it ends) how it ended
            gpu = torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else None
            self.record = RunRecord.start(run_name or run.ckpt_dir.resolve().name, config_to_dict(run.cfg),
                                          checkpoint_dir=run.ckpt_dir, device=str(run.device), gpu=gpu,
                                          world_size=run.info.world_size)
            self._write_record(run)
        self.flops_per_token = run.model.flops_per_token()
        self.bar = tqdm(total=t.max_iters, initial=run.state.iteration, unit="it", dynamic_ncols=True,
                        disable=None if self.main else True)
        self.warned_long = False
        self.mark = (time.time(), run.state.iteration)  # tokens/s is measured between log lines

    def say(self, message: str) -> None:
        if self.main:
            tqdm.write(message)

    def warn(self, message: str) -> None:
        if self.main:
            tqdm.write(f"warning: {message}", file=sys.stderr)

    def step(self) -> None:
        self.bar.update(1)

    def train(self, run: Run, *, lr: float, grad_norm: float, clock: Clock) -> None:
        s, t = run.state, run.cfg.training
        now, (then, then_iter) = time.time(), self.mark
        sec_per_iter = (now - then) / max(s.iteration - then_iter, 1)
        tok_s = run.tokens_per_iter / max(sec_per_iter, 1e-9)
        left = (t.max_iters - s.iteration) * sec_per_iter
        if clock.budget_s is not None:
            left = min(left, max(clock.budget_s - s.elapsed_s, 0.0))
        record = {"type": "train", "iteration": s.iteration, "loss": s.train_loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens": s.iteration * run.tokens_per_iter, "tokens_per_sec": tok_s,
                  "flops_per_sec": tok_s * self.flops_per_token, "elapsed_s": s.elapsed_s, "eta_s": left}
        utilisation = mfu(self.flops_per_token, tok_s, self.peak, num_devices=self.devices)
        if utilisation is not None:
            record["mfu"] = utilisation
        self.say(f"iter {s.iteration:>7,}/{t.max_iters:,} | loss {s.train_loss:.4f} | lr {lr:.3e} | "
                 f"grad norm {grad_norm:.3f} | {tok_s:,.0f} tok/s"
                 + (f" | mfu {utilisation:.1%}" if utilisation is not None else "")
                 + f" | elapsed {fmt_duration(s.elapsed_s)} | eta {fmt_duration(left)}")
        self._record(record, "train")
        if then_iter > 0 or s.iteration >= 2:  # the first iteration's time includes warm-up: not yet the speed
            self._warn_if_long(run, left, sec_per_iter)
        self.mark = (now, s.iteration)

    def val(self, run: Run) -> None:
        s = run.state
        self.say(f"iter {s.iteration:>7,} | val loss {s.val_loss:.4f} | best {s.best_val_loss:.4f}")
        self._record({"type": "val", "iteration": s.iteration, "val_loss": s.val_loss,
                      "best_val_loss": s.best_val_loss, "tokens": s.iteration * run.tokens_per_iter,
                      "elapsed_s": s.elapsed_s}, "val")

    def exclude_time(self, iteration: int) -> None:
        """Restart the tokens/s measurement: evaluations and checkpoints are not training time."""
        self.mark = (time.time(), iteration)

    def _record(self, record: dict, kind: str) -> None:
        self.metrics.write(record)
        if self.wandb is not None:  # W&B names: train/loss, train/lr, ..., val/loss, val/best_loss
            self.wandb.log({f"{kind}/{k.replace('val_', '')}": v for k, v in record.items()
                            if k not in ("type", "iteration")}, step=record["iteration"])

    def _warn_if_long(self, run: Run, left: float, sec_per_iter: float) -> None:
        if self.warned_long or left <= LONG_RUN_S:
            return
        self.warned_long = True
        one_hour = max(1, int(3600 / sec_per_iter))
        self.warn(f"at {sec_per_iter:.2f} s per iteration this run needs about {fmt_duration(left)} more on "
                  f"{run.device}: for a first run here try --preset cpu (40M tokens), training.max_iters={one_hour} "
                  "(about 1 h), or a budget such as training.max_time=1h")

    def checkpointed(self, run: Run) -> None:
        """Refresh run.json's numbers, so the listing stays current (and a run killed with -9 shows its progress)."""
        if self.record is not None:
            self._write_record(run)

    def _write_record(self, run: Run) -> None:
        s = run.state
        for key, value in (("iterations", s.iteration), ("tokens_seen", s.iteration * run.tokens_per_iter),
                           ("elapsed_s", s.elapsed_s), ("final_val_loss", s.val_loss),
                           ("best_val_loss", s.best_val_loss), ("final_train_loss", s.train_loss)):
            setattr(self.record, key, value)
        try:
            write_run_record(run.ckpt_dir, self.record)
        except (UserError, OSError) as exc:  # the log of a run must not stop the run
            self.warn(f"could not write {run.ckpt_dir / RUN_FILE}: {one_line(exc, 200)}")

    def close(self, run: Run, status: str, error: BaseException | None = None) -> None:
        """End the progress bar, W&B (exit code 0 only when the run finished) and run.json with ``status``."""
        self.bar.close()
        if self.wandb is not None:
            self.wandb.finish(exit_code=0 if status in ("finished", "out_of_time") else 1)
        if self.record is not None:
            self.record.finish(status, error=error)
            self._write_record(run)


def device_peak_flops(device: torch.device, precision: str) -> float | None:
    """One GPU's datasheet peak FLOP/s at the run's precision (gpus.py), for MFU; None for CPUs and unknown GPUs."""
    if device.type != "cuda":
        return None
    return peak_flops(torch.cuda.get_device_name(device),
                      training_precision(precision, torch.get_float32_matmul_precision()))


def banner(run: Run) -> list[str]:
    """What the run is about to do, in words; and warnings for plans that look like mistakes."""
    cfg, t, m, info = run.cfg, run.cfg.training, run.cfg.model, run.info
    ablations = [f"{k} {getattr(m, k)}" for k in ("norm", "norm_position", "position_embedding", "ffn")
                 if getattr(m, k) != getattr(type(m)(), k)]
    gpu = f" ({torch.cuda.get_device_name(run.device)})" if run.device.type == "cuda" else ""
    total_tokens = t.max_iters * run.tokens_per_iter
    epochs = total_tokens / len(run.train_data)
    budget = f"; time budget {fmt_duration(t.max_time_s)}" if t.max_time_s else ""
    lines = [
        "=" * 80, "Training Transformer LM", "=" * 80,
        f"Config: {cfg.source or '(in memory)'}",
        f"Model: vocab {m.vocab_size:,} | context {m.context_length} | d_model {m.d_model} | {m.num_layers} layers | "
        f"{m.num_heads} heads | d_ff {m.d_ff} | rope_theta {m.rope_theta:g} | attention {m.attention_impl}"
        + "".join(f" | {a}" for a in ablations),
        f"Parameters: {run.model.num_parameters():,} ({fmt_si(run.model.num_parameters(exclude_embeddings=True))} "
        "without embeddings)",
        f"Data: {cfg.data.train_file} ({len(run.train_data):,} tokens), {cfg.data.val_file} ({len(run.val_data):,} tokens)",
        f"Device: {run.device}{gpu} | {run.precision} | compile {'on' if t.compile else 'off'} | "
        f"processes {info.world_size}",
        f"Batch: {t.batch_size} sequences x {m.context_length} tokens = {run.tokens_per_iter:,} tokens/iteration "
        f"({run.micro_batch} per micro-batch, {t.gradient_accumulation_steps} accumulation step(s), "
        f"{info.world_size} process(es))",
        f"Schedule: {t.max_iters:,} iterations = {fmt_si(total_tokens)} tokens ({epochs:,.2f} epochs, "
        f"{fmt_si(run.model.flops_per_token() * total_tokens, 'FLOP')}); lr {t.max_lr:g} -> {t.min_lr:g}, warmup "
        f"{t.warmup_iters}, cosine over {'the time budget' if t.max_time_s else t.lr_cycle_iters}{budget}",
        f"Checkpoints: {run.ckpt_dir}/ every {t.checkpoint_interval} iterations; metrics: {run.ckpt_dir / METRICS_FILE}",
    ]
    if t.warmup_iters >= t.lr_cycle_iters and not t.max_time_s:
        lines.append(f"warning: training.warmup_iters={t.warmup_iters} is not below the cosine cycle "
                     f"({t.lr_cycle_iters} iterations): the learning rate never decays; lower training.warmup_iters "
                     f"(e.g. {t.lr_cycle_iters // 10})")
    if epochs > MANY_EPOCHS:
        one_epoch = max(1, len(run.train_data) // run.tokens_per_iter)
        lines.append(f"warning: the schedule passes {epochs:,.0f} times over {cfg.data.train_file} "
                     f"({fmt_si(len(run.train_data))} tokens), so the model will memorise it: use more data, or "
                     f"fewer iterations (training.max_iters={one_epoch} is one epoch)")
    if run.start:
        lines.append(f"Start: {run.start}")
    return lines


def check_wandb_login() -> None:
    """UserError unless W&B can log: offline/disabled mode, WANDB_API_KEY, or a key in ~/.netrc (``wandb login``)."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        if netrc.netrc(os.environ.get("NETRC")).authenticators(host):
            return
    except (OSError, netrc.NetrcParseError):
        pass
    raise UserError("--wandb needs a W&B login: run `wandb login` (or set WANDB_API_KEY), or log locally with "
                    "WANDB_MODE=offline; then run the same command again")


def start_wandb(run: Run, run_name: str | None):
    """A W&B run (resumed under the checkpoint's run id), or a UserError when W&B refuses."""
    import wandb

    cfg = run.cfg
    try:
        wb = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, group=cfg.wandb.group, name=run_name,
                        id=run.state.wandb_run_id, resume="allow",
                        config={**config_to_dict(cfg), "world_size": run.info.world_size,
                                "num_parameters": run.model.num_parameters()})
    except wandb.errors.Error as exc:
        raise UserError(f"W&B could not start the run: {one_line(exc, 200)} (check `wandb login`, "
                        "wandb.project / wandb.entity, or use WANDB_MODE=offline)") from None
    run.state.wandb_run_id = wb.id
    return wb
