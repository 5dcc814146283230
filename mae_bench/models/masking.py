"""Masking for MAE: pure functions.

A mask strategy only produces noise [N, L]: the patches with the smallest noise are kept, so
every strategy ("random", "block", "grid"; MAE paper Table 1f) shares one exact keep count,
int(L * (1 - mask_ratio)), as in the official code, and a given noise replays a masking exactly.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch

from mae_bench.errors import ConfigError


def len_keep(num_patches: int, mask_ratio: float) -> int:
    """Number of visible patches, int(L * (1 - mask_ratio)) exactly as the official code."""
    return int(num_patches * (1 - mask_ratio))


def validate_mask_ratio(num_patches: int, mask_ratio: float) -> None:
    """Raise ConfigError unless at least one patch stays visible and at least one is masked.

    The one check of a mask ratio against a patch grid: a training method calls it once, when
    it is built; ``MaskedAutoencoder.forward`` for a ratio given to it directly."""
    keep = len_keep(num_patches, mask_ratio) if math.isfinite(mask_ratio) else -1
    if not 1 <= keep < num_patches:
        # Rounded down so that the printed bound itself is valid.
        top = math.floor((num_patches - 1) / num_patches * 1e4) / 1e4
        raise ConfigError(
            f"mask_ratio={mask_ratio} leaves {max(keep, 0)} of {num_patches} patches visible; "
            f"with {num_patches} patches use 0 < mask_ratio <= {top} so that at least one "
            "patch is visible and at least one is masked"
        )


def cpu_generator(generator: torch.Generator | None) -> torch.Generator | None:
    """A CPU generator for mask draws made on the CPU (python loops, permutations): the step's
    own where it is a CPU generator (so its stream is the one the tests replay), else a CPU
    generator seeded from one draw of it (a training step on a GPU)."""
    if generator is None or generator.device.type == "cpu":
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    return torch.Generator().manual_seed(seed)


NoiseFn = Callable[[int, int, float, "torch.Generator | None", torch.device], torch.Tensor]


def _random_noise(
    n: int, grid: int, ratio: float, gen: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    return torch.rand(n, grid * grid, generator=gen, device=device)  # [N, L]


# BEiT's block-wise masking (Bao et al. 2021, MaskingGenerator): rectangles of 4+ patches with
# aspect ratio in [0.3, 1/0.3], added until the masked budget is used or no block fits.
_BLOCK_MIN_PATCHES, _BLOCK_MIN_ASPECT, _BLOCK_ATTEMPTS = 4, 0.3, 10


def _place_block(rng: random.Random, covered: list[list[bool]], budget: int) -> int:
    grid = len(covered)
    for _ in range(_BLOCK_ATTEMPTS):
        area = rng.uniform(min(_BLOCK_MIN_PATCHES, budget), budget)
        aspect = math.exp(rng.uniform(math.log(_BLOCK_MIN_ASPECT), -math.log(_BLOCK_MIN_ASPECT)))
        h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if not (0 < h < grid and 0 < w < grid):
            continue
        top, left = rng.randint(0, grid - h), rng.randint(0, grid - w)
        cells = [(r, c) for r in range(top, top + h) for c in range(left, left + w)]
        new = [(r, c) for r, c in cells if not covered[r][c]]
        if 0 < len(new) <= budget:
            for r, c in new:
                covered[r][c] = True
            return len(new)
    return 0


def _block_cover(rng: random.Random, grid: int, target: int) -> list[float]:
    covered = [[False] * grid for _ in range(grid)]
    count = 0
    while count < target:
        added = _place_block(rng, covered, target - count)
        if added == 0:
            break
        count += added
    return [float(cell) for row in covered for cell in row]  # [L], row-major


def _block_noise(
    n: int, grid: int, ratio: float, gen: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    num_masked = grid * grid - len_keep(grid * grid, ratio)
    seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=device))
    rng = random.Random(seed)  # python RNG: one block at a time is scalar work
    covered = torch.tensor([_block_cover(rng, grid, num_masked) for _ in range(n)])  # [N, L]
    # Covered patches sort after all uncovered ones; the exact keep count then trims or fills.
    return torch.rand(n, grid * grid, generator=gen, device=device) + covered.to(device)  # [N, L]


def grid_step(grid_size: int, mask_ratio: float) -> int:
    """Cell side s of grid masking (keep 1 of every s x s patches); ConfigError if the ratio
    does not keep exactly one patch per cell on this grid."""

    def fits(s: int, ratio: float) -> bool:
        return (
            s >= 2
            and grid_size % s == 0
            and (len_keep(grid_size**2, ratio) == (grid_size // s) ** 2)
        )

    step = round(1 / math.sqrt(1 - mask_ratio)) if 0 <= mask_ratio < 1 else 0
    if fits(step, mask_ratio):
        return step
    valid = [
        f"{1 - 1 / s**2!r} ({s}x{s})" for s in range(2, grid_size + 1) if fits(s, 1 - 1 / s**2)
    ]
    raise ConfigError(
        f"mask_strategy 'grid' keeps one patch of every s x s cell, so on a {grid_size}x"
        f"{grid_size} patch grid mask_ratio must be one of: {', '.join(valid) or 'none'}; "
        f"got {mask_ratio}"
    )


def _grid_noise(
    n: int, grid: int, ratio: float, gen: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    step = grid_step(grid, ratio)
    offset = torch.randint(0, step, (n, 2), generator=gen, device=device)  # [N, 2] (row, col)
    phase = torch.arange(grid, device=device) % step  # [g]
    keep_row = phase[None, :] == offset[:, :1]  # [N, g]
    keep_col = phase[None, :] == offset[:, 1:]  # [N, g]
    keep = (keep_row[:, :, None] & keep_col[:, None, :]).flatten(1)  # [N, L]
    return torch.rand(n, grid * grid, generator=gen, device=device) + (~keep).float()  # [N, L]


MASK_STRATEGIES: dict[str, NoiseFn] = {
    "random": _random_noise,
    "block": _block_noise,
    "grid": _grid_noise,
}


def get_mask_strategy(name: str) -> NoiseFn:
    """Noise function of a mask strategy; unknown names raise ConfigError listing valid ones."""
    if name not in MASK_STRATEGIES:
        raise ConfigError(f"unknown mask_strategy {name!r}; valid: {', '.join(MASK_STRATEGIES)}")
    return MASK_STRATEGIES[name]


def masking_noise(
    strategy: str,
    batch_size: int,
    grid_size: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Noise [N, L] (L = grid_size**2) whose ascending argsort keeps the patches the strategy
    chose: the first len_keep(L, mask_ratio) are visible, the rest masked.

    Random numbers come from ``generator`` on its device (default: the global RNG on
    ``device``); the result is moved to ``device``. ``mask_ratio`` is not checked here (this
    runs every step): configs check it once, when they are built (``validate_mask_ratio``).
    """
    noise_fn = get_mask_strategy(strategy)
    source = generator.device if generator is not None else torch.device(device or "cpu")
    noise = noise_fn(batch_size, grid_size, mask_ratio, generator, source)  # [N, L]
    return noise if device is None else noise.to(device)  # [N, L]


def masking_indices(
    noise: torch.Tensor, mask_ratio: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Official per-sample shuffle: small noise is kept, large is removed.

    Args:
        noise: [N, L].
        mask_ratio: fraction of patches to remove.

    Returns:
        ids_keep [N, K], mask [N, L] (1 = masked, 0 = kept), ids_restore [N, L].
    """
    n, length = noise.shape
    keep = len_keep(length, mask_ratio)
    ids_shuffle = torch.argsort(noise, dim=1)  # [N, L]
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # [N, L]
    mask = torch.ones(n, length, device=noise.device)  # [N, L]
    mask[:, :keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)  # [N, L]
    return ids_shuffle[:, :keep], mask, ids_restore


def random_masking(
    x: torch.Tensor, mask_ratio: float, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the tokens with the smallest noise.

    Args:
        x: tokens [N, L, D].
        mask_ratio: fraction of tokens to remove.
        noise: [N, L].

    Returns:
        x_masked [N, K, D], mask [N, L] (1 = masked), ids_restore [N, L], ids_keep [N, K].
    """
    ids_keep, mask, ids_restore = masking_indices(noise, mask_ratio)
    index = ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])  # [N, K, D]
    return torch.gather(x, dim=1, index=index), mask, ids_restore, ids_keep
