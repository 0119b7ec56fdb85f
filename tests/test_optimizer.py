"""AdamW against torch.optim.AdamW (and its own reference path); the cosine schedule at key points."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from cs336_basics.optimizer import AdamW, get_lr_cosine_schedule
from fixtures import snapshot_path

SHAPES = [(7, 5), (5,), (3, 4, 2), (1,)]


def _train(opt_factory, steps=25, seed=0):
    """A few params of different shapes, random quadratic-ish losses; returns final params and optimizer."""
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    opt = opt_factory(params)
    gen = torch.Generator().manual_seed(seed + 1)
    for it in range(steps):
        opt.zero_grad()
        loss = sum(((p - torch.randn(p.shape, generator=gen)) ** 2).sum() * (i + 1) for i, p in enumerate(params))
        loss.backward()
        if it % 7 == 3:
            params[1].grad = None  # a parameter without a gradient this step is skipped (its step count lags)
        for g in opt.param_groups:
            g["lr"] = 0.05 * (1 + it % 3)  # the lr is read from the group each step (schedulers set it)
        opt.step()
    return [p.detach() for p in params], opt


@pytest.mark.parametrize("foreach", [True, False])
def test_adamw_matches_torch_over_many_steps(foreach):
    kw = dict(lr=0.05, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ours, opt = _train(lambda ps: AdamW(ps, foreach=foreach, **kw))
    ref, ref_opt = _train(lambda ps: torch.optim.AdamW(ps, **kw))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(opt.state.values(), ref_opt.state.values()):
        assert set(a) == {"step", "exp_avg", "exp_avg_sq"}
        assert float(a["step"]) == float(b["step"])
        torch.testing.assert_close(a["exp_avg_sq"], b["exp_avg_sq"], rtol=1e-6, atol=1e-9)


def test_adamw_foreach_equals_reference_path():
    kw = dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.3)
    fast, _ = _train(lambda ps: AdamW(ps, foreach=True, **kw), steps=30)
    slow, _ = _train(lambda ps: AdamW(ps, foreach=False, **kw), steps=30)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_adamw_state_dict_roundtrip_continues_identically():
    torch.manual_seed(0)
    a = torch.nn.Linear(4, 3)
    b = torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = AdamW(a.parameters(), lr=0.1), AdamW(b.parameters(), lr=0.1)
    x = torch.randn(8, 4)
    for i in range(6):
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
        if i == 2:  # restart b's optimizer from a saved state
            opt_b = AdamW(b.parameters(), lr=0.1)
            opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as if read from a checkpoint
    torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0)


def test_adamw_matches_cs336_snapshot():
    """The CS336 reference test: nn.Linear(3, 2) fitted for 1000 steps (inputs rebuilt from seed 42)."""
    torch.manual_seed(42)
    model = torch.nn.Linear(3, 2, bias=False)
    opt = AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8)
    for _ in range(1000):
        opt.zero_grad()
        x = torch.rand(model.in_features)
        y = torch.tensor([x[0] + x[1], -x[2]])
        ((y - model(x)) ** 2).sum().backward()
        opt.step()
    np.testing.assert_allclose(model.weight.detach().numpy(), np.load(snapshot_path("test_adamw.npz"))["array"],
                               atol=1e-4)


def test_adamw_rejects_bad_hyperparameters():
    p = [torch.nn.Parameter(torch.zeros(2))]
    for kw in (dict(lr=-1.0), dict(betas=(1.0, 0.9)), dict(eps=-1e-8), dict(weight_decay=-0.1)):
        with pytest.raises(ValueError, match="invalid"):
            AdamW(p, **kw)


def test_cosine_schedule_matches_cs336_values():
    # expected values of the CS336 reference test (max 1, min 0.1, warmup 7, cycle 21)
    expected = [0, 0.14285714285714285, 0.2857142857142857, 0.42857142857142855, 0.5714285714285714,
                0.7142857142857143, 0.8571428571428571, 1.0, 0.9887175604818206, 0.9554359905560885,
                0.9018241671106134, 0.8305704108364301, 0.7452476826029011, 0.6501344202803414,
                0.55, 0.44986557971965857, 0.3547523173970989, 0.26942958916356996, 0.19817583288938662,
                0.14456400944391146, 0.11128243951817937, 0.1, 0.1, 0.1, 0.1]
    got = [get_lr_cosine_schedule(it, 1.0, 0.1, 7, 21) for it in range(25)]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_cosine_schedule_key_points():
    f = lambda it: get_lr_cosine_schedule(it, 3e-4, 3e-5, 100, 1100)  # noqa: E731
    assert f(0) == 0.0
    assert math.isclose(f(50), 1.5e-4)
    assert math.isclose(f(100), 3e-4)
    assert math.isclose(f(600), (3e-4 + 3e-5) / 2)
    assert math.isclose(f(1100), 3e-5)
    assert f(5000) == 3e-5
    lrs = [f(i) for i in range(100, 1101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay
    assert get_lr_cosine_schedule(5, 1.0, 0.1, 0, 0) == 0.1  # no warm-up, no cycle: the minimum
