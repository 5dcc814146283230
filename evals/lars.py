"""The optimizer of MAE's linear probe: the toolkit's one LARS (``mae_bench.training.optim``) with
the options of MAE's ``util/lars.py``.

For a weight matrix W with gradient g (weight decay added first), the step is SGD with momentum
on ``(g + wd W) * trust_coefficient * ||W|| / ||g + wd W||``: every matrix moves by the same
*relative* amount whatever the scale of its gradient, which keeps very large batches (MAE probes
with 16384) stable. Vectors (biases, norm parameters) skip both the trust ratio and the weight
decay and get plain SGD with momentum; no eps, no lr clipping (solo-learn's pretraining LARS
differs in all three: ``||g|| + wd ||W|| + eps``, clipping, eta 0.02).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from mae_bench.training.optim import LARS as CoreLARS

__all__ = ["LARS", "MAE_PROBE_OPTIONS"]

# MAE's util/lars.py as options of the core class: the ratio on ndim > 1 only, the update's norm
MAE_PROBE_OPTIONS: dict[str, Any] = {"clip_lr": False, "exclude_bias_n_norm": True,
                                     "trust_norm": "update", "eps": 0.0}


def LARS(params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 0.0,
         weight_decay: float = 0.0, momentum: float = 0.9,
         trust_coefficient: float = 0.001) -> CoreLARS:
    """MAE's LARS, keeping its constructor's keywords (``trust_coefficient``, eta 0.001).

    Args:
        params: parameters or parameter groups.
        lr: learning rate (set per step by the caller's schedule).
        weight_decay: L2 added to the gradient of matrices (MAE's linear probe uses 0).
        momentum: heavy-ball momentum (no dampening, no Nesterov).
        trust_coefficient: eta in the paper; scales every matrix's relative step.

    Raises:
        ValueError: a negative lr or weight decay, momentum outside [0, 1), or eta <= 0.
    """
    return CoreLARS(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                    eta=trust_coefficient, **MAE_PROBE_OPTIONS)
