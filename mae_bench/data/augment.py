"""Train-time views, applied to whole batches on the training device.

Small data sets live in memory as uint8 tensors; a batch of them is cropped, resized, flipped and
normalised here in one pass (one ``grid_sample`` call), instead of image by image in Python
workers. The crop boxes follow torchvision's ``RandomResizedCrop`` sampling exactly (ten tries at
a random area and log-uniform aspect ratio, then a centre-crop fallback), vectorised.

The contrastive baselines also need photometric augmentations (colour jitter, grayscale, Gaussian
blur, solarization; SimCLR / BYOL order). They run batched too, with per-sample random factors
drawn on the images' device, and follow ``torchvision.transforms.v2.functional`` for a fixed
factor. A ``ViewSpec`` with none of them enabled (MAE's) draws no extra random numbers, so its
views are exactly those of a crop + flip.

Streamed (large) data sets get the same crop boxes per image in their DataLoader workers
(``mae_bench.data.pipeline``); the resize (by default), the photometric ops and normalisation then
run on the device (``BatchViews.finish``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mae_bench.data.crops import CropBatch, DeviceCrops, EncodedView
from mae_bench.data.randaugment import RandAugmentSpec, rand_augment


@dataclass(frozen=True)
class ViewSpec:
    """One augmented view. MAE uses one: random resized crop (scale 0.2-1) and a flip.

    The photometric fields default to off. ``color_jitter`` is the probability of jittering an
    image; ``brightness``, ``contrast``, ``saturation`` and ``hue`` are torchvision ColorJitter
    strengths (factors uniform in [max(0, 1 - s), 1 + s]; hue shift uniform in [-h, h] of a full
    turn). ``grayscale``, ``blur`` and ``solarize`` are probabilities.
    """

    img_size: int
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5  # probability of a horizontal flip
    interpolation: str = "bicubic"  # bicubic (as MAE) | bilinear
    color_jitter: float = 0.0  # probability of applying the jitter below
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0  # at most 0.5 (half a turn)
    grayscale: float = 0.0  # probability
    blur: float = 0.0  # probability of a Gaussian blur
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize: float = 0.0  # probability; inverts values >= 0.5 of the range (128 of 255)
    # RandAugment after the crop and flip (fine-tuning; timm's order): mae_bench.data.randaugment
    rand_augment: RandAugmentSpec | None = None

    def __post_init__(self) -> None:
        for name in ("hflip", "color_jitter", "grayscale", "blur", "solarize"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"ViewSpec.{name} is a probability in [0, 1], "
                                 f"got {getattr(self, name)}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"ViewSpec.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"ViewSpec.hue must be in [0, 0.5], got {self.hue}")
        if not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"ViewSpec.blur_sigma must be (lo, hi) with 0 < lo <= hi, "
                             f"got {self.blur_sigma}")

    @property
    def jitters(self) -> bool:
        """Whether colour jitter can change an image."""
        return self.color_jitter > 0 and (
            self.brightness > 0 or self.contrast > 0 or self.saturation > 0 or self.hue > 0)

    @property
    def photometric(self) -> bool:
        """Whether any photometric op is on (False for MAE: crop + flip only)."""
        return self.jitters or self.grayscale > 0 or self.blur > 0 or self.solarize > 0

    @property
    def blur_kernel_size(self) -> int:
        """SimCLR's rule: 10 % of the image side, made odd, at least 3 (23 px at 224 px)."""
        return blur_kernel_size(self.img_size)


def blur_kernel_size(img_size: int) -> int:
    """Gaussian blur kernel side for ``img_size`` px images: 10 % of it, made odd, at least 3."""
    k = img_size // 10
    return max(3, k + 1 - k % 2)


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


# ----------------------------------------------------------------------------- photometric ops
# Images are float [N, C, H, W] in [0, 1], C = 1 or 3. The public ops return a new tensor and draw
# per-sample randomness with ``generator`` on the images' device. They are built on kernels that
# take the per-sample factors ([N]); the tests compare those with torchvision's functional ops.
#
# Speed: this runs every step, on CPU too, where every fresh multi-megabyte temporary costs page
# faults. So the kernels work in place (trailing underscore), and an image that is not augmented
# gets an identity factor, or is picked back with lerp (a 0 / 1 weight gives one side exactly),
# rather than through torch.where (several times slower on CPU).

# torchvision's rgb_to_grayscale weights (ITU-R 601-2 luma; torchvision uses 0.2989 for red).
_LUMA = (0.2989, 0.587, 0.114)


def _col(v: Tensor) -> Tensor:
    return v.view(-1, 1, 1, 1)  # [N] -> [N, 1, 1, 1], broadcasts over C, H, W


def _weight(mask: Tensor, like: Tensor) -> Tensor:
    return _col(mask.to(like.dtype))  # [N] bool -> [N, 1, 1, 1] lerp weight 0 / 1


def _luma(x: Tensor) -> Tensor:
    """[N, C, H, W] -> [N, 1, H, W] grayscale, a new tensor (1 channel: ``x`` itself)."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)  # [N, H, W] each
    return (r * _LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2]).unsqueeze_(1)


def _brightness_(x: Tensor, factor: Tensor) -> Tensor:
    """x * factor, clamped (torchvision adjust_brightness), in place."""
    return x.mul_(_col(factor)).clamp_(0, 1)


def _contrast_(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with the mean of the grayscale image (torchvision adjust_contrast), in place."""
    means = x.mean(dim=(2, 3))  # [N, C]; the grayscale mean is the luma of the channel means
    if x.shape[1] == 3:
        means = means @ torch.tensor(_LUMA, device=x.device, dtype=x.dtype)  # [N]
    return x.mul_(_col(factor)).add_(_col(means.view(-1) * (1 - factor))).clamp_(0, 1)


def _saturation_(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with the grayscale image (torchvision adjust_saturation), in place."""
    if x.shape[1] == 1:  # as torchvision (and PIL): no colour to saturate
        return x
    gray = _luma(x).mul_(_col(1 - factor))  # [N, 1, H, W]
    return x.mul_(_col(factor)).add_(gray).clamp_(0, 1)


# HSV -> RGB, per channel (R, G, B): where the channel lies between the pixel's min and max, as a
# function of h6 = 6 * hue in [0, 6): clamp(a * |h6 - c| + b, 0, 1) (the sextant rule).
_HUE_ABC = ((1.0, -1.0, -1.0), (3.0, 2.0, 4.0), (-1.0, 2.0, 2.0))


def _hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotates the hue by ``shift`` [N] turns (torchvision adjust_hue: RGB -> HSV, h + shift
    mod 1, HSV -> RGB); a new tensor. Each pixel keeps its min and max over the channels (value
    and saturation); only where the channels lie between them changes."""
    if x.shape[1] == 1:
        return x.clone()
    r, g, b = x.unbind(1)  # [N, H, W] each
    # elementwise max / min: much faster on CPU than a reduction over the 3 channels
    maxc = torch.maximum(r, g)  # [N, H, W]
    torch.maximum(maxc, b, out=maxc)
    minc = torch.minimum(r, g)
    torch.minimum(minc, b, out=minc)
    delta = maxc - minc
    # hue in sextants from the channel holding the maximum (ties: red, then green, as
    # torchvision): (g - b) / delta on red, 2 + (b - r) / delta on green, 4 + (r - g) / delta
    on_r = (maxc == r).to(x.dtype)
    on_g = (maxc == g).to(x.dtype)
    h6 = r - g
    other = b - r
    h6.lerp_(other, on_g)
    h6.lerp_(torch.sub(g, b, out=other), on_r)
    h6.div_(other.copy_(delta == 0).add_(delta))  # grey pixels (delta 0): 0 / 1, hue 0
    h6.add_(on_g.mul_(-2.0).add_(4.0).mul_(on_r.neg_().add_(1.0)))  # + 0, 2 or 4
    h6.add_(shift.view(-1, 1, 1), alpha=6.0).remainder_(6.0)
    a, c, b_ = torch.tensor(_HUE_ABC, device=x.device, dtype=x.dtype).view(3, 1, 3, 1, 1)
    place = (h6.unsqueeze(1) - c).abs_().mul_(a).add_(b_).clamp_(0, 1)  # [N, 3, H, W]
    return place.mul_(delta.unsqueeze(1)).add_(minc.unsqueeze(1)).clamp_(0, 1)


def _uniform(u: Tensor, lo: float, hi: float) -> Tensor:
    return u * (hi - lo) + lo


def _color_jitter_(x: Tensor, brightness: float, contrast: float, saturation: float, hue: float,
                   p: float, generator: torch.Generator | None) -> Tensor:
    """``color_jitter``, in place where it can be (the hue step makes a new tensor)."""
    u = torch.rand(x.shape[0], 5, generator=generator, device=x.device)  # [N, 5]: p, b, c, s, h
    apply = u[:, 0] < p  # [N]

    def factor(col: int, strength: float) -> Tensor:  # [N]; 1 (exactly no change) where skipped
        f = _uniform(u[:, col], max(0.0, 1 - strength), 1 + strength)
        return torch.where(apply, f, 1.0)

    if brightness > 0:
        x = _brightness_(x, factor(1, brightness))
    if contrast > 0:
        x = _contrast_(x, factor(2, contrast))
    if saturation > 0:
        x = _saturation_(x, factor(3, saturation))
    if hue > 0 and x.shape[1] == 3:
        shifted = _hue(x, _uniform(u[:, 4], -hue, hue))  # [N, C, H, W]
        x = shifted if p >= 1 else shifted.lerp_(x, _weight(~apply, x))
    return x


def color_jitter(x: Tensor, brightness: float, contrast: float, saturation: float, hue: float,
                 p: float, generator: torch.Generator | None = None) -> Tensor:
    """torchvision's ColorJitter, per image, applied to each image with probability ``p``.

    Factors are drawn per image: brightness, contrast and saturation uniform in
    [max(0, 1 - s), 1 + s], the hue shift uniform in [-hue, hue] (turns). Unlike torchvision,
    which shuffles the four ops on every call, the order here is fixed: brightness, contrast,
    saturation, hue; each result is clamped to [0, 1]. A strength of 0 skips its op.

    Args:
        x: [N, C, H, W] float in [0, 1], C = 1 or 3 (1 channel: saturation and hue are no-ops).
        brightness, contrast, saturation, hue: strengths (hue at most 0.5).
        p: probability of jittering an image.
        generator: on ``x``'s device.

    Returns:
        [N, C, H, W] float in [0, 1], a new tensor.
    """
    return _color_jitter_(x.clone(), brightness, contrast, saturation, hue, p, generator)


def _grayscale_(x: Tensor, p: float, generator: torch.Generator | None) -> Tensor:
    if x.shape[1] == 1:
        return x
    apply = torch.rand(x.shape[0], generator=generator, device=x.device) < p  # [N]
    return x.lerp_(_luma(x), _weight(apply, x))  # luma [N, 1, H, W] onto all 3 channels


def random_grayscale(x: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Replaces each RGB image by its luma on all 3 channels with probability ``p``.

    Args:
        x: [N, C, H, W] float; a 1-channel batch is its own grayscale (no random draw).

    Returns:
        [N, C, H, W], a new tensor.
    """
    return _grayscale_(x.clone(), p, generator)


def _gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Blurs image i with a ``kernel_size`` Gaussian of std ``sigma[i]`` px (torchvision
    gaussian_blur, reflect padding); a new tensor.

    Separable, and all N * C planes in one grouped conv per axis (each plane its own kernel).
    """
    n, c, h, w = x.shape
    offsets = torch.arange(kernel_size, device=x.device, dtype=x.dtype) - kernel_size // 2  # [K]
    kernel = torch.exp(-offsets.square() / (2 * sigma.to(x.dtype).square().view(-1, 1)))  # [N, K]
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    kernel = kernel.repeat_interleave(c, dim=0)  # [N * C, K], one per plane
    pad = kernel_size // 2
    planes = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    planes = F.conv2d(planes, kernel.view(n * c, 1, 1, kernel_size), groups=n * c)  # rows
    planes = F.conv2d(planes, kernel.view(n * c, 1, kernel_size, 1), groups=n * c)  # columns
    return planes.view(n, c, h, w)


def gaussian_blur(x: Tensor, sigma_range: tuple[float, float], kernel_size: int, p: float,
                  generator: torch.Generator | None = None) -> Tensor:
    """Gaussian blur with a per-image sigma uniform in ``sigma_range``, with probability ``p``.

    Args:
        x: [N, C, H, W] float.
        sigma_range: (lo, hi) standard deviation in pixels.
        kernel_size: odd kernel side, at most 2 * min(H, W) - 1 (reflect padding).
        p: probability of blurring an image.
        generator: on ``x``'s device.

    Returns:
        [N, C, H, W] float, a new tensor.
    """
    u = torch.rand(x.shape[0], 2, generator=generator, device=x.device)  # [N, 2]: p, sigma
    blurred = _gaussian_blur(x, _uniform(u[:, 1], *sigma_range), kernel_size)
    return blurred if p >= 1 else blurred.lerp_(x, _weight(u[:, 0] >= p, x))


def _solarize_(x: Tensor, p: float, generator: torch.Generator | None) -> Tensor:
    apply = torch.rand(x.shape[0], generator=generator, device=x.device) < p  # [N]
    # min(x, 1 - x) is the solarized image; +inf for the images left alone gives min(x, inf) = x
    skip = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype).masked_fill_(~apply, math.inf)
    flipped = torch.rsub(x, 1.0).add_(_col(skip))  # [N, C, H, W]
    return torch.minimum(x, flipped, out=x)


def solarize(x: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Inverts the values >= 0.5 (x -> 1 - x) of each image with probability ``p``.

    Args:
        x: [N, C, H, W] float in [0, 1].

    Returns:
        [N, C, H, W], a new tensor.
    """
    return _solarize_(x.clone(), p, generator)


def _photometric_(x: Tensor, spec: ViewSpec, generator: torch.Generator | None) -> Tensor:
    if spec.jitters:
        x = _color_jitter_(x, spec.brightness, spec.contrast, spec.saturation, spec.hue,
                           spec.color_jitter, generator)
    if spec.grayscale > 0:
        x = _grayscale_(x, spec.grayscale, generator)
    if spec.blur > 0:
        x = gaussian_blur(x, spec.blur_sigma, spec.blur_kernel_size, spec.blur, generator)
    if spec.solarize > 0:
        x = _solarize_(x, spec.solarize, generator)
    return x


def apply_photometric(x: Tensor, spec: ViewSpec,
                      generator: torch.Generator | None = None) -> Tensor:
    """The spec's colour jitter, grayscale, blur and solarization, in that (SimCLR / BYOL) order.

    The same as calling ``color_jitter``, ``random_grayscale``, ``gaussian_blur`` and
    ``solarize`` in turn with one generator; ops that are off draw no random numbers.

    Args:
        x: [N, C, H, W] float in [0, 1].

    Returns:
        [N, C, H, W] float in [0, 1], a new tensor.
    """
    return _photometric_(x.clone(), spec, generator)


# ----------------------------------------------------------------------------- views


def random_erasing(x: Tensor, p: float, generator: torch.Generator | None = None,
                   scale: tuple[float, float] = (0.02, 1 / 3),
                   ratio: tuple[float, float] = (0.3, 1 / 0.3), tries: int = 10) -> Tensor:
    """Random erasing (Zhong et al. 2017) of a normalised batch, in place: timm's
    ``RandomErasing(p, mode="pixel", max_count=1)``, as MAE's fine-tuning uses it (p = 0.25),
    vectorised. Each image is erased with probability ``p``: the first of ``tries`` rectangles
    (area a uniform share in ``scale`` of the image, log-uniform aspect ratio in ``ratio``) that
    fits inside it is filled with standard-normal noise per pixel and channel, the statistics of
    a normalised image. An image whose tries all miss is left as it is.

    Args:
        x: [N, C, H, W] float, normalised.
        p: probability of erasing an image.
        generator: on ``x``'s device.

    Returns:
        ``x``, erased in place.
    """
    if p <= 0:
        return x
    n, _, height, width = x.shape
    dev = x.device
    u = torch.rand(n, tries, 2, generator=generator, device=dev)  # [N, T, 2]
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[..., 0])  # [N, T]
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * u[..., 1])  # [N, T]
    h = torch.round(torch.sqrt(area * aspect))  # [N, T]
    w = torch.round(torch.sqrt(area / aspect))  # [N, T]
    ok = (w < width) & (h < height) & (w > 0) & (h > 0)  # [N, T]
    first = torch.argmax(ok.int(), dim=1)  # [N]
    rows = torch.arange(n, device=dev)
    h, w = h[rows, first], w[rows, first]  # [N]
    pos = torch.rand(n, 2, generator=generator, device=dev)  # [N, 2]
    top = torch.floor(pos[:, 0] * (height - h + 1))  # [N]
    left = torch.floor(pos[:, 1] * (width - w + 1))  # [N]
    erase = (torch.rand(n, generator=generator, device=dev) < p) & ok.any(dim=1)  # [N]
    ys = torch.arange(height, device=dev).view(1, height, 1)
    xs = torch.arange(width, device=dev).view(1, 1, width)
    inside = ((ys >= top.view(n, 1, 1)) & (ys < (top + h).view(n, 1, 1))
              & (xs >= left.view(n, 1, 1)) & (xs < (left + w).view(n, 1, 1)))  # [N, H, W]
    inside &= erase.view(n, 1, 1)
    noise = torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype)  # [N, C, H, W]
    return torch.where(inside.unsqueeze(1), noise, x, out=x)


class BatchViews:
    """Turns a uint8 batch [N, C, H, W] into normalised float views on the batch's device.

    ``__call__``: random resized crop + flip, then RandAugment (when the spec has it), then the
    spec's photometric ops (colour jitter, grayscale, blur, solarize), then normalisation.
    ``finish``: the same without the crop, for batches cropped in DataLoader workers (streamed
    data sets).
    """

    def __init__(self, spec: ViewSpec, mean: tuple[float, ...], std: tuple[float, ...]):
        self.spec = spec
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.fill = tuple(round(255 * m) for m in mean)  # RandAugment's fill (timm: img_mean)

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        s = self.spec
        n, _, height, width = images.shape
        x = images.float()  # [N, C, H, W] in 0..255
        boxes = crop_boxes(n, height, width, s.scale, s.ratio, generator, images.device)
        flip = torch.rand(n, generator=generator, device=images.device) < s.hflip  # [N]
        x = resized_crops(x, boxes, s.img_size, flip, s.interpolation)
        x = self._rand_augment(x, generator)
        if not s.photometric:  # MAE: exactly the crop + flip path, no further random numbers
            return self.normalize(x.clamp_(0, 255))
        return self._normalize01_(_photometric_(x.clamp_(0, 255).div_(255.0), s, generator))

    def finish(self, images: Tensor | DeviceCrops,
               generator: torch.Generator | None = None) -> Tensor:
        """The resize (for crops cut in the workers), RandAugment (when the spec has it),
        photometric ops and normalisation of a streamed batch; ``images`` is left as it is.

        Args:
            images: [N, C, h, w] uint8 or float in 0..255 (views cropped and resized in the
                workers), or crops still to resize here (``mae_bench.data.crops``).
            generator: on the images' device.

        Returns:
            [N, C, h, w] float, normalised (h = w = the spec's img_size for crops).
        """
        if isinstance(images, CropBatch | EncodedView):
            images = images.resize(self.spec.img_size, self.spec.interpolation)
        x = self._rand_augment(images.float(), generator)
        if not self.spec.photometric:
            return self.normalize(x)
        x = x / 255.0  # [N, C, h, w] in [0, 1], a new tensor
        return self._normalize01_(_photometric_(x, self.spec, generator))

    def _rand_augment(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """The spec's RandAugment on a cropped batch in 0..255 (as is when it has none), on
        uint8-valued pixels as timm's PIL ops see them, filling with the data's mean colour."""
        if self.spec.rand_augment is None:
            return x
        return rand_augment(x.clamp(0, 255).round_(), self.spec.rand_augment, self.fill,
                            generator)

    def normalize(self, x: Tensor) -> Tensor:
        """[N, C, H, W] in 0..255 -> (x / 255 - mean) / std."""
        mean = self.mean.to(x.device)
        std = self.std.to(x.device)
        return (x / 255.0 - mean) / std

    def _normalize01_(self, x: Tensor) -> Tensor:
        """[N, C, H, W] in [0, 1] -> (x - mean) / std, in place."""
        return x.sub_(self.mean.to(x.device)).div_(self.std.to(x.device))


def eval_resize(images: Tensor, img_size: int) -> Tensor:
    """Deterministic eval-time view: resize a uint8 batch to ``img_size`` (float, 0..255)."""
    x = images.float()
    if x.shape[-1] != img_size or x.shape[-2] != img_size:
        x = F.interpolate(x, size=(img_size, img_size), mode="bicubic", align_corners=False,
                          antialias=x.shape[-1] > img_size)
    return x.clamp_(0, 255)


class _Views:
    """Several per-image views of one image (a tuple, which the default collate batches per view).

    A class rather than a closure so that spawn-based DataLoader workers can pickle it.
    """

    def __init__(self, transforms: list):
        self.transforms = transforms

    def __call__(self, image: Tensor) -> tuple[Tensor, ...]:
        return tuple(t(image) for t in self.transforms)


def _crop_transform(spec: ViewSpec):
    from torchvision.transforms import InterpolationMode, v2

    interp = InterpolationMode.BICUBIC if spec.interpolation == "bicubic" else \
        InterpolationMode.BILINEAR
    return v2.Compose([
        v2.RandomResizedCrop(spec.img_size, scale=spec.scale, ratio=spec.ratio,
                             interpolation=interp, antialias=True),
        v2.RandomHorizontalFlip(spec.hflip),
    ])


def sample_transform(specs: ViewSpec | list[ViewSpec]):
    """Per-image version of the crop + flip for DataLoader workers (uint8 in, uint8 out).

    The photometric ops are not applied here: they run batched on the device
    (``BatchViews.finish``).

    Args:
        specs: one spec, or one per view.

    Returns:
        For one spec, a callable uint8 [C, H, W] -> uint8 [C, s, s]. For a list, a callable
        returning a tuple of crops, one per spec, each of its spec's size (DINO's local crops are
        smaller), so that the default collate yields a list of batches [B, C, s_i, s_i].
    """
    if isinstance(specs, ViewSpec):
        return _crop_transform(specs)
    return _Views([_crop_transform(s) for s in specs])
