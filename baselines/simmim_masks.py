"""SimMIM's random masking (microsoft/SimMIM, data/data_simmim.py, ``MaskGenerator``): the image
is cut into square mask units of ``mask_patch_size`` pixels; exactly ``ceil(units * ratio)`` of
them, a uniformly random subset, are masked in every image; the unit mask is then repeated onto
the ViT's patch grid (``scale = mask_patch_size / patch_size`` patches per unit side).

Pure functions; masks are drawn on the CPU from the step's generator, so a resumed run replays.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mae_bench.errors import ConfigError


def default_mask_patch_size(img_size: int, patch_size: int) -> int:
    """Two ViT patches per mask-unit side (the official 32 px over 16-px patches) where such
    units tile the image at least 2 x 2; else one patch (an odd patch grid, or a 2 x 2 one,
    where 2-patch units would leave one unit: all masked or none)."""
    unit = 2 * patch_size
    return unit if img_size % unit == 0 and img_size // unit >= 2 else patch_size


def mask_count(units: int, mask_ratio: float) -> int:
    """Mask units masked per image: the official ``int(np.ceil(token_count * mask_ratio))``."""
    return math.ceil(units * mask_ratio)


def check_mask_geometry(img_size: int, patch_size: int, mask_patch_size: int,
                        mask_ratio: float) -> None:
    """ConfigError (one line, naming the value and the fix) where the official MaskGenerator's
    asserts would fail, or where its ratio masks no unit or every unit of an image."""
    if mask_patch_size % patch_size:
        raise ConfigError(f"mae.mask_patch_size {mask_patch_size} is not a multiple of the ViT "
                          f"patch size {patch_size}; pick a multiple of {patch_size} that "
                          f"divides the image size {img_size}")
    if img_size % mask_patch_size:
        raise ConfigError(f"mae.mask_patch_size {mask_patch_size} does not divide the image "
                          f"size {img_size}; pick a multiple of {patch_size} that divides "
                          f"{img_size}")
    units = (img_size // mask_patch_size) ** 2
    if units == 1:
        raise ConfigError(f"mae.mask_patch_size {mask_patch_size} makes the whole {img_size} px "
                          f"image one mask unit (all masked or none); pick a smaller multiple "
                          f"of {patch_size} that divides {img_size}")
    count = mask_count(units, mask_ratio)
    if not 0 < count < units:
        raise ConfigError(f"mae.mask_ratio {mask_ratio} masks {min(max(count, 0), units)} of "
                          f"the {units} mask units of {mask_patch_size} px ({img_size} px "
                          f"image); it must mask at least one and leave one: pick a ratio in "
                          f"(0, {(units - 1) / units:.4g}] or a smaller mae.mask_patch_size")


def upsample_units(unit_mask: Tensor, scale: int) -> Tensor:
    """[N, r, r] unit mask -> [N, r*scale, r*scale] patch mask (each unit repeated over its
    scale x scale patches, the official ``mask.repeat(scale, 0).repeat(scale, 1)``)."""
    return unit_mask.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)


def simmim_masks(n: int, img_size: int, patch_size: int, mask_patch_size: int,
                 mask_ratio: float, generator: torch.Generator | None = None) -> Tensor:
    """Draw one SimMIM mask per image.

    Args:
        n: images.
        img_size, patch_size, mask_patch_size: pixels (checked by ``check_mask_geometry``).
        mask_ratio: fraction of mask units masked, rounded up to whole units.
        generator: a CPU generator (the step's); one [n, units] uniform draw.

    Returns:
        [n, g, g] int64 on the CPU, g = img_size / patch_size: 1 masked, 0 visible; every image
        has exactly ``mask_count(units, mask_ratio)`` masked units.
    """
    side = img_size // mask_patch_size  # units per side (official rand_size)
    units = side * side
    # argsort of i.i.d. uniforms: a uniformly random permutation per image, as
    # np.random.permutation(token_count); its first mask_count entries are masked.
    perm = torch.rand(n, units, generator=generator).argsort(dim=1)  # [n, units]
    flat = torch.zeros(n, units, dtype=torch.int64)  # [n, units]
    flat.scatter_(1, perm[:, :mask_count(units, mask_ratio)], 1)
    return upsample_units(flat.view(n, side, side), mask_patch_size // patch_size)  # [n, g, g]
