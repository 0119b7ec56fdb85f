"""cross_entropy and clip_gradients against torch's own ops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cs336_basics.nn_utils import clip_gradients, cross_entropy, cross_entropy_reference


@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_cross_entropy_matches_torch_value_and_gradient(scale):
    torch.manual_seed(0)
    logits = (torch.randn(3, 5, 50) * scale).requires_grad_()
    targets = torch.randint(0, 50, (3, 5))
    ours = cross_entropy(logits, targets)
    ref = F.cross_entropy(logits.detach().double().view(-1, 50), targets.view(-1))
    assert torch.isfinite(ours)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=1e-4 * max(scale / 1e3, 1))
    ours.backward()
    ref_logits = logits.detach().double().requires_grad_()
    F.cross_entropy(ref_logits.view(-1, 50), targets.view(-1)).backward()
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, rtol=1e-5, atol=1e-7)


def test_fused_cross_entropy_equals_reference_path():
    torch.manual_seed(1)
    logits = (torch.randn(64, 300) * 20).requires_grad_()
    targets = torch.randint(0, 300, (64,))
    a = cross_entropy(logits, targets)
    (ga,) = torch.autograd.grad(a, logits)
    b = cross_entropy_reference(logits, targets)
    (gb,) = torch.autograd.grad(b, logits)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)
    # the caller's logits are never modified, also not by the backward
    before = logits.detach().clone()
    cross_entropy(logits, targets).backward()
    assert torch.equal(logits.detach(), before)


def test_cross_entropy_huge_logits_and_bf16():
    logits = torch.tensor([[1e4, 0.0, -1e4], [5e3, 5e3, 0.0]])
    targets = torch.tensor([0, 1])
    loss = cross_entropy(logits, targets)
    torch.testing.assert_close(loss, torch.tensor(0.5 * torch.log(torch.tensor(2.0)).item()))
    lb = torch.randn(4, 7, 11).bfloat16().requires_grad_()
    t = torch.randint(0, 11, (4, 7))
    out = cross_entropy(lb, t)
    torch.testing.assert_close(out, F.cross_entropy(lb.float().view(-1, 11), t.view(-1)))
    out.backward()
    assert lb.grad.dtype == torch.bfloat16


def test_cross_entropy_scales_with_upstream_gradient_and_rejects_shape_mismatch():
    logits = torch.randn(6, 9, requires_grad=True)
    t = torch.randint(0, 9, (6,))
    (cross_entropy(logits, t) * 3).backward()
    g3 = logits.grad.clone()
    logits.grad = None
    cross_entropy(logits, t).backward()
    torch.testing.assert_close(g3, 3 * logits.grad)
    with pytest.raises(ValueError, match="do not match"):
        cross_entropy(logits, t[:5])


def _params_with_grads(seed=0, scale=1.0):
    torch.manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s)) for s in [(5, 4), (7,), (2, 3, 2)]]
    for p in ps:
        p.grad = torch.randn_like(p) * scale
    return ps


@pytest.mark.parametrize("scale,max_norm", [(10.0, 1.0), (0.01, 1.0), (1.0, 0.5)])
def test_clip_gradients_matches_torch(scale, max_norm):
    ours, ref = _params_with_grads(scale=scale), _params_with_grads(scale=scale)
    norm = clip_gradients(ours, max_norm)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm)
    torch.testing.assert_close(torch.as_tensor(norm), ref_norm)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad)
    clipped = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in ours]))
    assert clipped <= max_norm + 1e-5


def test_clip_gradients_leaves_small_gradients_untouched_and_skips_missing():
    ps = _params_with_grads(scale=0.001)
    before = [p.grad.clone() for p in ps]
    ps.append(torch.nn.Parameter(torch.randn(3)))  # no grad
    norm = clip_gradients(ps, 1.0)
    assert float(norm) < 1.0
    for p, b in zip(ps, before):
        assert torch.equal(p.grad, b)
    assert ps[-1].grad is None
    big = _params_with_grads(scale=100.0)
    expect = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in big]))
    torch.testing.assert_close(torch.as_tensor(clip_gradients(big, 2.0)), expect)
    assert float(clip_gradients([torch.nn.Parameter(torch.ones(2))], 1.0)) == 0.0
