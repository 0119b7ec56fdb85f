"""Training-loop throughput: cs336_basics.train.train() against a bare PyTorch loop on the same model and data.

The peer is the smallest loop that does the same work per step (random batches from a memmap, forward, cross
entropy, backward, global-norm clipping, AdamW) with PyTorch's own F.cross_entropy, clip_grad_norm_ and
torch.optim.AdamW, and no logging, evaluation or checkpoints. The ratio shows what our loop costs on top
(our AdamW/cross-entropy, loss syncs at log intervals, metrics, tqdm). Both run in the same process, alternating,
and the medians of several repeats are reported.

    uv run python benchmarks/bench_train.py [--device cpu] [--repeats 3] [--iters 60] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cs336_basics.config import load_config  # noqa: E402
from cs336_basics.model import TransformerLM  # noqa: E402
from cs336_basics.train import train  # noqa: E402


def make_tokens(root: Path, vocab: int, n: int) -> None:
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in ("train.bin", "val.bin"):
        rng.integers(0, vocab, n, dtype=np.uint16).tofile(data / name)


def peer_loop(cfg, device: torch.device, iters: int, warmup: int) -> float:
    """Tokens/s of a bare PyTorch loop over the same model, batch and schedule-free AdamW."""
    m, t = cfg.model, cfg.training
    torch.manual_seed(t.seed)
    model = TransformerLM(m, device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=t.max_lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay)
    tokens = np.memmap(cfg.data.train_file, dtype=np.uint16, mode="r")
    rng = np.random.default_rng(0)
    ctx, batch = m.context_length, t.batch_size
    start = time.perf_counter()
    for i in range(warmup + iters):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        starts = rng.integers(0, len(tokens) - ctx, batch)
        window = torch.from_numpy(np.asarray(tokens[starts[:, None] + np.arange(ctx + 1)], dtype=np.int64)).to(device)
        x, y = window[:, :-1], window[:, 1:]
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    float(loss.detach())  # wait for the device
    return iters * batch * ctx / (time.perf_counter() - start)


def our_loop(cfg, iters: int, warmup: int) -> float:
    """Tokens/s of train(), from its own metrics.jsonl (intervals after the warm-up ones)."""
    train(cfg)
    lines = (Path(cfg.data.checkpoint_dir) / "metrics.jsonl").read_text().splitlines()
    rates = [r["tokens_per_sec"] for r in map(json.loads, lines) if r["type"] == "train" and r["iteration"] > warmup]
    return statistics.median(rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--iters", type=int, default=60, help="timed iterations per run")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is stable on a shared machine)")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=1000)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warmup, interval = 10, 10
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_tokens(root, args.vocab, 200_000)
        overrides = [
            f"model.vocab_size={args.vocab}", f"model.context_length={args.context}", f"model.d_model={args.d_model}",
            f"model.num_layers={args.layers}", f"model.num_heads={max(1, args.d_model // 64)}",
            f"model.d_ff={args.d_model * 8 // 3 // 16 * 16}", f"training.batch_size={args.batch}",
            f"training.max_iters={warmup + args.iters}", f"training.log_interval={interval}",
            f"training.eval_interval={10**9}", "training.eval_batches=1", f"training.checkpoint_interval={10**9}",
            "training.warmup_iters=5", f"training.device={args.device}", f"data.data_dir={root / 'data'}",
            f"data.checkpoint_dir={root / 'ckpt'}", f"data.tokenizer_dir={root / 'none'}",
        ]
        cfg = load_config(None, overrides)
        device = torch.device(args.device)
        ours, peer = [], []
        for _ in range(args.repeats):
            peer.append(peer_loop(cfg, device, args.iters, warmup))
            ours.append(our_loop(cfg, args.iters, warmup))
    print(f"\nmodel d_model={args.d_model} layers={args.layers} context={args.context} batch={args.batch} "
          f"vocab={args.vocab} on {args.device}, {args.threads} thread(s), {args.repeats} repeats")
    print(f"bare PyTorch loop: {statistics.median(peer):>10,.0f} tok/s  (runs: {', '.join(f'{v:,.0f}' for v in peer)})")
    print(f"train.train():     {statistics.median(ours):>10,.0f} tok/s  (runs: {', '.join(f'{v:,.0f}' for v in ours)})")
    print(f"ratio ours / peer: {statistics.median(ours) / statistics.median(peer):.3f}")


if __name__ == "__main__":
    main()
