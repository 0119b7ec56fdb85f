"""GPU training throughput: our TransformerLM vs HF LlamaForCausalLM of the same shape, in the same run, in fp32,
bf16 autocast and bf16 + torch.compile; tokens/s, MFU against the GPU's dense peak (cs336_basics/gpus.py) and peak
memory; then a check that our model's loss falls over a few hundred steps on synthetic data.

    uv run python benchmarks/bench_gpu.py                     # on a GPU: the CS336 TinyStories shape, batch 64
    uv run python benchmarks/bench_gpu.py --json out.json     # also write the figures (for docs/benchmarks.md)
    uv run python benchmarks/bench_gpu.py --smoke             # CPU smoke test of the whole script, about a minute

The shape is the CS336 TinyStories model (vocab 10k, context 256, d_model 512, 4 layers, 16 heads, d_ff 1344). One
step is zero_grad, forward (under autocast for bf16), cross-entropy, backward and a torch.optim.AdamW step (the same
optimizer for both models, so the comparison is of the models); the two models' steps are interleaved so load hits
both alike; tokens/s uses the median step after warm-up (compilation happens there). On CUDA float32 matmuls use
TF32 (``torch.set_float32_matmul_precision("high")``, as train.py sets), so fp32 rows are compared with the TF32
peak. ``--smoke`` uses a small shape and batch on the CPU, skips torch.compile (slow to build on a CPU) and only
checks that everything runs and learns; its figures mean nothing for a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_model import build_hf, build_ours, tinystories_shape  # noqa: E402

from cs336_basics import gpus  # noqa: E402
from cs336_basics.config import ModelConfig  # noqa: E402
from cs336_basics.nn_utils import cross_entropy  # noqa: E402

MODES = ("fp32", "bf16", "bf16+compile")


def smoke_shape() -> ModelConfig:
    return ModelConfig(vocab_size=512, context_length=32, d_model=64, num_layers=2, num_heads=4, d_ff=192,
                       rope_theta=10_000.0)


def synthetic_tokens(vocab: int, n: int, seed: int = 0) -> torch.Tensor:
    """A learnable stream: a cycle of stride 7 through the vocabulary with 10 % random tokens."""
    g = torch.Generator().manual_seed(seed)
    tokens = (torch.arange(n) * 7) % vocab
    noise = torch.rand(n, generator=g) < 0.1
    tokens[noise] = torch.randint(0, vocab, (int(noise.sum()),), generator=g)
    return tokens


def batch(stream: torch.Tensor, size: int, context: int, g: torch.Generator, device) -> tuple[torch.Tensor, ...]:
    starts = torch.randint(0, len(stream) - context - 1, (size,), generator=g)
    windows = torch.stack([stream[s : s + context + 1] for s in starts.tolist()])
    return windows[:, :-1].contiguous().to(device), windows[:, 1:].contiguous().to(device)


def make_step(which: str, model: torch.nn.Module, optimizer, autocast):
    """A training step on (x, y) returning the loss; ours uses our cross_entropy, HF its logits with F.cross_entropy."""
    def step(x, y) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            if which == "ours":
                logits = model(x)
                loss = cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            else:
                logits = model(input_ids=x).logits
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        loss.backward()
        optimizer.step()
        return loss.detach()
    return step


def autocast_for(mode: str, device: torch.device):
    if mode.startswith("bf16"):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def measure(mode: str, shape: ModelConfig, args, device: torch.device) -> dict[str, dict]:
    """Time ours and HF in ``mode``, interleaved; returns per-model {ms, tokens_per_s, mfu, peak_mem_gib}."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    autocast = autocast_for(mode, device)
    g = torch.Generator().manual_seed(0)
    stream = synthetic_tokens(shape.vocab_size, 1 << 16)
    x, y = batch(stream, args.batch_size, shape.context_length, g, device)
    steps, flops_per_token = {}, None
    for which, build in (("ours", build_ours), ("hf", build_hf)):
        torch.manual_seed(0)
        model = build(shape, device, torch.float32)
        if which == "ours":
            flops_per_token = model.flops_per_token()
        if mode.endswith("compile"):
            model = torch.compile(model)
        steps[which] = make_step(which, model, torch.optim.AdamW(model.parameters(), lr=1e-3), autocast)

    results = {}
    for which, step in steps.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.warmup):
            step(x, y)
        sync()
        results[which] = {"peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30
                          if device.type == "cuda" else None}
    times = {which: [] for which in steps}
    for _ in range(args.steps):
        for which, step in steps.items():
            t0 = time.perf_counter()
            step(x, y)
            sync()
            times[which].append(time.perf_counter() - t0)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    precision = "bf16" if mode.startswith("bf16") else ("tf32" if device.type == "cuda" else "fp32")
    peak = gpus.peak_flops(device_name, precision)
    for which, ts in times.items():
        ms = statistics.median(ts) * 1e3
        tokens_per_s = args.batch_size * shape.context_length / (ms / 1e3)
        results[which].update(ms=ms, tokens_per_s=tokens_per_s, mfu=gpus.mfu(flops_per_token, tokens_per_s, peak))
    return results


def loss_falls(shape: ModelConfig, args, device: torch.device) -> tuple[float, float]:
    """Train ours (bf16 autocast on CUDA, fp32 elsewhere) on synthetic data; (mean loss of the first / last 10 steps)."""
    torch.manual_seed(0)
    model = build_ours(shape, device, torch.float32)
    autocast = autocast_for("bf16" if device.type == "cuda" else "fp32", device)
    step = make_step("ours", model, torch.optim.AdamW(model.parameters(), lr=3e-3), autocast)
    g = torch.Generator().manual_seed(1)
    stream = synthetic_tokens(shape.vocab_size, 1 << 16)
    losses = [float(step(*batch(stream, args.batch_size, shape.context_length, g, device)))
              for _ in range(args.loss_steps)]
    return statistics.mean(losses[:10]), statistics.mean(losses[-10:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU smoke test: small shape and batch, no compile")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default 64 (smoke: 4)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per model and mode (default 20; smoke: 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; smoke: 1)")
    p.add_argument("--loss-steps", type=int, default=None, help="steps of the loss check (default 300; smoke: 60)")
    p.add_argument("--modes", default=None, help=f"comma-separated, of {', '.join(MODES)} (smoke: fp32,bf16)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    smoke = args.smoke
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not smoke else "cpu"))
    args.batch_size = args.batch_size or (4 if smoke else 64)
    args.steps = args.steps or (3 if smoke else 20)
    args.warmup = args.warmup or (1 if smoke else 5)
    args.loss_steps = args.loss_steps or (60 if smoke else 300)
    modes = (args.modes or ("fp32,bf16" if smoke else ",".join(MODES))).split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"unknown --modes {unknown}: use {', '.join(MODES)}")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    shape = smoke_shape() if smoke else tinystories_shape()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__} | {device} ({device_name}) | batch {args.batch_size} x {shape.context_length} "
          f"tokens | shape d_model {shape.d_model}, {shape.num_layers} layers, {shape.num_heads} heads, d_ff "
          f"{shape.d_ff}, vocab {shape.vocab_size} | {args.warmup} warm-up + {args.steps} timed steps")

    rows = {}
    print(f"{'mode':<14}{'model':<8}{'ms/step':>10}{'tokens/s':>12}{'MFU':>8}{'peak mem':>11}{'ours/HF':>9}")
    for mode in modes:
        res = measure(mode, shape, args, device)
        rows[mode] = res
        for which in ("ours", "hf"):
            r = res[which]
            mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
            mem = "n/a" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f} GiB"
            ratio = f"{res['ours']['tokens_per_s'] / res['hf']['tokens_per_s']:.2f}x" if which == "ours" else ""
            print(f"{mode:<14}{which:<8}{r['ms']:>10.1f}{r['tokens_per_s']:>12,.0f}{mfu:>8}{mem:>11}{ratio:>9}",
                  flush=True)

    first, last = loss_falls(shape, args, device)
    learned = last < 0.8 * first
    print(f"loss check ({args.loss_steps} steps, synthetic data): {first:.3f} -> {last:.3f} "
          f"{'falls: ok' if learned else 'does NOT fall'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name, "torch": torch.__version__, "batch_size": args.batch_size,
                       "shape": vars(shape), "results": rows, "loss": [first, last]}, f, indent=2)
    return 0 if learned else 1


if __name__ == "__main__":
    sys.exit(main())
