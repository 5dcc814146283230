"""A feature queue (memory bank): the last K L2-normalised keys, first in, first out.

MoCo v2+ keeps one per view as its negatives (He et al. 2020, Sec. 3.2; solo-learn's
``mocov2plus.py`` ``queue``); NNCLR keeps one as its support set, searched for each
projection's nearest neighbour (Dwibedi et al. 2021, Sec. 3.1; solo-learn's ``nnclr.py``).

What it does as the reference code does:
- it starts full of random unit vectors (MoCo's ``randn`` then ``normalize``; solo-learn and
  lightly's ``MemoryBankModule`` the same), so a loss can read all K rows from step 0;
- a batch is pushed *after* the loss that reads the queue (the loss reads a ``snapshot``);
- under torchrun the keys of every process are gathered first, in rank order, so every process
  holds the same queue and it fills at the global batch's rate (MoCo's
  ``concat_all_gather``).

Where it differs: the reference code asserts that K is a multiple of the global batch (lightly
silently drops the keys that do not fit before the end); here the write wraps around, so the
queue always holds exactly the last K keys, whatever the batch. Where K is a multiple, the
contents are the reference's, row for row (``tests/test_mocov2.py``).

The queue and its pointer are buffers: they are in the state dict, so a checkpoint carries them
and a resumed run reads the queue it stopped with. Its random start comes from its own seeded
generator, not the global one: every process of a torchrun job starts from the same queue
without a broadcast, and building a method draws nothing from the global generator for it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mae_bench.training.distributed import all_gather_no_grad


class FeatureQueue(nn.Module):
    """FIFO of the last ``size`` keys, each of ``dim`` values, L2-normalised.

    Args:
        size: K, the number of keys kept (>= 1).
        dim: the width of a key.
        seed: seeds the random unit vectors the queue starts with.
    """

    features: Tensor  # [K, D]
    ptr: Tensor  # [] int64: the row the next key is written to (the oldest key)

    def __init__(self, size: int, dim: int, seed: int = 0):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"a feature queue needs size >= 1 and dim >= 1, got size={size}, "
                             f"dim={dim}")
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("features", F.normalize(torch.randn(size, dim, generator=g), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.features.shape[0]

    def snapshot(self) -> Tensor:
        """[K, D]: a copy of the queue, for a loss whose backward must not see the push that
        follows it (autograd keeps the tensor a matmul read)."""
        return self.features.clone()

    @torch.no_grad()
    def push(self, keys: Tensor) -> None:
        """Enqueue this process's [N, D] keys (of every process under torchrun, [WN, D] in
        rank order), replacing the oldest ones. More keys than K: the last K are kept."""
        keys = F.normalize(all_gather_no_grad(keys.detach()).float(), dim=1)  # [WN, D]
        keys = keys[-self.size:]  # [M, D], M <= K
        rows = (self.ptr + torch.arange(keys.shape[0], device=keys.device)) % self.size  # [M]
        self.features[rows] = keys.to(self.features.dtype)
        self.ptr.copy_((self.ptr + keys.shape[0]) % self.size)

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.features.shape[1]}"


def nearest_neighbours(z: Tensor, support: Tensor) -> Tensor:
    """NNCLR's NN(z, Q): for each row of ``z``, the row of ``support`` of highest cosine
    similarity (solo-learn's ``find_nn``, lightly's ``NNMemoryBankModule``), searched in fp32
    also under autocast (bf16 similarities would tie neighbours fp32 tells apart). No
    gradient: the support set is a buffer.

    Args:
        z: [N, D] projections.
        support: [K, D] the support set (unit rows).

    Returns:
        [N, D], rows of ``support``.
    """
    with torch.no_grad(), torch.autocast(z.device.type, enabled=False):
        sim = F.normalize(z.detach().float(), dim=1) @ support.float().T  # [N, K]
        return support[sim.argmax(dim=1)]  # [N, D]


def skip_in_ddp_broadcast(method: nn.Module) -> None:
    """Keep DistributedDataParallel from broadcasting ``method``'s queues from rank 0 before
    every forward (its default for buffers): each process already holds the same queue (same
    seeded start, same gathered keys), and a queue of 65,536 x 256 floats is 64 MiB a step.
    Uses the attribute DDP reads for this (``_ddp_params_and_buffers_to_ignore``)."""
    names = [name for name, module in method.named_modules()
             if isinstance(module, FeatureQueue)]
    method._ddp_params_and_buffers_to_ignore = [
        f"{name}.{buffer}" for name in names for buffer in ("features", "ptr")]
