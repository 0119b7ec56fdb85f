"""Loss and gradient utilities: cross-entropy and global gradient-norm clipping."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean negative log-likelihood of ``targets`` under softmax(``logits``) over all leading dims.

    logits: [..., vocab] (any float dtype, computed in float32), targets: integer ids [...].
    Stable for very large logits (max-subtracted log-sum-exp). Uses a fused autograd function that computes
    exp(logits - max) once and reuses it as the gradient; ``cross_entropy_reference`` is the plain version.
    """
    return _FusedCrossEntropy.apply(logits, targets)


def cross_entropy_reference(logits: Tensor, targets: Tensor) -> Tensor:
    """Reference: mean(logsumexp(logits) - logits[target]), autograd through plain torch ops."""
    # shift by the row max first: lse and the target logit then cancel exactly instead of in float32 round-off
    shifted = logits.float() - logits.float().amax(dim=-1, keepdim=True).detach()
    lse = torch.logsumexp(shifted, dim=-1)
    target_logits = shifted.gather(-1, targets.unsqueeze(-1).long()).squeeze(-1)
    return (lse - target_logits).mean()


class _FusedCrossEntropy(torch.autograd.Function):
    """Forward keeps p = exp(x - max) and its row sums; backward turns p into softmax - onehot in place.

    That is one exp over the logits in total (log_softmax + nll does two) and no zero-filled one-hot buffer.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:
        vocab = logits.shape[-1]
        x = logits.reshape(-1, vocab)
        t = targets.reshape(-1).long()
        if x.shape[0] != t.shape[0]:
            raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} do not match")
        x32 = x.float()
        row_max = x32.amax(dim=-1, keepdim=True)
        target_logits = x32.gather(-1, t.unsqueeze(-1)).squeeze(-1)
        # p = exp(x - max), in a fresh buffer (x32 is the caller's logits when they are already float32)
        p = x32 - row_max if x32 is x else x32.sub_(row_max)
        p.exp_()
        sums = p.sum(dim=-1, keepdim=True)
        loss = (sums.log().squeeze(-1) - (target_logits - row_max.squeeze(-1))).mean()
        ctx.save_for_backward(p, sums, t)
        ctx.logits_shape, ctx.logits_dtype = logits.shape, logits.dtype
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor):
        if getattr(ctx, "consumed", False):
            raise RuntimeError("cross_entropy backward can run only once per forward (its buffer is reused)")
        ctx.consumed = True
        p, sums, t = ctx.saved_tensors
        n = p.shape[0]
        scale = grad_loss / n
        grad = p.mul_(scale / sums)  # softmax * scale, reusing p's buffer (backward runs once)
        rows = torch.arange(n, device=p.device)
        grad[rows, t] -= scale
        return grad.to(ctx.logits_dtype).view(ctx.logits_shape), None


def clip_gradients(parameters: Iterable[torch.nn.Parameter], max_l2_norm: float, eps: float = 1e-6) -> Tensor:
    """Scale all gradients in place so their global L2 norm is at most ``max_l2_norm``.

    The scale max_l2_norm / (norm + eps) is applied only when norm > max_l2_norm; parameters without a
    gradient are skipped. Returns the global norm before clipping (a 0-dim float32 tensor).
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    norms = torch._foreach_norm(grads) if _same_device(grads) else [g.norm() for g in grads]
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    # scale 1 (a no-op, bit for bit) unless the norm exceeds the limit; torch.where avoids a GPU->CPU sync
    scale = torch.where(total > max_l2_norm, max_l2_norm / (total + eps), torch.ones_like(total))
    if _same_device(grads):
        torch._foreach_mul_(grads, scale.to(grads[0].device))
    else:
        for g in grads:
            g.mul_(scale.to(g.device))
    return total


def _same_device(tensors: list[Tensor]) -> bool:
    d = tensors[0].device
    return all(t.device == d for t in tensors)
