"""Generation speed with and without the KV cache (greedy, random weights), median of several runs.

    uv run python benchmarks/bench_generate.py [--quick] [--runs 5] [--new-tokens 200] [--threads 1] [--device cpu]

For each model shape it generates ``--new-tokens`` tokens from a short prompt both ways (back to back in
each round), checks the two token sequences are identical, and prints the median tokens/s of each and the
median per-round speed-up of the cache. Without the
cache every step re-runs the whole prefix (quadratic work); with it each step runs one position.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from cs336_basics.config import ModelConfig
from cs336_basics.generate import generate, pick_device
from cs336_basics.model import TransformerLM

SHAPES = {
    # name: TransformerLM kwargs
    "small": dict(vocab_size=1000, context_length=256, d_model=128, num_layers=2, num_heads=4, d_ff=344),
    "tinystories": dict(vocab_size=10_000, context_length=256, d_model=512, num_layers=4, num_heads=16, d_ff=1344),
}
PROMPT = [17, 42, 7, 256, 99, 3, 512, 8]  # 8 tokens


def timed_generate(model: TransformerLM, new_tokens: int, use_kv_cache: bool) -> tuple[float, list[int]]:
    """Tokens/s of one greedy generation and the tokens generated."""
    cuda = model.lm_head.weight.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = generate(model, PROMPT, new_tokens, temperature=0.0, use_kv_cache=use_kv_cache)
    if cuda:
        torch.cuda.synchronize()
    return len(out) / (time.perf_counter() - start), out


def compare(model: TransformerLM, new_tokens: int, runs: int) -> dict:
    """Median tokens/s of each method and median per-run speed-up.

    The two methods run back to back in each round (alternating which goes first), so a busy machine
    slows both alike and the per-round ratio stays meaningful.
    """
    for use_kv_cache in (False, True):  # warm-up
        generate(model, PROMPT, 4, temperature=0.0, use_kv_cache=use_kv_cache)
    full, cached, ratios = [], [], []
    for i in range(runs):
        order = (False, True) if i % 2 == 0 else (True, False)
        rates, ids = {}, {}
        for use_kv_cache in order:
            rates[use_kv_cache], ids[use_kv_cache] = timed_generate(model, new_tokens, use_kv_cache)
        if ids[True] != ids[False]:
            raise SystemExit("KV-cache tokens differ from full-recompute tokens")
        full.append(rates[False])
        cached.append(rates[True])
        ratios.append(rates[True] / rates[False])
    return {"full": statistics.median(full), "cached": statistics.median(cached), "ratio": statistics.median(ratios)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 new tokens, 3 runs (a smoke test)")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per method (default 5, quick 3)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens to generate (default 200, quick 64)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    args = parser.parse_args()
    runs = args.runs or (3 if args.quick else 5)
    new_tokens = args.new_tokens or (64 if args.quick else 200)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"prompt={len(PROMPT)} tokens, new={new_tokens}, greedy, median of {runs} runs")
    print(f"{'shape':<12} {'params':>8} {'no cache tok/s':>15} {'KV cache tok/s':>15} {'speed-up':>9}", flush=True)
    for name in args.shapes:
        torch.manual_seed(0)
        model = TransformerLM(ModelConfig(**SHAPES[name], rope_theta=10_000.0), device=device).eval()
        r = compare(model, new_tokens, runs)
        params = f"{model.num_parameters() / 1e6:.1f}M"
        print(f"{name:<12} {params:>8} {r['full']:>15.1f} {r['cached']:>15.1f} {r['ratio']:>8.1f}x", flush=True)


if __name__ == "__main__":
    main()
