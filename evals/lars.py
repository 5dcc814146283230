"""LARS (You et al. 2017, "Large Batch Training of Convolutional Networks"), the optimizer of
MAE's linear probe.

For a weight matrix W with gradient g (weight decay added first), the step is SGD with momentum
on ``g * trust_coefficient * ||W|| / ||g||``: every matrix moves by the same *relative* amount
whatever the scale of its gradient, which keeps very large batches (MAE probes with 16384)
stable. Vectors (biases, norm parameters) skip both the trust ratio and the weight decay and
get plain SGD with momentum, as in MAE's ``util/lars.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor


class LARS(torch.optim.Optimizer):
    """SGD + momentum with a layer-wise trust ratio for parameters with ndim > 1.

    Per parameter p with gradient g, learning rate lr:
        u = g + weight_decay * p, then u *= trust_coefficient * ||p|| / ||u||   (ndim > 1 only;
            the ratio is 1 when either norm is 0)
        buf = momentum * buf + u;  p -= lr * buf

    Args:
        params: parameters or parameter groups.
        lr: learning rate (set per step by the caller's schedule).
        weight_decay: L2 added to the gradient of matrices (MAE's linear probe uses 0).
        momentum: heavy-ball momentum (no dampening, no Nesterov).
        trust_coefficient: eta in the paper; scales every matrix's relative step.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 0.0,
                 weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001) -> None:
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or trust_coefficient <= 0:
            raise ValueError(f"bad LARS settings: lr={lr}, weight_decay={weight_decay}, "
                             f"momentum={momentum}, trust_coefficient={trust_coefficient}")
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum,
                    "trust_coefficient": trust_coefficient}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    p_norm = torch.linalg.vector_norm(p)
                    u_norm = torch.linalg.vector_norm(update)
                    ratio = torch.where((p_norm > 0) & (u_norm > 0),
                                        group["trust_coefficient"] * p_norm / u_norm,
                                        torch.ones_like(p_norm))
                    update = update * ratio
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(update)
                p.add_(buf, alpha=-group["lr"])
        return loss
