"""Training-step throughput of our TransformerLM vs HuggingFace LlamaForCausalLM of the same shape, in the same run.

One step = zero_grad, forward, cross-entropy, backward, optimizer step on the same batch. Steps of the two models are
interleaved (ours, HF, ours, HF, ...) so that load from other processes hits both alike; we report the median step time
after warm-up. Default shape: the CS336 TinyStories model (vocab 10k, context 256, d_model 512, d_ff 1344, 4 layers,
16 heads, RoPE theta 10k), batch 8, float32 eager, 2 torch threads.

    uv run python benchmarks/bench_model.py            # full run
    uv run python benchmarks/bench_model.py --quick    # fewer steps
    uv run python benchmarks/bench_model.py --optimizer torch   # torch.optim.AdamW for both models
    uv run python benchmarks/bench_model.py --compile  # adds torch.compile rows for both (slow to start)
    uv run python benchmarks/bench_model.py --floor    # adds our GEMMs + attention kernels replayed alone
    uv run python benchmarks/bench_model.py --device cuda --dtype bfloat16 --batch-size 64   # e.g. on an H100

MFU: model FLOPs per token (TransformerLM.flops_per_token: 6 N_matmul + 12 L d T) x tokens/s, divided by a peak:
on CUDA the bf16 dense peak given by --peak-tflops (default 989, H100 SXM); on CPU an estimate, cores x 32 fp32
FLOPs/cycle (two 256-bit FMA units, AVX2) x clock.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from math import prod as math_prod

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cs336_basics.config import ModelConfig  # noqa: E402
from cs336_basics.model import TransformerLM  # noqa: E402
from cs336_basics.nn_utils import cross_entropy  # noqa: E402
from cs336_basics.optimizer import AdamW  # noqa: E402


def tinystories_shape() -> ModelConfig:
    """The CS336 TinyStories model: vocab 10k, context 256, d_model 512, d_ff 1344, 4 layers, 16 heads."""
    return ModelConfig(vocab_size=10_000, context_length=256, d_model=512, num_layers=4, num_heads=16, d_ff=1344,
                       rope_theta=10_000.0)


def build_ours(shape: ModelConfig, device, dtype) -> torch.nn.Module:
    return TransformerLM(shape, device=device, dtype=dtype)


def build_hf(shape: ModelConfig, device, dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=shape.vocab_size, hidden_size=shape.d_model, intermediate_size=shape.d_ff,
                      num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
                      num_key_value_heads=shape.num_heads, max_position_embeddings=shape.context_length,
                      rms_norm_eps=1e-5, rope_theta=shape.rope_theta, tie_word_embeddings=False,
                      attention_bias=False, mlp_bias=False, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype)


def make_step(name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, x, y, sync):
    """One training step; ours uses our cross_entropy, HF its logits with torch's F.cross_entropy."""
    if name.startswith("ours"):
        def loss_fn():
            return cross_entropy(model(x), y)
    else:
        def loss_fn():
            logits = model(input_ids=x).logits
            return F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        sync()
        return loss.item()

    return step


def record_kernels(step) -> list:
    """The GEMMs (mm/addmm/bmm/baddbmm) and attention kernels one training step dispatches, forward and backward,
    as (kind, op, args, kwargs) ready to run again.

    GEMM arguments are replaced by random tensors of the same shape and stride: their speed does not depend on the
    values. Attention arguments are cloned, since its exp and masking see the real values (random ones could hit
    slow denormals).
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    gemms = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
             torch.ops.aten.baddbmm.default}
    calls = []

    def random_like(a):
        return torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device=a.device).normal_()

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in gemms:
                calls.append(("gemm", func, [random_like(a) if isinstance(a, torch.Tensor) else a for a in args],
                              kwargs))
            elif "scaled_dot_product" in func.name():
                calls.append(("attention", func, [a.clone() if isinstance(a, torch.Tensor) else a for a in args],
                              kwargs))
            return func(*args, **kwargs)

    with Recorder():
        step()
    return calls


def gemm_flops(calls: list) -> float:
    """2*M*K*N summed over the recorded GEMMs (the last two arguments are the multiplied matrices)."""
    return sum(2 * math_prod(args[-2].shape) * args[-1].shape[-1] for kind, _, args, _ in calls if kind == "gemm")


def make_kernel_replay(calls: list, sync):
    """A callable that runs the recorded kernels again: the time a step would take if everything else in it (norms,
    SwiGLU, RoPE, loss, optimizer, ...) cost nothing."""
    def replay() -> None:
        for _, func, args, kwargs in calls:
            func(*args, **kwargs)
        sync()

    return replay


def cpu_peak_flops(threads: int) -> tuple[float, str]:
    mhz = 0.0
    try:
        with open("/proc/cpuinfo") as f:
            mhz = max(float(line.split(":")[1]) for line in f if line.startswith("cpu MHz"))
    except (OSError, ValueError):
        pass
    mhz = mhz or 2500.0
    return threads * 32 * mhz * 1e6, f"{threads} cores x 32 FLOP/cycle x {mhz / 1000:.2f} GHz"


def peak_rss_mib() -> float:
    """This process's peak resident set size in MiB (VmHWM: unlike ru_maxrss it does not inherit the parent's)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_of(which: str, args) -> float:
    """Peak RSS (MiB) of a fresh process that builds one model and runs 2 training steps (CPU memory)."""
    cmd = [sys.executable, __file__, "--_memory-probe", which, "--batch-size", str(args.batch_size),
           "--threads", str(args.threads), "--optimizer", args.optimizer, "--dtype", args.dtype]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def interleaved_median_ms(cands: dict, n: int) -> dict[str, float]:
    for f in cands.values():
        f()
    times = {k: [] for k in cands}
    for _ in range(n):
        for k, f in cands.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def bench_components(batch: int, shape: ModelConfig, n: int) -> None:
    """Forward + backward of single components, ours vs the alternatives, interleaved."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from cs336_basics.model import rotate_pairs, rotate_pairs_real, scaled_dot_product_attention
    from cs336_basics.nn_utils import cross_entropy_reference

    t, h = shape.context_length, shape.num_heads
    dh = shape.d_model // h

    def fwd_bwd(fn, *inputs):
        def run():
            out = fn()
            (out if out.dim() == 0 else out.sum()).backward()
            for x in inputs:
                x.grad = None
        return run

    logits = torch.randn(batch * t, shape.vocab_size, requires_grad=True)
    targets = torch.randint(0, shape.vocab_size, (batch * t,))
    qk = torch.randn(batch, t, 2, h, dh, requires_grad=True)
    ang = torch.rand(t, 1, 1, dh // 2)
    cos, sin = ang.cos(), ang.sin()
    q, k, v = (torch.randn(batch, t, h, dh).transpose(1, 2).requires_grad_() for _ in range(3))
    causal = torch.ones(t, t, dtype=torch.bool).tril()

    def flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def math_backend():
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    groups = {
        f"cross-entropy [{batch * t}, {shape.vocab_size}]": {
            "ours cross_entropy (fused)": fwd_bwd(lambda: cross_entropy(logits, targets), logits),
            "F.cross_entropy": fwd_bwd(lambda: F.cross_entropy(logits, targets), logits),
            "ours cross_entropy_reference": fwd_bwd(lambda: cross_entropy_reference(logits, targets), logits),
        },
        f"RoPE on q,k {list(qk.shape)}": {
            "ours rotate_pairs (complex)": fwd_bwd(lambda: rotate_pairs(qk, cos, sin), qk),
            "rotate_pairs_real (unbind+stack)": fwd_bwd(lambda: rotate_pairs_real(qk, cos, sin), qk),
        },
        f"causal attention {list(q.shape)}": {
            "sdpa flash (ours, default)": fwd_bwd(flash, q, k, v),
            "sdpa math backend": fwd_bwd(math_backend, q, k, v),
            "ours reference attention": fwd_bwd(lambda: scaled_dot_product_attention(q, k, v, causal), q, k, v),
        },
    }
    print(f"threads {torch.get_num_threads()}; forward + backward, median of {n} interleaved runs")
    for title, cands in groups.items():
        res = interleaved_median_ms(cands, n)
        first = next(iter(res.values()))
        print(f"\n{title}")
        for name, ms in res.items():
            print(f"  {name:<36}{ms:>9.1f} ms{ms / first:>7.2f}x ours' time")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 warm-up + 5 timed steps per model")
    p.add_argument("--steps", type=int, default=15, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--optimizer", default="ours", choices=["ours", "torch"],
                   help="ours: our AdamW (foreach) for ours, torch.optim.AdamW for HF; torch: torch's for both")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd versions of both")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--floor", action="store_true",
                   help="also time ours' GEMMs and attention kernels alone (replayed): the floor for everything else")
    p.add_argument("--profile", action="store_true", help="print the top ops of one step of ours (torch.profiler)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator peak for the MFU on CUDA")
    p.add_argument("--components", action="store_true",
                   help="only micro-benchmark components (loss, RoPE, attention) against their alternatives")
    p.add_argument("--_memory-probe", dest="memory_probe", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.steps, args.warmup = 5, 2

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shape = tinystories_shape()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, shape.vocab_size, (args.batch_size, shape.context_length + 1), generator=gen)
    x, y = tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)

    def optimizer_for(name, model):
        if name.startswith("ours") and args.optimizer == "ours":
            return AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)

    if args.components:
        bench_components(args.batch_size, shape, args.steps)
        return

    if args.memory_probe:
        torch.manual_seed(0)
        model = (build_ours if args.memory_probe == "ours" else build_hf)(shape, device, dtype)
        step = make_step(args.memory_probe, model, optimizer_for(args.memory_probe, model), x, y, sync)
        step()
        step()
        print(peak_rss_mib())
        return

    torch.manual_seed(0)
    models = {"ours": build_ours(shape, device, dtype), "hf_llama": build_hf(shape, device, dtype)}
    if args.compile:
        models["ours_compiled"] = torch.compile(build_ours(shape, device, dtype))
        models["hf_llama_compiled"] = torch.compile(build_hf(shape, device, dtype))
    steps = {n: make_step(n, m, optimizer_for(n, m), x, y, sync) for n, m in models.items()}
    n_params = {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()}

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}, dtype {args.dtype}, "
          f"batch {args.batch_size} x {shape.context_length} tokens, optimizer: {args.optimizer}")
    print(f"shape: {vars(shape)}; params ours {n_params['ours']:,}, HF {n_params['hf_llama']:,}")
    kernels = []
    if args.floor:
        kernels = record_kernels(steps["ours"])
        steps["ours_gemms_only"] = make_kernel_replay([c for c in kernels if c[0] == "gemm"], sync)
        steps["ours_gemms_attention"] = make_kernel_replay(kernels, sync)
    first_loss = {}
    for n, step in steps.items():
        t0 = time.perf_counter()
        first_loss[n] = step()
        for _ in range(args.warmup - 1):
            step()
        loss = "" if first_loss[n] is None else f", first loss {first_loss[n]:.3f}"
        print(f"  warm-up {n}: {time.perf_counter() - t0:.1f}s{loss}")
    times = {n: [] for n in steps}
    for _ in range(args.steps):
        for n, step in steps.items():  # interleaved so background load affects every model alike
            t0 = time.perf_counter()
            step()
            times[n].append(time.perf_counter() - t0)

    ntok = args.batch_size * shape.context_length
    fpt = models["ours"].flops_per_token()
    if device.type == "cuda":
        peak, peak_desc = args.peak_tflops * 1e12, f"{args.peak_tflops:g} TFLOP/s (--peak-tflops)"
    else:
        peak, peak_desc = cpu_peak_flops(args.threads)
    print(f"\nFLOPs/token (training, 6*N_matmul + 12*L*d*T) = {fpt / 1e6:.1f} MFLOP; peak used for MFU: {peak_desc}")
    print(f"{'model':<20}{'median step':>13}{'min':>9}{'tokens/s':>11}{'achieved':>14}{'MFU':>8}{'vs HF':>8}")
    tps = {}
    for n, ts in times.items():
        med = statistics.median(ts)
        tps[n] = ntok / med
    for n, ts in times.items():
        if n.startswith("ours_gemms"):
            continue
        med = statistics.median(ts)
        base = tps["hf_llama_compiled" if n.endswith("compiled") else "hf_llama"]
        achieved = tps[n] * fpt
        print(f"{n:<20}{med * 1e3:>11.0f}ms{min(ts) * 1e3:>7.0f}ms{tps[n]:>11.0f}{achieved / 1e9:>9.1f} GF/s"
              f"{achieved / peak:>8.1%}{tps[n] / base:>7.2f}x")
    best = {n: min(ts) for n, ts in times.items()}
    print(f"\nratio ours / HF (eager): {tps['ours'] / tps['hf_llama']:.2f}x by median step of {args.steps} interleaved "
          f"steps, {best['hf_llama'] / best['ours']:.2f}x by fastest step (least disturbed by other load)")
    if kernels:
        n_gemm = sum(kind == "gemm" for kind, *_ in kernels)
        n_attn, flops = len(kernels) - n_gemm, gemm_flops(kernels)
        hf, ours = statistics.median(times["hf_llama"]), statistics.median(times["ours"])
        gemm = statistics.median(times["ours_gemms_only"])
        both = statistics.median(times["ours_gemms_attention"])
        print(f"\nFloor (ours' kernels replayed, median):\n"
              f"  {n_gemm} GEMMs ({flops / 1e9:.0f} GFLOP): {gemm * 1e3:.0f} ms = {flops / gemm / 1e9:.0f} GFLOP/s, "
              f"{gemm / ours:.0%} of our step; a step of nothing else would be {hf / gemm:.2f}x HF\n"
              f"  + {n_attn} attention kernels (forward + backward): {both * 1e3:.0f} ms, {both / ours:.0%} of our step; "
              f"a step of nothing else would be {hf / both:.2f}x HF\n"
              f"  1.25x HF needs a step <= {hf / 1.25 * 1e3:.0f} ms, leaving {(hf / 1.25 - both) * 1e3:.0f} ms for "
              f"everything but GEMMs and attention (ours spends {(ours - both) * 1e3:.0f} ms there now)")
    if device.type == "cpu":
        h100 = 989e12
        print(f"H100 estimate: MFU = tokens/s x {fpt / 1e6:.1f} MFLOP / 989 TFLOP/s; e.g. 400k tokens/s would be "
              f"{400e3 * fpt / h100:.1%}. Measure with --device cuda --dtype bfloat16 on the GPU.")
    if not args.no_memory and device.type == "cpu":
        mem = {n: peak_rss_of(n, args) for n in ("ours", "hf_llama")}
        print(f"peak RSS of a process doing 2 steps: ours {mem['ours']:.0f} MiB, HF {mem['hf_llama']:.0f} MiB "
              f"(ratio {mem['hf_llama'] / mem['ours']:.2f}x)")
    elif device.type == "cuda":
        for n in ("ours", "hf_llama"):
            torch.cuda.reset_peak_memory_stats()
            steps[n]()
            print(f"peak CUDA memory {n}: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            steps["ours"]()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
