"""Collectives the methods need under torchrun; each is the identity in a single process.

- ``all_gather_with_grad``: contrastive losses see the negatives of every process, and the
  gradient flows back to the process that made each one (``torch.distributed.nn`` collectives
  are autograd-aware; plain ``all_gather`` would cut the graph).
- ``all_gather_no_grad``: MoCo v3 keys (from the momentum encoder: no gradient anyway).
- ``all_reduce_mean``: DINO's center, metrics.

``join_process_group`` / ``leave_process_group`` start and end a torchrun job's process group;
``sync_batchnorm`` makes the heads' BatchNorm layers see the global batch.

Work only rank 0 does (k-NN and the fast probe on gathered features, writing results) goes
through ``gather_to_main`` / ``broadcast_from_main`` / ``wait_for_main``. They use a separate gloo
group with a long timeout: the other ranks may wait for rank 0 far longer than NCCL's watchdog
allows a collective to be pending, and Python objects (CPU features, decisions) travel best over
gloo anyway.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


@contextlib.contextmanager
def _quiet_deprecation() -> Iterator[None]:
    """torch 2.14 marks ``torch.distributed.nn.functional`` deprecated in favour of a private
    module; it is still the public autograd-aware API, so its per-step warning is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning,
                                message=r"torch\.distributed\.nn\.functional")
        yield


_LOCAL: list[bool] = []  # non-empty inside ``local_only``


def is_distributed() -> bool:
    """A process group of more than one process is active (and not set aside by
    ``local_only``)."""
    return (not _LOCAL and dist.is_available() and dist.is_initialized()
            and dist.get_world_size() > 1)


@contextlib.contextmanager
def local_only() -> Iterator[None]:
    """Inside, this process behaves as if it were alone: no collective (gathered negatives,
    DINO's center, synchronised BatchNorm). For work one rank does by itself, such as rank 0
    timing a few training steps to size a run, while the others wait."""
    _LOCAL.append(True)
    try:
        yield
    finally:
        _LOCAL.pop()


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

    with _quiet_deprecation():
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


# --- joining a torchrun job --------------------------------------------------------------------


def join_process_group(device: torch.device) -> torch.device:
    """Join the process group torchrun describes in the environment (WORLD_SIZE, RANK,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT), once per process: NCCL on GPUs, gloo on CPUs.

    Returns the device this process trains on: ``cuda:LOCAL_RANK`` on GPUs (one GPU per
    process), else ``device`` unchanged. Outside torchrun (WORLD_SIZE unset or 1) it does
    nothing.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    _main_group()  # created now, at the same point on every rank, as new_group requires
    return device


# Rank 0 may spend hours on a k-NN or a probe while the others wait.
MAIN_WAIT_TIMEOUT = timedelta(hours=12)
_MAIN_GROUP: list[Any] = []  # the gloo group of every rank (created once, lazily)


def _main_group() -> Any:
    if not is_distributed():
        return None
    if not _MAIN_GROUP:
        _MAIN_GROUP.append(dist.new_group(backend="gloo", timeout=MAIN_WAIT_TIMEOUT))
    return _MAIN_GROUP[0]


def is_main_process() -> bool:
    """Rank 0, or no process group: the process that writes checkpoints, logs and results."""
    return rank_and_world()[0] == 0


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` (picklable, CPU tensors) in rank order on rank 0; None on the
    others. In one process: ``[obj]``."""
    if not is_distributed():
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if is_main_process() else None
    dist.gather_object(obj, out, dst=0, group=_main_group())
    return out


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (what the others pass is ignored), so that decisions read
    from files only rank 0 writes are taken once, the same everywhere."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_main_group())
    return box[0]


def wait_for_main() -> None:
    """A barrier of every rank that tolerates rank 0 working alone for hours."""
    if is_distributed():
        dist.barrier(group=_main_group())


def leave_process_group() -> None:
    """Tear the process group down at exit (no-op when none was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _MAIN_GROUP.clear()


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm (1-D or 2-D) whose training statistics cover the whole global batch, on CPUs
    (gloo).

    ``nn.SyncBatchNorm`` (used on GPUs) refuses CPU tensors. This computes the batch mean and
    variance from the per-channel sums of x and x^2 of every process (over the batch and, for
    feature maps, every position), all-reduced with ``torch.distributed.nn`` (autograd-aware, so
    gradients flow to every process's inputs), and updates the running statistics as BatchNorm
    does (unbiased variance). Outside a process group, or in eval mode, it is a plain BatchNorm.
    """

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() not in (2, 3, 4):
            raise ValueError(f"expected a 2-D, 3-D or 4-D input, got {x.dim()}-D")

    def forward(self, x: Tensor) -> Tensor:  # x: [N, C] or [N, C, H, W]
        if not self.training or not is_distributed():
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        dims = [0, *range(2, x.dim())]  # every dimension but the channels
        shape = [1, c] + [1] * (x.dim() - 2)  # broadcast [C] over x
        count = torch.full((1,), float(x.numel() // c), dtype=x.dtype, device=x.device)
        with _quiet_deprecation():
            stats = all_reduce(torch.cat([x.sum(dims), (x * x).sum(dims), count]))  # [2C+1]
        total = stats[-1]
        mean = stats[:c] / total  # [C]
        var = (stats[c:2 * c] / total - mean * mean).clamp_min(0)  # [C], biased
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * var.detach() * total / (total - 1))
                self.num_batches_tracked.add_(1)
        y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Under torchrun, make every BatchNorm (the heads' 1-D ones, a ResNet's 2-D ones) normalise
    over the global batch (as one process on the combined batch would): ``nn.SyncBatchNorm``
    on GPUs, :class:`CPUSyncBatchNorm` on CPUs. Parameters and buffers keep their names, so
    checkpoints are unchanged."""
    if not is_distributed():
        return module
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if type(child) in (nn.BatchNorm1d, nn.BatchNorm2d):
            sync = CPUSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats, device=device)
            # the same Parameter and buffer objects (requires_grad, EMA pairing kept)
            sync.weight, sync.bias = child.weight, child.bias
            sync.running_mean, sync.running_var = child.running_mean, child.running_var
            sync.num_batches_tracked = child.num_batches_tracked
            sync.train(child.training)
            setattr(module, name, sync)
        else:
            sync_batchnorm(child, device)
    return module
