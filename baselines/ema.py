"""EMA teachers: the momentum schedule, which of its values follows which optimizer step, and
the in-place update (MoCo v3, BYOL, DINO)."""

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


def momentum_after_step(step: int, total_steps: int, base: float, *,
                        before_forward: bool) -> float:
    """The momentum of the EMA update that follows optimizer step ``step`` (counted from 1, as
    ``Method.on_step_end`` counts), indexed as the method's reference code indexes its schedule.

    BYOL (deepmind's ``target_ema(global_step)``) and DINO (``momentum_schedule[it]``) update the
    teacher right after optimizer step i, counted from 0, with m(i / K): after step k (from 1)
    that is m((k - 1) / K), so the first update uses exactly ``base`` and the last one still
    moves the teacher. MoCo v3 (``before_forward``) updates its momentum encoder at the start of
    iteration i, before that iteration's forward, with m(i / K): after i optimizer steps, so here
    m(k / K) (its update at i = 0, teacher equal to student, changes nothing, and so does ours
    after the last step, where m = 1).

    Args:
        step: optimizer steps done, the one just taken included (>= 1).
        total_steps: K, the run's optimizer steps.
        base: the momentum at the schedule's start.
        before_forward: the reference updates before the forward (MoCo v3), not after the
            optimizer step (BYOL, DINO).
    """
    index = step if before_forward else step - 1
    return cosine_momentum(index, total_steps, base)


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
