"""The training-step benchmark's kernel floor: it must record every GEMM of a step and replay them faithfully."""


import torch

from bench_module import load_benchmark
from cs336_basics.config import ModelConfig
from cs336_basics.nn_utils import cross_entropy
from cs336_basics.optimizer import AdamW


def _load_bench():
    return load_benchmark("bench_model")


def test_recorded_gemms_are_exactly_the_models_matmul_flops():
    bench = _load_bench()
    shape = ModelConfig(vocab_size=97, context_length=16, d_model=32, num_layers=2, num_heads=4, d_ff=48,
                        rope_theta=10_000.0)
    torch.manual_seed(0)
    model = bench.build_ours(shape, torch.device("cpu"), torch.float32)
    x = torch.randint(0, shape.vocab_size, (3, shape.context_length))
    y = torch.randint(0, shape.vocab_size, (3, shape.context_length))
    step = bench.make_step("ours", model, AdamW(model.parameters(), lr=1e-3), x, y, lambda: None)

    calls = bench.record_kernels(step)

    tokens = x.numel()
    attention_flops = 12 * shape.num_layers * shape.context_length * shape.d_model * tokens
    # forward (1 GEMM) and backward (input and weight gradients, 2 GEMMs) of every weight matrix, nothing else
    assert bench.gemm_flops(calls) == model.flops_per_token() * tokens - attention_flops
    n_linear = shape.num_layers * (2 + 3) + 1  # fused qkv + output, w1/w2/w3, lm_head
    assert sum(kind == "gemm" for kind, *_ in calls) == 3 * n_linear
    assert sum(kind == "attention" for kind, *_ in calls) == 2 * shape.num_layers  # forward and backward per layer

    before = [p.detach().clone() for p in model.parameters()]
    bench.make_kernel_replay(calls, lambda: None)()  # runs on copies: the model is untouched
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert torch.isfinite(cross_entropy(model(x), y))
