"""Collectives the methods need under torchrun; each is the identity in a single process.

- ``all_gather_with_grad``: contrastive losses see the negatives of every process, and the
  gradient flows back to the process that made each one (``torch.distributed.nn`` collectives
  are autograd-aware; plain ``all_gather`` would cut the graph).
- ``all_gather_no_grad``: MoCo v3 keys (from the momentum encoder: no gradient anyway).
- ``all_reduce_mean``: DINO's center, metrics.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world size): (0, 1) outside torch.distributed."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_with_grad(x: Tensor) -> Tensor:
    """[N, ...] per process -> [world * N, ...] in rank order, differentiable."""
    if not is_distributed():
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


@torch.no_grad()
def all_gather_no_grad(x: Tensor) -> Tensor:
    """[N, ...] per process -> [world * N, ...] in rank order, detached."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def all_reduce_mean(x: Tensor) -> Tensor:
    """The mean of ``x`` over processes (in place, also returned)."""
    if is_distributed():
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x
