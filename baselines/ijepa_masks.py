"""I-JEPA's multi-block masks: the official collator (facebookresearch/ijepa, commit 52c1ae9,
src/masks/multiblock.py, ``MaskCollator``) as pure functions on a CPU generator.

Per batch, one target block size (scale in ``target_scale``, aspect in [0.75, 1.5]) and one
context block size (scale [0.85, 1], aspect 1) are drawn, each from ONE uniform number that sets
both scale and aspect (the official ``_sample_block_size``); then per image ``num_targets`` target
blocks at random corners and one context block with every target block removed. A block with
``min_keep`` patches or fewer is redrawn; after 20 failures the context stops avoiding the last
target block, after 20 more the last two, and so on (the official ``constrain_mask(mask,
tries)``), so the context may then overlap targets. Every image's context and target index lists
are finally cut to the batch's shortest (the official ``cm[:min_keep_enc]``).

Official quirks kept: the corner is ``randint(0, grid - size)`` (exclusive bound), so no block
touches the last row or column, and a context block of 0.85 or more of the grid is (grid - 1)^2
at the top-left corner; the draws consume the generator exactly as the official code does, so a
hand-written replay of it on the same generator gives the same masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mae_bench.errors import ConfigError

CONTEXT_SCALE = (0.85, 1.0)  # enc_mask_scale of every official config
TARGET_ASPECT = (0.75, 1.5)  # aspect_ratio (height / width) of the target blocks
MIN_KEEP = 10  # min_keep of every official config (blocks keep more patches than this)
TIMEOUT = 20  # failed draws before the context stops avoiding one more target block

Size = tuple[int, int]  # (height, width) in patches


@dataclass(frozen=True)
class MultiBlock:
    """The geometry of I-JEPA's masks on a ``grid`` (rows, cols) of patches."""

    grid: Size
    num_targets: int = 4
    target_scale: tuple[float, float] = (0.15, 0.2)
    context_scale: tuple[float, float] = CONTEXT_SCALE
    aspect: tuple[float, float] = TARGET_ASPECT
    min_keep: int = MIN_KEEP


def size_at(r: float, grid: Size, scale: tuple[float, float], aspect: tuple[float, float]
            ) -> Size:
    """The block size for the uniform draw ``r``: official ``_sample_block_size`` after its
    ``torch.rand``: area int(L x scale), then h, w rounded from it and the aspect, kept below
    the grid's sides."""
    area = int(grid[0] * grid[1] * (scale[0] + r * (scale[1] - scale[0])))
    ar = aspect[0] + r * (aspect[1] - aspect[0])
    h, w = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
    return min(h, grid[0] - 1), min(w, grid[1] - 1)


def reachable_sizes(grid: Size, scale: tuple[float, float], aspect: tuple[float, float]
                    ) -> set[Size]:
    """Every size ``size_at`` gives for r in [0, 1): it is constant between the draws where the
    area crosses an integer or h, w cross a rounding edge, so probing those draws, their
    neighbours and the midpoints between them finds every size."""
    cells, span, spread = grid[0] * grid[1], scale[1] - scale[0], aspect[1] - aspect[0]
    cuts = {0.0}
    for m in range(int(cells * scale[0]), int(cells * scale[1]) + 2):
        if span > 0:
            cuts.add((m / cells - scale[0]) / span)
        for k in range(max(grid) + 1):
            edge = (k + 0.5) ** 2
            for ar in ((edge / m, m / edge) if m and spread > 0 else ()):
                cuts.add((ar - aspect[0]) / spread)
    ordered = sorted(c for c in cuts if 0.0 <= c < 1.0) + [1.0]
    probes = {p + d for p in ordered for d in (-1e-9, 0.0, 1e-9)}
    probes |= {(a + b) / 2 for a, b in zip(ordered, ordered[1:], strict=False)}
    return {size_at(p, grid, scale, aspect) for p in probes if 0.0 <= p < 1.0}


def default_min_keep(grid: Size, target_scale: tuple[float, float]) -> int:
    """The official min_keep 10, lowered where a target block can have 10 patches or fewer:
    targets are never relaxed, so the official sampler would loop forever on such a block."""
    smallest = min(h * w for h, w in reachable_sizes(grid, target_scale, TARGET_ASPECT))
    return max(0, min(MIN_KEEP, smallest - 1))


def check_multiblock(spec: MultiBlock) -> None:
    """ConfigError (one line) where the official sampler cannot work on this grid: a block of 0
    patches, a block that can never keep more than min_keep patches (an endless loop), or
    targets whose smallest blocks together cover the whole context block."""
    (gh, gw), n = spec.grid, spec.num_targets
    where = f"a {gh}x{gw} patch grid"
    if min(gh, gw) < 2:
        raise ConfigError(f"I-JEPA's blocks must be narrower than the image: {where} is too "
                          "small; use larger images or a smaller patch size")
    targets = reachable_sizes(spec.grid, spec.target_scale, spec.aspect)
    context = reachable_sizes(spec.grid, spec.context_scale, (1.0, 1.0))
    small_t = min(h * w for h, w in targets)
    if small_t <= spec.min_keep:
        lo = spec.target_scale[0]
        raise ConfigError(f"mae.target_scale_min={lo} gives target blocks of {small_t} patches "
                          f"on {where} (min_keep {spec.min_keep}); raise it, e.g. to "
                          f"{min(0.99, (spec.min_keep + 2) / (gh * gw)):.3g}, or use a larger "
                          "grid")
    small_c, large_c = (f(h * w for h, w in context) for f in (min, max))
    if small_c <= spec.min_keep:
        raise ConfigError(f"the context block keeps {small_c} patches on {where}, not more "
                          f"than min_keep {spec.min_keep}; use a larger grid")
    if n * small_t >= large_c:
        raise ConfigError(f"mae.num_targets={n} target blocks of at least {small_t} patches "
                          f"(mae.target_scale_min={spec.target_scale[0]}) cover the whole "
                          f"context block ({large_c} patches) of {where}, leaving no context; "
                          "lower mae.num_targets or the target scales, or use a larger grid")


def _block(gen: torch.Generator, grid: Size, size: Size) -> set[int]:
    """Patches (row-major indices) of one block of ``size`` at a random corner: official
    ``torch.randint(0, grid - size, (1,))`` for the top, then the left."""
    h, w = size
    top = int(torch.randint(0, grid[0] - h, (1,), generator=gen))
    left = int(torch.randint(0, grid[1] - w, (1,), generator=gen))
    return {r * grid[1] + c for r in range(top, top + h) for c in range(left, left + w)}


def place_block(gen: torch.Generator, grid: Size, size: Size, min_keep: int,
                avoid: list[set[int]] | None = None) -> list[int]:
    """One block's sorted patch indices, minus the ``avoid`` blocks (the context: the image's
    target blocks), redrawn until it keeps more than ``min_keep``; after every ``TIMEOUT``
    failures one more of the last ``avoid`` blocks is let in (official ``_sample_block_mask``)."""
    avoid = avoid or []
    tries = failures = 0
    while True:
        cells = _block(gen, grid, size)
        for other in avoid[:max(len(avoid) - tries, 0)]:
            cells -= other
        if len(cells) > min_keep:
            return sorted(cells)
        failures += 1
        if failures == TIMEOUT:
            tries, failures = tries + 1, 0


def block_sizes(gen: torch.Generator, spec: MultiBlock) -> tuple[Size, Size]:
    """The batch's (target, context) block sizes: two draws of ``gen``, in the official order."""
    target = size_at(float(torch.rand(1, generator=gen)), spec.grid, spec.target_scale,
                     spec.aspect)
    context = size_at(float(torch.rand(1, generator=gen)), spec.grid, spec.context_scale,
                      (1.0, 1.0))
    return target, context


def place_blocks(gen: torch.Generator, n: int, spec: MultiBlock, sizes: tuple[Size, Size]
                 ) -> tuple[Tensor, Tensor]:
    """Per image, ``num_targets`` target blocks then the context block, every list cut to the
    batch's shortest (official ``MaskCollator.__call__`` after its sizes).

    Returns:
        context [n, Kc] and targets [num_targets, n, Kt], int64 row-major patch indices, each
        row ascending.
    """
    target_size, context_size = sizes
    contexts, targets = [], []
    for _ in range(n):
        blocks = [place_block(gen, spec.grid, target_size, spec.min_keep)
                  for _ in range(spec.num_targets)]
        targets.append(blocks)
        contexts.append(place_block(gen, spec.grid, context_size, spec.min_keep,
                                    avoid=[set(b) for b in blocks]))
    kc = min(len(c) for c in contexts)
    kt = min(len(b) for blocks in targets for b in blocks)
    context = torch.tensor([c[:kc] for c in contexts], dtype=torch.int64)  # [n, Kc]
    target = torch.tensor([[b[:kt] for b in blocks] for blocks in targets],
                          dtype=torch.int64)  # [n, M, Kt]
    return context, target.transpose(0, 1).contiguous()  # [n, Kc], [M, n, Kt]


def multiblock_masks(gen: torch.Generator, n: int, spec: MultiBlock) -> tuple[Tensor, Tensor]:
    """One batch of I-JEPA masks from the CPU generator ``gen``: context [n, Kc] and targets
    [num_targets, n, Kt] (``place_blocks``)."""
    return place_blocks(gen, n, spec, block_sizes(gen, spec))
