"""The one training step: accumulation equals a big batch, the lr and its per-group scale, the
clipped gradient norm, hook order and step numbers, the deferred non-finite check, and one AdamW
step against a hand-written reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mae_bench.errors import TrainingError
from mae_bench.training.step import TrainStep, grad_scaler

CPU = torch.device("cpu")


def _linear(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(4, 3).to(dtype)


def _data(n: int, seed: int = 1, dtype: torch.dtype = torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, generator=gen, dtype=dtype),  # [n, 4]
            torch.randn(n, 3, generator=gen, dtype=dtype))  # [n, 3]


class _Recorder:
    """Hooks that record what they see: (event, step, total_steps) and the gradients."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.events: list[tuple[str, int, int]] = []
        self.grads: list[list[torch.Tensor]] = []
        self.grad_norms: list[float] = []

    def before_optimizer_step(self, step: int, total_steps: int) -> None:
        self.events.append(("before", step, total_steps))
        self.grads.append([p.grad.clone() for p in self.model.parameters()])
        self.grad_norms.append(_grad_norm(self.model))

    def on_step_end(self, step: int, total_steps: int) -> None:
        self.events.append(("end", step, total_steps))


def _grad_norm(model: nn.Module) -> float:
    return math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))


def _mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    return lambda: F.mse_loss(model(x), y)


def test_two_micro_batches_equal_one_batch_of_twice_the_size():
    x, y = _data(8)
    runs = {}
    for accum in (1, 2):
        model = _linear()
        hooks = _Recorder(model)
        step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.0),
                         lambda s: 0.5, device=CPU, accum_iter=accum, hooks=hooks)
        chunks = [(x, y)] if accum == 1 else [(x[:4], y[:4]), (x[4:], y[4:])]
        done = [step.micro_batch(_mse(model, xc, yc)) for xc, yc in chunks]
        assert done == [False] * (accum - 1) + [True]
        assert step.step == 1
        losses = step.flush()["loss"]
        runs[accum] = (hooks.grads[0], [p.detach().clone() for p in model.parameters()], losses)
    (g1, p1, l1), (g2, p2, l2) = runs[1], runs[2]
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(p1, p2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(l1, l2, rtol=1e-6, atol=0.0)  # the mean of the micro losses


def test_lr_schedule_times_each_groups_lr_scale():
    model = _linear()
    weight, bias = model.weight, model.bias
    optimizer = torch.optim.SGD([{"params": [weight], "lr_scale": 0.25}, {"params": [bias]}],
                                lr=0.0)
    before = [weight.detach().clone(), bias.detach().clone()]
    hooks = _Recorder(model)
    step = TrainStep(model, optimizer, lambda s: 0.1 * (s + 1), device=CPU, hooks=hooks)
    x, y = _data(8)
    step.micro_batch(_mse(model, x, y))
    step.micro_batch(_mse(model, x, y))
    assert [g["lr"] for g in optimizer.param_groups] == [pytest.approx(0.2 * 0.25),
                                                         pytest.approx(0.2)]
    assert step.lr == pytest.approx(0.2)
    # SGD: p -= lr(step) * lr_scale * grad, with lr(0) = 0.1 and lr(1) = 0.2
    grad_w, grad_b = hooks.grads[0]
    first_w = before[0] - 0.1 * 0.25 * grad_w
    first_b = before[1] - 0.1 * grad_b
    grad_w2, grad_b2 = hooks.grads[1]
    torch.testing.assert_close(weight.detach(), first_w - 0.2 * 0.25 * grad_w2)
    torch.testing.assert_close(bias.detach(), first_b - 0.2 * grad_b2)


def test_gradient_norm_is_clipped_before_the_update():
    model = _linear()
    seen: list[float] = []
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(_grad_norm(model)))
    hooks = _Recorder(model)
    step = TrainStep(model, optimizer, lambda s: 0.0, device=CPU, clip_grad=0.1, hooks=hooks)
    x, y = _data(8)
    step.micro_batch(lambda: 100.0 * F.mse_loss(model(x), y))
    assert hooks.grad_norms[0] > 1.0  # the hook sees the raw gradient
    assert seen[0] == pytest.approx(0.1, rel=1e-6)  # the optimizer the clipped one
    # without clipping the optimizer sees the raw norm
    model = _linear()
    seen.clear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(_grad_norm(model)))
    TrainStep(model, optimizer, lambda s: 0.0, device=CPU).micro_batch(
        lambda: 100.0 * F.mse_loss(model(x), y))
    assert seen[0] == pytest.approx(hooks.grad_norms[0], rel=1e-12)


def test_hooks_run_in_order_with_the_step_numbers():
    model = _linear()
    hooks = _Recorder(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: hooks.events.append(("update", -1, -1)))
    step = TrainStep(model, optimizer, lambda s: 0.0, device=CPU, accum_iter=2, hooks=hooks,
                     total_steps=50, step=10)  # a resumed run: 10 steps done
    x, y = _data(4)
    done = [step.micro_batch(_mse(model, x, y)) for _ in range(6)]
    assert done == [False, True] * 3
    assert hooks.events == [("before", 10, 50), ("update", -1, -1), ("end", 11, 50),
                            ("before", 11, 50), ("update", -1, -1), ("end", 12, 50),
                            ("before", 12, 50), ("update", -1, -1), ("end", 13, 50)]
    assert step.step == 13
    assert all(p.grad is None for p in model.parameters())  # cleared after every update


def test_non_finite_loss_raises_at_flush_naming_the_first_bad_step():
    model = _linear()
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.0), lambda s: 0.0,
                     device=CPU, step=4, advice="lower it")
    x, y = _data(4)
    for _ in range(2):
        step.micro_batch(_mse(model, x, y))
    assert len(step.flush()["loss"]) == 2  # steps 5 and 6: finite
    for i in range(3):  # steps 7, 8, 9: 8 and 9 are NaN; nothing raises yet (no sync per step)
        scale = 1.0 if i == 0 else float("nan")
        step.micro_batch(lambda scale=scale: scale * F.mse_loss(model(x), y))
    assert len(step.scalars) == 3
    with pytest.raises(TrainingError, match=r"^non-finite loss \(nan\) at step 8; lower it$") \
            as err:
        step.check_finite()
    assert err.value.step == 8


def test_flush_unchecked_keeps_nan_and_returns_every_scalar_per_step():
    model = _linear()
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.0), lambda s: 0.0,
                     device=CPU, accum_iter=2)
    x, y = _data(4)
    for value in (1.0, 3.0, float("nan"), 5.0):
        step.micro_batch(lambda v=value: {"loss": F.mse_loss(model(x), y) * v,
                                          "extra": torch.tensor(v)})
    out = step.flush(check=False)
    assert list(out) == ["loss", "extra"]
    assert out["extra"][0] == 2.0 and math.isnan(out["extra"][1])  # mean of each step's two
    assert step.flush() == {}  # emptied


def test_forward_runs_under_autocast_and_the_loss_function_outside_it():
    model = _linear(dtype=torch.float32)
    seen = {}

    def forward():
        seen["forward"] = torch.is_autocast_enabled("cpu")
        return model(torch.randn(2, 4))  # [2, 3] bf16 under autocast

    def loss(out):
        seen["loss"] = torch.is_autocast_enabled("cpu")
        seen["dtype"] = out.dtype
        return out.float().pow(2).mean()

    TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.0), lambda s: 0.0, device=CPU,
              precision="bf16").micro_batch(forward, loss)
    assert seen == {"forward": True, "loss": False, "dtype": torch.bfloat16}
    assert grad_scaler("bf16") is None and grad_scaler("fp32") is None


def test_fp32_steps_equal_a_hand_written_adamw():
    lr0, betas, eps, wd = 0.01, (0.9, 0.95), 1e-8, 0.05
    model = _linear()
    ref = [p.detach().clone() for p in model.parameters()]
    hooks = _Recorder(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, betas=betas, eps=eps,
                                  weight_decay=wd, foreach=True)
    step = TrainStep(model, optimizer, lambda s: lr0 * (s + 1), device=CPU, hooks=hooks)
    for i in range(3):
        x, y = _data(8, seed=i)
        step.micro_batch(_mse(model, x, y))
    m = [torch.zeros_like(p) for p in ref]
    v = [torch.zeros_like(p) for p in ref]
    for t, grads in enumerate(hooks.grads, start=1):
        lr = lr0 * t
        for p, g, m_, v_ in zip(ref, grads, m, v, strict=True):
            p.mul_(1 - lr * wd)  # decoupled weight decay
            m_.mul_(betas[0]).add_((1 - betas[0]) * g)
            v_.mul_(betas[1]).add_((1 - betas[1]) * g * g)
            m_hat = m_ / (1 - betas[0] ** t)
            v_hat = v_ / (1 - betas[1] ** t)
            p.sub_(lr * m_hat / (v_hat.sqrt() + eps))
    for got, want in zip(model.parameters(), ref, strict=True):
        torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-12)
    assert not torch.equal(ref[0], _linear().weight.detach())  # it moved


def test_stale_gradients_are_cleared_and_accum_iter_is_checked():
    model = _linear()
    model.weight.grad = torch.full_like(model.weight, 1e6)
    TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.0), lambda s: 0.0, device=CPU)
    assert model.weight.grad is None
    with pytest.raises(ValueError, match="accum_iter must be >= 1, got 0"):
        TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.0), lambda s: 0.0,
                  device=CPU, accum_iter=0)
