"""The pieces both trained protocols (MAE's linear probe and fine-tuning) share under
torch.distributed: this process's rows of a global batch, and top-k accuracy over a test set
that the processes evaluate in turns and sum with one all-reduce.

One home, so that the probe and fine-tuning split batches and count hits the same way: every
process draws the same global batch (the random generators advance as in one process) and runs
the model on its own equal share; the test set is read in whole batches, every W-th one per
process, so the logits are the ones a single process computes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from mae_bench.data import ArrayDataset
from mae_bench.data.augment import BatchViews, ViewSpec, eval_resize
from mae_bench.errors import ConfigError
from mae_bench.training.distributed import rank_and_world


def rank_rows(batch: int, what: str | None = None) -> slice:
    """This process's rows [rank * B/W, (rank + 1) * B/W) of a global batch of ``batch``.

    Args:
        batch: the global batch of one step.
        what: how the error names the batch (default: ``batch_size {batch}``).

    Raises:
        ConfigError: the processes cannot share ``batch`` equally.
    """
    rank, world = rank_and_world()
    if batch % world:
        raise ConfigError(f"{what or f'batch_size {batch}'} cannot be split equally between "
                          f"{world} processes (it is the global batch of a step); use a "
                          f"multiple of {world}")
    per_rank = batch // world
    return slice(rank * per_rank, (rank + 1) * per_rank)


def topk_correct(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> list[int]:
    """How many rows of ``logits`` [N, C] have their label among the top k (k capped at C)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # [N, kmax]
    hit = top == labels[:, None]  # [N, kmax]
    return [int(hit[:, : min(k, kmax)].any(dim=1).sum()) for k in ks]


@torch.no_grad()
def topk_accuracy(logits_of: Callable[[Tensor], Tensor], data: ArrayDataset, *, img_size: int,
                  batch_size: int, device: torch.device) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (percent; top-5 is top-C with fewer classes) of ``logits_of``
    (normalised images [B, C, S, S] -> logits [B, classes]; it applies autocast where it wants
    it) on ``data``, resized to ``img_size``.

    Under torch.distributed every process must call it: each evaluates every W-th batch of
    ``batch_size`` images and the hit counts are summed, so all return the same accuracies.
    """
    rank, world = rank_and_world()
    views = BatchViews(ViewSpec(img_size), data.info.mean, data.info.std)
    hits = torch.zeros(2, dtype=torch.long, device=device)  # [top-1, top-5]
    for start in range(rank * batch_size, len(data), world * batch_size):
        x = eval_resize(data.images[start:start + batch_size].to(device), img_size)  # [B, C, S, S]
        y = data.labels[start:start + batch_size].to(device)  # [B]
        logits = logits_of(views.normalize(x))  # [B, classes]
        hits += torch.tensor(topk_correct(logits.float(), y), device=device)
    if world > 1:
        dist.all_reduce(hits)  # NCCL reduces device tensors
    top1, top5 = hits.tolist()
    return 100.0 * top1 / len(data), 100.0 * top5 / len(data)
