"""EMA teachers: the momentum schedule and the in-place update (MoCo v3, BYOL, DINO)."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def cosine_momentum(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """The teacher momentum at ``step``: ``base`` at step 0 rising to ``final`` at
    ``total_steps`` along a half cosine (BYOL eq. in Sec. 3.2; MoCo v3 and DINO use the same)."""
    progress = min(step / max(total_steps, 1), 1.0)
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target = momentum * target + (1 - momentum) * online, parameter by parameter, in place.

    Parameters the online network does not train (fixed position embeddings, a frozen patch
    projection) are left as they are. Buffers (BatchNorm statistics) are left alone too: the
    teacher keeps its own, as in MoCo and BYOL.
    """
    pairs = list(zip(target.parameters(), online.parameters(), strict=True))
    t_params = [t for t, o in pairs if o.requires_grad]
    o_params = [o for _, o in pairs if o.requires_grad]
    if not t_params:
        return
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, o_params, alpha=1 - momentum)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy for use as an EMA teacher: same weights, no gradient."""
    teacher = copy.deepcopy(module)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
