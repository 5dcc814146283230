"""RandAugment (Cubuk et al. 2020) as timm implements it, batched on the training device.

MAE's fine-tuning recipe trains with timm's ``rand-m9-mstd0.5-inc1``: for every image, two ops
drawn uniformly (with replacement) from 15, each applied with probability 0.5 at a magnitude
drawn from N(9, 0.5) and clipped to [0, 10]; geometric ops fill with the data's mean colour and
resample bicubically (MAE's ``--interpolation bicubic``). timm runs it per image on PIL images in
DataLoader workers; here a whole uint8-valued batch [N, C, H, W] (float, 0..255) goes through at
once, every op on the images that drew it, and each op's output is rounded to integers as PIL's
uint8 images are. It draws a fixed number of random numbers per batch from one generator, so a
run replays exactly and DDP processes that build the same global batch augment it alike.

The ops follow timm's ``auto_augment.py`` (level -> argument rules) and PIL's semantics:
AutoContrast, Equalize (``ImageOps.equalize``'s lookup table), Invert, Rotate (+-30 deg at level
10, about the centre), Posterize, Solarize, SolarizeAdd, Color / Contrast / Brightness /
Sharpness (``ImageEnhance`` blends: grayscale, grey mean, black, the 3x3 smoothed image),
ShearX / ShearY (+-0.3, about the top-left corner, as PIL's affine transform), TranslateXRel /
TranslateYRel (+-45 % of the side). ``inc1`` takes the "increasing" variants (severity grows with
the magnitude; posterize keeps 4 - 4 * level bits, 0 bits giving black as older Pillow did:
the Pillow installed here refuses 0 bits, which is why timm's own RandAugment crashed on it).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mae_bench.errors import ConfigError

LEVEL_DENOM = 10.0  # timm: magnitudes are on a 0-10 scale
INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                  "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                  "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
                  "TranslateXRel", "TranslateYRel")
ORIGINAL_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
                "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX",
                "ShearY", "TranslateXRel", "TranslateYRel")
PAPER_POLICY = "rand-m9-mstd0.5-inc1"  # MAE's main_finetune.py --aa default
_PIL_LUMA = (0.299, 0.587, 0.114)  # PIL's convert("L") weights (x 1000: 299, 587, 114)


@dataclass(frozen=True)
class RandAugmentSpec:
    """A RandAugment policy (timm's config string ``rand-m9-mstd0.5-inc1`` and its keys).

    Attributes:
        magnitude: m, on timm's 0-10 scale.
        magnitude_std: mstd: each op's magnitude ~ N(m, mstd) clipped to [0, 10]; 0: fixed.
        num_ops: n, ops per image (timm: 2).
        prob: each drawn op is applied with this probability (timm: 0.5).
        increasing: inc1: the variants whose severity grows with the magnitude.
        translate_pct: TranslateXRel / YRel shift at level 10, as a share of the side.
    """

    magnitude: float = 9.0
    magnitude_std: float = 0.5
    num_ops: int = 2
    prob: float = 0.5
    increasing: bool = True
    translate_pct: float = 0.45

    @property
    def ops(self) -> tuple[str, ...]:
        return INCREASING_OPS if self.increasing else ORIGINAL_OPS

    @classmethod
    def parse(cls, text: str) -> RandAugmentSpec:
        """timm's ``rand-m9-mstd0.5-inc1`` form: ``rand`` then any of ``-mM``, ``-mstdS``,
        ``-nN``, ``-pP``, ``-incI`` (0 or 1).

        Raises:
            ConfigError: anything else, naming the bad part.
        """
        parts = text.strip().split("-")
        if parts[0] != "rand":
            raise ConfigError(f"RandAugment policy {text!r} must start with 'rand' (timm's form, "
                              f"e.g. {PAPER_POLICY})")
        values: dict[str, float] = {}
        for part in parts[1:]:
            m = re.fullmatch(r"(mstd|m|n|p|inc)(\d+(?:\.\d+)?)", part)
            if m is None:
                raise ConfigError(f"RandAugment policy {text!r}: cannot read {part!r}; known "
                                  f"keys: m (magnitude), mstd, n (ops per image), p, inc (0 / 1)")
            values[m.group(1)] = float(m.group(2))
        spec = cls(magnitude=values.get("m", LEVEL_DENOM),
                   magnitude_std=values.get("mstd", 0.0), num_ops=int(values.get("n", 2)),
                   prob=values.get("p", 0.5), increasing=values.get("inc", 0) == 1)
        if not 0 <= spec.magnitude <= LEVEL_DENOM or not 0 <= spec.prob <= 1 \
                or spec.num_ops < 1 or values.get("inc", 0) not in (0, 1):
            raise ConfigError(f"RandAugment policy {text!r}: m must be in 0..10, p in [0, 1], "
                              f"n >= 1, inc 0 or 1")
        return spec

    def name(self) -> str:
        """The timm config string of this policy."""
        return (f"rand-m{self.magnitude:g}-mstd{self.magnitude_std:g}-n{self.num_ops}"
                f"-p{self.prob:g}-inc{int(self.increasing)}")


def rand_augment(x: Tensor, spec: RandAugmentSpec, fill: tuple[float, ...],
                 generator: torch.Generator | None = None) -> Tensor:
    """Apply ``spec`` to a batch, per image.

    Args:
        x: [N, C, H, W] float in 0..255 (C = 1 or 3), integer-valued as uint8 images are.
        spec: the policy.
        fill: the colour geometric ops fill with, 0..255 per channel (timm: the data's mean).
        generator: on ``x``'s device; draws 4 x num_ops x N numbers per batch.

    Returns:
        [N, C, H, W] float in 0..255, integer-valued (a new tensor).
    """
    n, dev = x.shape[0], x.device
    x = x.clone()
    fill_t = torch.tensor(fill, device=dev, dtype=x.dtype).view(1, -1, 1, 1)
    for _ in range(spec.num_ops):
        u = torch.rand(4, n, generator=generator, device=dev)  # op, apply, sign; [4, N]
        op = torch.clamp((u[0] * len(spec.ops)).long(), max=len(spec.ops) - 1)  # [N]
        apply = u[1] < spec.prob  # [N]
        sign = torch.where(u[2] < 0.5, 1.0, -1.0)  # [N] timm's _randomly_negate
        # N(m, mstd) by the inverse normal CDF of the fourth uniform, clipped to [0, 10]
        z = torch.special.ndtri(u[3].clamp(1e-7, 1 - 1e-7))  # [N]
        level = (spec.magnitude + spec.magnitude_std * z).clamp(0, LEVEL_DENOM) / LEVEL_DENOM
        # Images grouped by the op they drew, skipped ones last: one host sync (the counts) per
        # layer, not one per op, which on a GPU would stall the step fifteen times.
        chosen = torch.where(apply, op, len(spec.ops))  # [N]
        order = torch.argsort(chosen, stable=True)  # [N]
        counts = torch.bincount(chosen, minlength=len(spec.ops) + 1).tolist()
        start = 0
        for name, count in zip(spec.ops, counts[:-1], strict=True):  # the last: skipped
            idx = order[start:start + count]  # [n_k] the images that apply this op
            start += count
            if count:
                x[idx] = _OPS[name](x[idx], level[idx], sign[idx], fill_t, spec)
    return x


# --- the ops: [n, C, H, W] float 0..255, level [n] in [0, 1], sign [n] of +-1 ------------------


def _col(v: Tensor) -> Tensor:
    return v.view(-1, 1, 1, 1)


def _gray(x: Tensor) -> Tensor:
    """PIL's convert("L"): [n, C, H, W] -> [n, 1, H, W] rounded luma (C = 1: itself)."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return torch.round(r * _PIL_LUMA[0] + g * _PIL_LUMA[1] + b * _PIL_LUMA[2]).unsqueeze(1)


def _blend(degenerate: Tensor, x: Tensor, factor: Tensor) -> Tensor:
    """ImageEnhance (PIL's Image.blend): degenerate + factor x (image - degenerate), clipped
    and truncated to an integer."""
    return torch.floor((degenerate + _col(factor) * (x - degenerate)).clamp(0, 255))


def _enhance_factor(level: Tensor, sign: Tensor, spec: RandAugmentSpec) -> Tensor:
    if spec.increasing:  # 1 +- 0.9 level, at least 0.1
        return (1.0 + sign * level * 0.9).clamp(min=0.1)
    return level * 1.8 + 0.1


def _auto_contrast(x: Tensor, *_) -> Tensor:
    lo = x.amin(dim=(2, 3), keepdim=True)  # [n, C, 1, 1] per channel, as PIL
    hi = x.amax(dim=(2, 3), keepdim=True)
    scale = 255.0 / (hi - lo).clamp(min=1)
    out = torch.floor((x - lo) * scale).clamp(0, 255)  # PIL's lut: int(i * scale + offset)
    return torch.where(hi > lo, out, x)


def _equalize(x: Tensor, *_) -> Tensor:
    n, c, h, w = x.shape
    flat = x.reshape(n * c, h * w).long().clamp(0, 255)  # [M, P]
    hist = torch.zeros(n * c, 256, device=x.device, dtype=torch.long)
    hist.scatter_add_(1, flat, torch.ones_like(flat))  # [M, 256]
    # PIL: step = (pixels - count of the last used value) // 255; lut[i] = (step // 2 +
    # pixels below i) // step; identity when step is 0 (one value, or too few pixels)
    last = 255 - torch.argmax(hist.flip(1).gt(0).long(), dim=1)  # [M] highest used value
    step = (h * w - hist.gather(1, last.unsqueeze(1)).squeeze(1)) // 255  # [M]
    below = torch.cumsum(hist, 1) - hist  # [M, 256] pixels with a smaller value
    lut = ((step.unsqueeze(1) // 2 + below) // step.clamp(min=1).unsqueeze(1)).clamp(max=255)
    out = lut.gather(1, flat).to(x.dtype).view(n, c, h, w)
    return torch.where(step.view(n, c, 1, 1) > 0, out, x)


def _invert(x: Tensor, *_) -> Tensor:
    return 255.0 - x


def _posterize(x: Tensor, level: Tensor, sign: Tensor, fill: Tensor,
               spec: RandAugmentSpec) -> Tensor:
    bits = torch.floor(level * 4)  # timm: int(level / 10 * 4), kept bits of the original rule
    if spec.increasing:
        bits = 4 - bits
    drop = 2.0 ** (8 - bits)  # [n] keep the top `bits` bits: floor(x / 2^(8-b)) * 2^(8-b)
    return torch.floor(x / _col(drop)) * _col(drop)


def _solarize(x: Tensor, level: Tensor, sign: Tensor, fill: Tensor,
              spec: RandAugmentSpec) -> Tensor:
    thresh = torch.floor(level * 256).clamp(max=256)
    if spec.increasing:
        thresh = 256 - thresh
    return torch.where(x >= _col(thresh), 255.0 - x, x)


def _solarize_add(x: Tensor, level: Tensor, *_) -> Tensor:
    add = torch.floor(level * 110).clamp(max=128)
    return torch.where(x < 128, (x + _col(add)).clamp(max=255), x)


def _color(x: Tensor, level: Tensor, sign: Tensor, fill: Tensor, spec: RandAugmentSpec) -> Tensor:
    if x.shape[1] == 1:
        return x  # a grayscale image has no colour to change
    return _blend(_gray(x), x, _enhance_factor(level, sign, spec))


def _contrast(x: Tensor, level: Tensor, sign: Tensor, fill: Tensor,
              spec: RandAugmentSpec) -> Tensor:
    mean = torch.floor(_gray(x).mean(dim=(1, 2, 3), keepdim=True) + 0.5)  # PIL: int(mean + .5)
    return _blend(mean.expand_as(x), x, _enhance_factor(level, sign, spec))


def _brightness(x: Tensor, level: Tensor, sign: Tensor, fill: Tensor,
                spec: RandAugmentSpec) -> Tensor:
    return _blend(torch.zeros_like(x), x, _enhance_factor(level, sign, spec))


def _sharpness(x: Tensor, level: Tensor, sign: Tensor, fill: Tensor,
               spec: RandAugmentSpec) -> Tensor:
    c = x.shape[1]
    kernel = torch.ones(3, 3, device=x.device, dtype=x.dtype)
    kernel[1, 1] = 5.0
    kernel = (kernel / 13.0).expand(c, 1, 3, 3)
    smooth = torch.round(F.conv2d(x, kernel, groups=c)).clamp(0, 255)  # [n, C, H-2, W-2]
    degenerate = x.clone()
    degenerate[..., 1:-1, 1:-1] = smooth  # PIL's SMOOTH filter leaves the border as it was
    return _blend(degenerate, x, _enhance_factor(level, sign, spec))


def _affine(x: Tensor, matrix: Tensor, fill: Tensor) -> Tensor:
    """Resample as PIL's AFFINE transform does: output pixel centre (u, v) reads the input at
    (a u + b v + c, d u + e v + f), bicubically with the border pixels repeated; a pixel whose
    source point lies outside [0, size) gets ``fill``.

    Args:
        x: [n, C, H, W]. matrix: [n, 2, 3] (a, b, c / d, e, f) in pixels. fill: [1, C, 1, 1].
    """
    n, _, h, w = x.shape
    # normalised -> pixel: p = (g + 1) / 2 * size; input pixel -> normalised: g = 2 p / size - 1
    to_px = torch.tensor([[w / 2, 0, w / 2], [0, h / 2, h / 2], [0, 0, 1]], device=x.device,
                         dtype=x.dtype)
    to_norm = torch.tensor([[2 / w, 0, -1], [0, 2 / h, -1], [0, 0, 1]], device=x.device,
                           dtype=x.dtype)
    last_row = torch.tensor([[[0.0, 0.0, 1.0]]], device=x.device, dtype=x.dtype).expand(n, 1, 3)
    theta = (to_norm @ torch.cat([matrix.to(x.dtype), last_row], 1) @ to_px)[:, :2]  # [n, 2, 3]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # [n, H, W, 2]
    out = F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False)
    src_x = (grid[..., 0] + 1) / 2 * w  # [n, H, W] source point in pixels
    src_y = (grid[..., 1] + 1) / 2 * h
    outside = (src_x < 0) | (src_x >= w) | (src_y < 0) | (src_y >= h)  # [n, H, W]
    out = torch.where(outside.unsqueeze(1), fill, out)
    return torch.round(out.clamp(0, 255))


def _rotate(x: Tensor, level: Tensor, sign: Tensor, fill: Tensor, spec: RandAugmentSpec) -> Tensor:
    h, w = x.shape[-2:]
    angle = -torch.deg2rad(sign * level * 30.0)  # PIL rotates counter-clockwise
    cos, sin = torch.cos(angle), torch.sin(angle)
    cx, cy = w / 2.0, h / 2.0
    # input = R (output - centre) + centre, R = [[cos, sin], [-sin, cos]] (PIL's rotate)
    m = torch.stack([torch.stack([cos, sin, cx - cos * cx - sin * cy], 1),
                     torch.stack([-sin, cos, cy + sin * cx - cos * cy], 1)], 1)
    return _affine(x, m, fill)


def _shear(axis: int) -> Callable[..., Tensor]:
    def op(x: Tensor, level: Tensor, sign: Tensor, fill: Tensor, spec: RandAugmentSpec) -> Tensor:
        s = sign * level * 0.3
        one, zero = torch.ones_like(s), torch.zeros_like(s)
        rows = ([one, s, zero], [zero, one, zero]) if axis == 0 else \
               ([one, zero, zero], [s, one, zero])
        return _affine(x, torch.stack([torch.stack(r, 1) for r in rows], 1), fill)
    return op


def _translate(axis: int) -> Callable[..., Tensor]:
    def op(x: Tensor, level: Tensor, sign: Tensor, fill: Tensor, spec: RandAugmentSpec) -> Tensor:
        side = x.shape[-1] if axis == 0 else x.shape[-2]
        t = sign * level * spec.translate_pct * side
        one, zero = torch.ones_like(t), torch.zeros_like(t)
        rows = ([one, zero, t], [zero, one, zero]) if axis == 0 else \
               ([one, zero, zero], [zero, one, t])
        return _affine(x, torch.stack([torch.stack(r, 1) for r in rows], 1), fill)
    return op


_OPS: dict[str, Callable[..., Tensor]] = {
    "AutoContrast": _auto_contrast, "Equalize": _equalize, "Invert": _invert,
    "Rotate": _rotate, "Posterize": _posterize, "PosterizeIncreasing": _posterize,
    "Solarize": _solarize, "SolarizeIncreasing": _solarize, "SolarizeAdd": _solarize_add,
    "Color": _color, "ColorIncreasing": _color, "Contrast": _contrast,
    "ContrastIncreasing": _contrast, "Brightness": _brightness,
    "BrightnessIncreasing": _brightness, "Sharpness": _sharpness,
    "SharpnessIncreasing": _sharpness, "ShearX": _shear(0), "ShearY": _shear(1),
    "TranslateXRel": _translate(0), "TranslateYRel": _translate(1),
}
assert set(INCREASING_OPS) | set(ORIGINAL_OPS) == set(_OPS)
