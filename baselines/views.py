"""The baselines' augmentation recipes as ViewSpecs (applied batched by mae_bench.data.augment).

- ``simclr_views``: SimCLR (Chen et al. 2020, App. A): random resized crop (scale 0.08-1), flip,
  colour jitter with strength 1 (0.8, 0.8, 0.8, 0.2) applied with p 0.8, grayscale p 0.2, blur
  p 0.5; both views alike.
- ``byol_views``: BYOL (Grill et al. 2020, Table 6), also used by MoCo v3 and DINO: jitter
  (0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale p 0.2; view 1 always blurred, view 2 blurred with
  p 0.1 and solarized with p 0.2.

Small images: blur needs room (the kernel is 10 % of the side), so below ``BLUR_MIN_SIZE`` pixels
it is off, as in SimCLR's and solo-learn's CIFAR recipes. Below ``TINY_SIZE`` pixels (digits,
8 px) the smallest crop is 20 % of the image, not 8 %: 8 % of 64 pixels is five pixels.
"""

from __future__ import annotations

from dataclasses import replace

from mae_bench.data.augment import ViewSpec

BLUR_MIN_SIZE = 64
TINY_SIZE = 32


def _min_scale(img_size: int, scale: float) -> float:
    return max(scale, 0.2) if img_size < TINY_SIZE else scale


def _blur(img_size: int, p: float) -> float:
    return p if img_size >= BLUR_MIN_SIZE else 0.0


def simclr_views(img_size: int) -> list[ViewSpec]:
    spec = ViewSpec(img_size=img_size, scale=(_min_scale(img_size, 0.08), 1.0),
                    interpolation="bilinear", color_jitter=0.8, brightness=0.8, contrast=0.8,
                    saturation=0.8, hue=0.2, grayscale=0.2, blur=_blur(img_size, 0.5))
    return [spec, spec]


def byol_views(img_size: int, scale: tuple[float, float] = (0.08, 1.0)) -> list[ViewSpec]:
    base = ViewSpec(img_size=img_size, scale=(_min_scale(img_size, scale[0]), scale[1]),
                    interpolation="bicubic", color_jitter=0.8, brightness=0.4, contrast=0.4,
                    saturation=0.2, hue=0.1, grayscale=0.2)
    return [replace(base, blur=_blur(img_size, 1.0)),
            replace(base, blur=_blur(img_size, 0.1), solarize=0.2)]


def dino_views(img_size: int, local_crops: int, local_size: int) -> list[ViewSpec]:
    """DINO (Caron et al. 2021, App. "Data augmentation"): BYOL's two global views at scale
    0.4-1 with multi-crop (0.14-1 without, the paper's single-crop setting), plus
    ``local_crops`` views of ``local_size`` px at scale 0.05-0.4, blurred with p 0.5."""
    global_scale = (0.4, 1.0) if local_crops else (0.14, 1.0)
    views = byol_views(img_size, global_scale)
    local = replace(views[0], img_size=local_size, scale=(0.05, 0.4), blur=_blur(img_size, 0.5))
    return views + [local] * local_crops


def swav_views(img_size: int, local_crops: int, local_size: int) -> list[ViewSpec]:
    """SwAV (Caron et al. 2020, App. A; the official src/multicropdataset.py): every crop gets
    SimCLR's colour distortion of strength 1 (jitter 0.8, 0.8, 0.8, 0.2 with p 0.8, grayscale
    p 0.2) and a blur with p 0.5, bilinear resizing; two global crops at scale 0.14-1 plus
    ``local_crops`` crops of ``local_size`` px at scale 0.05-0.14 (the paper's multi-crop)."""
    base = simclr_views(img_size)[0]
    global_crop = replace(base, scale=(_min_scale(img_size, 0.14), 1.0))
    local = replace(base, img_size=local_size, scale=(0.05, 0.14))
    return [global_crop, global_crop] + [local] * local_crops
