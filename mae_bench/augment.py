"""Train-time views, applied to whole batches on the training device.

Small data sets live in memory as uint8 tensors; a batch of them is cropped, resized, flipped and
normalised here in one pass (one ``grid_sample`` call), instead of image by image in Python
workers. The crop boxes follow torchvision's ``RandomResizedCrop`` sampling exactly (ten tries at
a random area and log-uniform aspect ratio, then a centre-crop fallback), vectorised.

Streamed (large) data sets get the same crop per image in their DataLoader workers
(``sample_transform``), and only normalisation on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class ViewSpec:
    """One augmented view. MAE uses one: random resized crop (scale 0.2-1) and a flip."""

    img_size: int
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5  # probability of a horizontal flip
    interpolation: str = "bicubic"  # bicubic (as MAE) | bilinear


def crop_boxes(n: int, height: int, width: int, scale: tuple[float, float],
               ratio: tuple[float, float], generator: torch.Generator | None = None,
               device: torch.device | str = "cpu", tries: int = 10) -> Tensor:
    """Sample RandomResizedCrop boxes for a batch.

    Returns:
        [n, 4] float tensor of (top, left, height, width) in pixels.
    """
    area = height * width
    u = torch.rand(n, tries, 2, generator=generator, device=device)  # [n, T, 2]
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])  # [n, T]
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * u[..., 1])  # [n, T]
    w = torch.round(torch.sqrt(target_area * aspect))  # [n, T]
    h = torch.round(torch.sqrt(target_area / aspect))  # [n, T]
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # [n, T]
    first = torch.argmax(ok.int(), dim=1)  # [n] first valid try (0 when none)
    any_ok = ok.any(dim=1)  # [n]
    rows = torch.arange(n, device=device)
    w, h = w[rows, first], h[rows, first]  # [n]
    # Fallback: the whole image, cropped to the nearest allowed aspect ratio (torchvision's rule).
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fw, fh = round(height * max(ratio)), height
    else:
        fw, fh = width, height
    w = torch.where(any_ok, w, torch.full_like(w, fw))
    h = torch.where(any_ok, h, torch.full_like(h, fh))
    pos = torch.rand(n, 2, generator=generator, device=device)  # [n, 2]
    top = torch.floor(pos[:, 0] * (height - h + 1))
    left = torch.floor(pos[:, 1] * (width - w + 1))
    top = torch.where(any_ok, top, torch.div(height - h, 2, rounding_mode="floor"))
    left = torch.where(any_ok, left, torch.div(width - w, 2, rounding_mode="floor"))
    return torch.stack([top, left, h, w], dim=1)  # [n, 4]


def resized_crops(images: Tensor, boxes: Tensor, out_size: int, flip: Tensor | None = None,
                  mode: str = "bicubic") -> Tensor:
    """Crop each image to its box and resize to ``out_size`` with one grid_sample.

    Args:
        images: [N, C, H, W] float.
        boxes: [N, 4] (top, left, height, width) in pixels.
        out_size: output side length.
        flip: [N] bool, flip horizontally where True.
        mode: grid_sample interpolation.

    Returns:
        [N, C, out_size, out_size] float.
    """
    n, _, height, width = images.shape
    top, left, h, w = boxes.unbind(1)  # [N] each
    sx = w / width  # [N]
    sy = h / height  # [N]
    cx = (left + w / 2) / width * 2 - 1  # [N] crop centre in normalised coordinates
    cy = (top + h / 2) / height * 2 - 1  # [N]
    if flip is not None:
        sx = torch.where(flip, -sx, sx)
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, cx], 1), torch.stack([zero, sy, cy], 1)], 1)
    grid = F.affine_grid(theta.to(images.dtype), [n, images.shape[1], out_size, out_size],
                         align_corners=False)  # [N, S, S, 2]
    return F.grid_sample(images, grid, mode=mode, padding_mode="border", align_corners=False)


class BatchViews:
    """Turns a uint8 batch [N, C, H, W] into normalised float views on the batch's device."""

    def __init__(self, spec: ViewSpec, mean: tuple[float, ...], std: tuple[float, ...]):
        self.spec = spec
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        s = self.spec
        n, _, height, width = images.shape
        x = images.float()  # [N, C, H, W] in 0..255
        boxes = crop_boxes(n, height, width, s.scale, s.ratio, generator, images.device)
        flip = torch.rand(n, generator=generator, device=images.device) < s.hflip  # [N]
        x = resized_crops(x, boxes, s.img_size, flip, s.interpolation)
        return self.normalize(x.clamp_(0, 255))

    def normalize(self, x: Tensor) -> Tensor:
        """[N, C, H, W] in 0..255 -> (x / 255 - mean) / std."""
        mean = self.mean.to(x.device)
        std = self.std.to(x.device)
        return (x / 255.0 - mean) / std


def eval_resize(images: Tensor, img_size: int) -> Tensor:
    """Deterministic eval-time view: resize a uint8 batch to ``img_size`` (float, 0..255)."""
    x = images.float()
    if x.shape[-1] != img_size or x.shape[-2] != img_size:
        x = F.interpolate(x, size=(img_size, img_size), mode="bicubic", align_corners=False,
                          antialias=x.shape[-1] > img_size)
    return x.clamp_(0, 255)


def sample_transform(spec: ViewSpec):
    """Per-image version of the same crop + flip for DataLoader workers (uint8 in, uint8 out)."""
    from torchvision.transforms import InterpolationMode, v2

    interp = InterpolationMode.BICUBIC if spec.interpolation == "bicubic" else \
        InterpolationMode.BILINEAR
    return v2.Compose([
        v2.RandomResizedCrop(spec.img_size, scale=spec.scale, ratio=spec.ratio,
                             interpolation=interp, antialias=True),
        v2.RandomHorizontalFlip(spec.hflip),
    ])
