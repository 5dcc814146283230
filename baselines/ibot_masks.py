"""iBOT's blockwise masks (Zhou et al. 2022, arXiv 2111.07832, Sec. 4.1 "random MIM"), as the
official loader draws them (bytedance/ibot, loader.py ``ImageFolderMask``, after BEiT's
masking_generator.py).

Each global crop of each image gets its own mask on the patch grid:

- its prediction ratio (``prediction_ratio``) is 0 with probability 1/2, else uniform in
  [r - v, r + v]: the paper's recipe, the official README's ``--pred_ratio 0 0.3
  --pred_ratio_var 0 0.2`` (one of the two ratios is picked per crop by ``random.choice``);
- blocks are then added until ratio x L patches are masked (``block_mask``): each block has an
  area uniform between (min(gh, gw) // 3)^2 and the patches still to mask, an aspect ratio
  log-uniform in [0.3, 1 / 0.3], lies strictly inside the grid (h < gh, w < gw), and is kept
  only if it masks at least one new patch and no more than the budget; ten tries without such a
  block end the mask early. So a mask never exceeds ratio x L, and on a 4 x 4 grid blocks are
  1 to 3 patches on a side.

The draws follow the official order (per image: crop 1's ratio, its blocks, crop 2's ratio,
...) on a python ``random.Random`` seeded from one draw of the step's torch generator, so a
resumed run replays its masks and a test can replay the official code on the same stream.
The official loader also masks the local crops, which its loss never reads; we skip them, so
with local crops on the stream differs from the official one (the masks' law does not).
"""

from __future__ import annotations

import math
import random

import torch
from torch import Tensor

LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))  # main_ibot.py: pred_aspect_ratio=(0.3, 1/0.3)
BLOCK_TRIES = 10


def prediction_ratio(rng: random.Random, mask_ratio: float, ratio_var: float) -> float:
    """One crop's prediction ratio: ``get_pred_ratio`` with pred_ratio [0, r] and
    pred_ratio_var [0, v] (the 0 entry draws nothing; then one of the two is chosen)."""
    drawn = rng.uniform(mask_ratio - ratio_var, mask_ratio + ratio_var) if ratio_var > 0 \
        else mask_ratio
    return rng.choice([0.0, drawn])


def block_mask(rng: random.Random, gh: int, gw: int, ratio: float) -> Tensor:
    """[gh, gw] bool, True = masked: blocks until ``ratio`` x gh x gw patches (module docstring)."""
    budget_total = ratio * gh * gw
    masked = [[False] * gw for _ in range(gh)]
    min_area = (min(gh, gw) // 3) ** 2
    count = 0
    while count < budget_total:
        budget = budget_total - count
        added = 0
        for _ in range(BLOCK_TRIES):
            area = rng.uniform(min_area, budget)
            aspect = math.exp(rng.uniform(*LOG_ASPECT))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if h < gh and w < gw:
                top, left = rng.randint(0, gh - h), rng.randint(0, gw - w)
                new = [(i, j) for i in range(top, top + h) for j in range(left, left + w)
                       if not masked[i][j]]
                if 0 < len(new) <= budget:
                    for i, j in new:
                        masked[i][j] = True
                    added = len(new)
            if added:
                break
        if not added:
            break
        count += added
    return torch.tensor(masked, dtype=torch.bool)  # [gh, gw]


def ibot_masks(rng: random.Random, n: int, crops: int, grid: int, mask_ratio: float,
               ratio_var: float) -> Tensor:
    """[crops, N, grid * grid] bool (True = masked), drawn image by image, crop by crop."""
    out = torch.zeros(crops, n, grid * grid, dtype=torch.bool)
    for i in range(n):
        for c in range(crops):
            ratio = prediction_ratio(rng, mask_ratio, ratio_var)
            out[c, i] = block_mask(rng, grid, grid, ratio).flatten()
    return out  # [crops, N, L]


def draw_masks(generator: torch.Generator, n: int, crops: int, grid: int, mask_ratio: float,
               ratio_var: float) -> Tensor:
    """``ibot_masks`` on a python RNG seeded from one draw of ``generator`` (on the CPU)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    return ibot_masks(random.Random(seed), n, crops, grid, mask_ratio, ratio_var)  # [crops, N, L]
