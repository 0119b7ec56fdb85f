"""AdamW (decoupled weight decay) and the cosine learning-rate schedule with linear warm-up."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor


class AdamW(torch.optim.Optimizer):
    """AdamW as in Loshchilov & Hutter, step for step equal to ``torch.optim.AdamW`` (non-amsgrad).

    Per parameter, with t counted from 1:
        theta <- theta * (1 - lr * weight_decay)
        m <- beta1 m + (1 - beta1) g;  v <- beta2 v + (1 - beta2) g^2
        theta <- theta - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    State per parameter: "step" (float32 tensor), "exp_avg", "exp_avg_sq" (the same keys as torch).
    ``foreach=True`` (default) updates all parameters of a group with torch._foreach_* kernels; ``foreach=False`` is the
    plain per-parameter reference loop. Tests check both against each other and against torch.optim.AdamW.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, *, foreach: bool = True):
        if lr < 0:
            raise ValueError(f"invalid learning rate {lr}: must be >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}: each must be in [0, 1)")
        if eps < 0:
            raise ValueError(f"invalid eps {eps}: must be >= 0")
        if weight_decay < 0:
            raise ValueError(f"invalid weight_decay {weight_decay}: must be >= 0")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, foreach=foreach))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            if not params:
                continue
            update = _adamw_foreach if group["foreach"] and _foreachable(params) else _adamw_reference
            update(params, grads, exp_avgs, exp_avg_sqs, steps, lr=group["lr"], beta1=group["betas"][0],
                   beta2=group["betas"][1], eps=group["eps"], weight_decay=group["weight_decay"])
        return loss


def _foreachable(params: list[Tensor]) -> bool:
    first = params[0]
    return all(p.device == first.device and p.dtype == first.dtype and not p.is_complex() for p in params)


def _adamw_reference(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay) -> None:
    """One parameter at a time (same op order as torch's single-tensor AdamW, hence bit-equal results)."""
    for p, g, m, v, step_t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        step_t += 1
        t = step_t.item()
        p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step_size = lr / (1 - beta1**t)
        denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
        p.addcdiv_(m, denom, value=-step_size)


def _adamw_foreach(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay) -> None:
    """All parameters of a group at once with multi-tensor kernels (same arithmetic as the reference)."""
    torch._foreach_add_(steps, 1)
    ts = [s.item() for s in steps]
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, [math.sqrt(1 - beta2**t) for t in ts])
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / (1 - beta1**t) for t in ts])


def get_lr_cosine_schedule(it: int, max_learning_rate: float, min_learning_rate: float, warmup_iters: int,
                           cosine_cycle_iters: int) -> float:
    """Learning rate at iteration ``it`` (CS336 definition).

    it < warmup_iters: linear warm-up it / warmup_iters * max; warmup_iters <= it <= cosine_cycle_iters: cosine
    decay from max to min; after cosine_cycle_iters: min. cosine_cycle_iters is an absolute iteration number.
    """
    if it < warmup_iters:
        return it / warmup_iters * max_learning_rate
    if it > cosine_cycle_iters:
        return min_learning_rate
    span = cosine_cycle_iters - warmup_iters
    if span <= 0:
        return min_learning_rate
    progress = (it - warmup_iters) / span
    return min_learning_rate + 0.5 * (1 + math.cos(math.pi * progress)) * (max_learning_rate - min_learning_rate)


def get_lr_budget_schedule(it: int, fraction: float, max_learning_rate: float, min_learning_rate: float,
                           warmup_iters: int) -> float:
    """Learning rate under a time budget: the cosine decay runs on the ``fraction`` of the budget used, not on
    iterations (how many fit is unknown in advance), times the usual linear warm-up over ``warmup_iters``.

    fraction 0 gives max (after warm-up), fraction >= 1 gives min, so the schedule reaches its minimum exactly as
    the budget ends whatever the throughput.
    """
    fraction = min(max(fraction, 0.0), 1.0)
    cosine = min_learning_rate + 0.5 * (1 + math.cos(math.pi * fraction)) * (max_learning_rate - min_learning_rate)
    return cosine * it / warmup_iters if it < warmup_iters else cosine
