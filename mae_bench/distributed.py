"""Collectives the methods need under torchrun; each is the identity in a single process.

- ``all_gather_with_grad``: contrastive losses see the negatives of every process, and the
  gradient flows back to the process that made each one (``torch.distributed.nn`` collectives
  are autograd-aware; plain ``all_gather`` would cut the graph).
- ``all_gather_no_grad``: MoCo v3 keys (from the momentum encoder: no gradient anyway).
- ``all_reduce_mean``: DINO's center, metrics.

``join_process_group`` / ``leave_process_group`` start and end a torchrun job's process group;
``sync_batchnorm`` makes the heads' BatchNorm layers see the global batch.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

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
    return device


def leave_process_group() -> None:
    """Tear the process group down at exit (no-op when none was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class CPUSyncBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics cover the whole global batch, on CPUs (gloo).

    ``nn.SyncBatchNorm`` (used on GPUs) refuses CPU tensors. This computes the batch mean and
    variance from the per-feature sums of x and x^2 of every process, all-reduced with
    ``torch.distributed.nn`` (autograd-aware, so gradients flow to every process's inputs), and
    updates the running statistics as BatchNorm does (unbiased variance). Outside a process
    group, or in eval mode, it is a plain BatchNorm1d.
    """

    def forward(self, x: Tensor) -> Tensor:  # x: [N, C]
        if not self.training or not is_distributed():
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        count = torch.full((1,), float(x.shape[0]), dtype=x.dtype, device=x.device)
        with _quiet_deprecation():
            stats = all_reduce(torch.cat([x.sum(0), (x * x).sum(0), count]))  # [2C+1], summed
        total = stats[-1]
        mean = stats[:c] / total  # [C]
        var = (stats[c:2 * c] / total - mean * mean).clamp_min(0)  # [C], biased
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * var.detach() * total / (total - 1))
                self.num_batches_tracked.add_(1)
        y = (x - mean) / torch.sqrt(var + self.eps)  # [N, C]
        if self.affine:
            y = y * self.weight + self.bias
        return y


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Under torchrun, make every BatchNorm1d normalise over the global batch (as one process
    on the combined batch would): ``nn.SyncBatchNorm`` on GPUs, :class:`CPUSyncBatchNorm` on
    CPUs. Parameters and buffers keep their names, so checkpoints are unchanged."""
    if not is_distributed():
        return module
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm1d:
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
