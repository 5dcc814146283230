"""data2vec 2.0's inverse block masking (Baevski et al. 2022, arXiv 2212.07525): pure functions.

The official generator (facebookresearch/fairseq, fairseq/data/data_utils.py,
``compute_block_mask_2d`` with the image recipe's ``inverse_mask=True``,
``require_same_masks=True``, no mask dropout, overlapping blocks) draws blocks of patches to
*keep*: ``int(L * (1 - mask_prob + mask_prob_adjust) / mask_length**2)`` centres uniformly (with
repetition), each grown to a ``mask_length`` x ``mask_length`` square clipped at the grid's
edges; then random kept patches are dropped, or random others added, until every image keeps
exactly ``int(L * (1 - mask_prob))``; the mask is the complement. This replays that function's
torch RNG calls (one ``randint`` for every centre of the batch, then one ``multinomial`` per image
whose count is off) on a given generator, so a fixed seed gives the official masks exactly.

On a 4 x 4 grid the recipe's 0.27 x 16 / 9 rounds to no centre, so every kept patch is a random
one (the official function does the same); from 8 x 8 on, blocks appear.
"""

from __future__ import annotations

import torch
from torch import Tensor

# The image recipe (examples/data2vec/config/v2/base_images_only_task.yaml, modalities.image).
MASK_LENGTH = 3
MASK_PROB_ADJUST = 0.07


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Patches every image keeps: the official ``final_target_len``, int(L * (1 - mask_prob))."""
    return int(num_patches * (1 - mask_ratio))


def inverse_block_mask(n: int, grid: int, mask_ratio: float, generator: torch.Generator,
                       mask_length: int = MASK_LENGTH,
                       mask_prob_adjust: float = MASK_PROB_ADJUST) -> Tensor:
    """[n, grid * grid] float mask on the CPU, 1 = masked (predicted), 0 = kept (encoded);
    every row keeps exactly ``num_kept(grid**2, mask_ratio)`` patches.

    Args:
        n: masks to draw (images x copies).
        grid: patches per side.
        mask_ratio: the official ``mask_prob`` (0.8), the fraction masked.
        generator: CPU generator all draws come from.
        mask_length: side of a kept block (> 1).
        mask_prob_adjust: extra keep probability that makes up for overlapping blocks.
    """
    length = grid * grid
    keep_prob = 1 - mask_ratio  # inverse masking: the blocks mark what is kept
    centres = int(length * ((keep_prob + mask_prob_adjust) / mask_length**2))
    kept = torch.zeros(n, grid, grid)  # [n, g, g]
    idx = torch.randint(0, length, (n, centres), generator=generator)  # [n, c]
    kept.view(n, -1).scatter_(1, idx, 1)
    img, r0, c0 = kept.nonzero(as_tuple=True)  # [Z] each: the distinct centres
    offsets = torch.arange(mask_length) - mask_length // 2  # [m]
    r = (r0[:, None] + offsets[None, :]).clamp(0, grid - 1)  # [Z, m]
    c = (c0[:, None] + offsets[None, :]).clamp(0, grid - 1)  # [Z, m]
    kept[img[:, None, None], r[:, :, None], c[:, None, :]] = 1  # [Z, m, m] squares
    kept = kept.reshape(n, length)  # [n, L]
    target = num_kept(length, mask_ratio)
    counts = kept.sum(dim=1)  # [n]
    for i in range(n):  # the official per-image fix-up, same order of draws
        row, have = kept[i], int(counts[i])
        if have > target:
            row[torch.multinomial(row, have - target, replacement=False,
                                  generator=generator)] = 0
        elif have < target:
            row[torch.multinomial(1 - row, target - have, replacement=False,
                                  generator=generator)] = 1
    return 1 - kept  # [n, L], 1 = masked
