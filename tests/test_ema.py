"""EMA helpers: the cosine momentum schedule (endpoints, midpoint, monotone) and ema_update
(exact values per parameter, buffers untouched, momentum 1 and 0, no autograd graph)."""

import copy
import math

import pytest
import torch
from torch import nn

from baselines.ema import cosine_momentum, ema_update


@pytest.mark.parametrize("base,final", [(0.996, 1.0), (0.99, 1.0), (0.9, 0.95)])
def test_cosine_momentum_endpoints_and_midpoint(base, final):
    total = 100
    assert math.isclose(cosine_momentum(0, total, base, final), base, abs_tol=1e-12)
    assert math.isclose(cosine_momentum(total, total, base, final), final, abs_tol=1e-12)
    assert math.isclose(cosine_momentum(total // 2, total, base, final), (base + final) / 2)
    # a quarter of the way: the half-cycle cosine, not a straight line
    quarter = final - (final - base) * (math.cos(math.pi / 4) + 1) / 2
    assert math.isclose(cosine_momentum(25, total, base, final), quarter)
    assert not math.isclose(quarter, base + (final - base) / 4)
    values = [cosine_momentum(s, total, base, final) for s in range(total + 1)]
    assert all(b > a for a, b in zip(values, values[1:], strict=False))
    assert isinstance(values[0], float)


def test_cosine_momentum_default_final_is_one():
    assert math.isclose(cosine_momentum(10, 10, 0.996), 1.0)
    assert math.isclose(cosine_momentum(5, 10, 0.996), 0.998)


def _pair():
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).double()
    target = copy.deepcopy(online)
    with torch.no_grad():
        for p in target.parameters():
            p.copy_(torch.randn_like(p))
        # buffers differ between the two, so copying or averaging them would be caught
        online[1].running_mean.copy_(torch.tensor([1.0, -2.0]))
        online[1].running_var.copy_(torch.tensor([3.0, 0.5]))
        online[1].num_batches_tracked.fill_(7)
        target[1].running_mean.copy_(torch.tensor([-0.5, 0.25]))
        target[1].running_var.copy_(torch.tensor([2.0, 4.0]))
    return target, online


def _snapshot(module):
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


@pytest.mark.parametrize("momentum", [0.996, 0.5, 0.25])
def test_ema_update_exact_values_and_buffers_untouched(momentum):
    target, online = _pair()
    before_t, before_o = _snapshot(target), _snapshot(online)
    ema_update(target, online, momentum)
    params = dict(target.named_parameters())
    for name, t in target.state_dict().items():
        if name in params:
            expected = momentum * before_t[name] + (1 - momentum) * before_o[name]
            torch.testing.assert_close(t, expected, rtol=0, atol=1e-15)
        else:
            assert torch.equal(t, before_t[name]), name  # buffers untouched
    for name, o in online.state_dict().items():
        assert torch.equal(o, before_o[name]), name  # online untouched
    for p in target.parameters():
        assert p.grad_fn is None and p.is_leaf  # no autograd graph built


def test_ema_update_momentum_one_keeps_target_zero_copies_online():
    target, online = _pair()
    before_t = _snapshot(target)
    ema_update(target, online, 1.0)
    for name, t in target.state_dict().items():
        assert torch.equal(t, before_t[name]), name
    ema_update(target, online, 0.0)
    for (name, t), o in zip(target.named_parameters(), online.parameters(), strict=True):
        assert torch.equal(t, o), name
    assert torch.equal(target[1].running_mean, before_t["1.running_mean"])


def test_ema_update_on_frozen_target():
    """The target usually has requires_grad=False; the update must still apply."""
    target, online = _pair()
    target.requires_grad_(False)
    before = target[0].weight.detach().clone()
    ema_update(target, online, 0.9)
    torch.testing.assert_close(target[0].weight, 0.9 * before + 0.1 * online[0].weight.detach())
    assert not target[0].weight.requires_grad
