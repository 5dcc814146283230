"""Batched RandAugment: each op against timm's PIL implementation of it (the reference MAE's
fine-tuning uses), the policy string, the draw probabilities, determinism, and its place in
the fine-tuning views."""

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import auto_augment as aa

from mae_bench.data.augment import BatchViews, ViewSpec, crop_boxes
from mae_bench.data.randaugment import (
    _OPS,
    INCREASING_OPS,
    PAPER_POLICY,
    RandAugmentSpec,
    rand_augment,
)
from mae_bench.errors import ConfigError

PAPER = RandAugmentSpec.parse(PAPER_POLICY)
ORIGINAL = RandAugmentSpec(increasing=False)
FILL = (124, 116, 104)  # timm's img_mean for ImageNet: round(255 * mean)


def _images(n: int, channels: int, size: int = 20, seed: int = 0) -> torch.Tensor:
    """Smooth-ish random uint8 images (a gradient plus noise), float 0..255 [N, C, S, S]."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(20, 220, size).view(1, 1, 1, size)
    noise = torch.randint(-20, 21, (n, channels, size, size), generator=g)
    return (ramp + noise).clamp(0, 255).round()


def _pil(x: torch.Tensor) -> Image.Image:
    arr = x.to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)


def _back(img: Image.Image, channels: int) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.float32)
    arr = arr[..., None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr).permute(2, 0, 1)[:channels]


def _ours(name: str, x: torch.Tensor, level: float, sign: float, spec: RandAugmentSpec,
          fill=FILL) -> torch.Tensor:
    n, c = x.shape[:2]
    fill_t = torch.tensor(fill[:c], dtype=x.dtype).view(1, -1, 1, 1)
    return _OPS[name](x, torch.full((n,), level), torch.full((n,), sign), fill_t, spec)


# (our op name, timm's PIL function, its argument from timm's level rule at level 0.7 / sign +)
LEVEL, M = 0.7, 7.0
PHOTOMETRIC = [
    ("AutoContrast", aa.auto_contrast, ()),
    ("Equalize", aa.equalize, ()),
    ("Invert", aa.invert, ()),
    ("PosterizeIncreasing", aa.posterize, aa._posterize_increasing_level_to_arg(M, {})),
    ("SolarizeIncreasing", aa.solarize, aa._solarize_increasing_level_to_arg(M, {})),
    ("SolarizeAdd", aa.solarize_add, aa._solarize_add_level_to_arg(M, {})),
    ("ColorIncreasing", aa.color, (1 + 0.9 * LEVEL,)),
    ("ContrastIncreasing", aa.contrast, (1 + 0.9 * LEVEL,)),
    ("BrightnessIncreasing", aa.brightness, (1 + 0.9 * LEVEL,)),
    ("SharpnessIncreasing", aa.sharpness, (1 + 0.9 * LEVEL,)),
]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name,reference,args", PHOTOMETRIC, ids=[p[0] for p in PHOTOMETRIC])
def test_photometric_ops_equal_timms_pil_ops(name, reference, args, channels):
    x = _images(4, channels)
    ours = _ours(name, x, LEVEL, 1.0, PAPER)
    theirs = torch.stack([_back(reference(_pil(im), *args), channels) for im in x])
    # PIL rounds some blends with integer arithmetic: at most one grey level apart
    assert (ours - theirs).abs().max() <= 1.0, name
    assert (ours - theirs).abs().mean() < 0.05, name


def test_original_variants_use_timms_decreasing_levels():
    x = _images(3, 3)
    for name, reference, arg in [
        ("Posterize", aa.posterize, aa._posterize_level_to_arg(M, {})),
        ("Solarize", aa.solarize, aa._solarize_level_to_arg(M, {})),
        ("Contrast", aa.contrast, aa._enhance_level_to_arg(M, {})),
    ]:
        ours = _ours(name, x, LEVEL, 1.0, ORIGINAL)
        theirs = torch.stack([_back(reference(_pil(im), *arg), 3) for im in x])
        assert (ours - theirs).abs().max() <= 1.0, name


def test_posterize_to_zero_bits_is_black():
    # level 10 of the increasing rule keeps 0 bits: black (the Pillow here refuses 0 bits)
    out = _ours("PosterizeIncreasing", _images(2, 3), 1.0, 1.0, PAPER)
    assert torch.equal(out, torch.zeros_like(out))


GEOMETRIC = [
    ("Rotate", aa.rotate, LEVEL * 30),
    ("ShearX", aa.shear_x, LEVEL * 0.3),
    ("ShearY", aa.shear_y, LEVEL * 0.3),
    ("TranslateXRel", aa.translate_x_rel, LEVEL * 0.45),
    ("TranslateYRel", aa.translate_y_rel, LEVEL * 0.45),
]


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("name,reference,arg", GEOMETRIC, ids=[g[0] for g in GEOMETRIC])
def test_geometric_ops_move_pixels_as_pil_does(name, reference, arg, sign):
    # Bicubic kernels differ (PIL a = -0.5, torch -0.75), so compare where it matters: the
    # pixels PIL fills are ours too, and the moved content agrees to a few grey levels.
    x = _images(3, 3, size=24)
    ours = _ours(name, x, LEVEL, sign, PAPER)
    theirs = torch.stack([_back(reference(_pil(im), sign * arg, fillcolor=FILL,
                                          resample=Image.BICUBIC), 3) for im in x])
    filled = (theirs == torch.tensor(FILL, dtype=x.dtype).view(3, 1, 1)).all(1)  # [N, H, W]
    ours_filled = (ours == torch.tensor(FILL, dtype=x.dtype).view(3, 1, 1)).all(1)
    agree = (filled == ours_filled).float().mean()
    assert agree > 0.97, (name, float(agree))
    inside = ~filled & ~ours_filled
    assert (ours - theirs).abs().permute(1, 0, 2, 3)[:, inside].mean() < 6.0, name


def test_integer_translation_is_an_exact_shift():
    x = _images(2, 1, size=20)
    # 0.45 x 20 px x level 1/0.45 ... pick a level that moves by exactly 9 px: 9 / (0.45 x 20)
    out = _ours("TranslateXRel", x, 1.0, 1.0, PAPER, fill=(50,))
    assert torch.equal(out[..., :, :11], x[..., :, 9:])  # content moves left by 9 px
    assert (out[..., :, 11:] == 50).all()  # the uncovered columns are the fill


def test_policy_string():
    assert PAPER == RandAugmentSpec(magnitude=9.0, magnitude_std=0.5, num_ops=2, prob=0.5,
                                    increasing=True)
    assert PAPER.ops == INCREASING_OPS and len(PAPER.ops) == 15
    assert RandAugmentSpec.parse("rand-m5-n3-p0.8-inc0") == RandAugmentSpec(
        magnitude=5.0, magnitude_std=0.0, num_ops=3, prob=0.8, increasing=False)
    assert RandAugmentSpec.parse(PAPER.name()) == PAPER
    with pytest.raises(ConfigError, match="must start with 'rand'"):
        RandAugmentSpec.parse("augmix-m9")
    with pytest.raises(ConfigError, match="cannot read 'q3'"):
        RandAugmentSpec.parse("rand-m9-q3")
    with pytest.raises(ConfigError, match="m must be in 0..10"):
        RandAugmentSpec.parse("rand-m12")


def test_probability_zero_changes_nothing_and_draws_are_fixed_per_batch():
    x = _images(64, 3)
    g = torch.Generator().manual_seed(0)
    out = rand_augment(x, RandAugmentSpec(prob=0.0), FILL, g)
    assert torch.equal(out, x)
    # the same number of draws whatever the images: two batches of equal size leave the
    # generator in the same state
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    rand_augment(_images(64, 3, seed=1), PAPER, FILL, g1)
    rand_augment(_images(64, 3, seed=2), PAPER, FILL, g2)
    assert torch.equal(g1.get_state(), g2.get_state())


def test_paper_policy_changes_three_quarters_of_images_deterministically():
    x = _images(2000, 3, size=16)
    a = rand_augment(x, PAPER, FILL, torch.Generator().manual_seed(3))
    b = rand_augment(x, PAPER, FILL, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.equal(a, a.round()) and a.min() >= 0 and a.max() <= 255
    changed = (a != x).flatten(1).any(1).float().mean()
    # two ops at p 0.5: 1 - 0.5^2 = 75 % of the images get at least one op; a few ops can
    # leave an image as it was (equalize / autocontrast of an already spread image)
    assert 0.68 < changed < 0.78, float(changed)


def test_fine_tuning_views_apply_it_after_the_crop_and_before_normalising():
    images = _images(16, 3, size=8).to(torch.uint8)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    plain = BatchViews(ViewSpec(8, scale=(1.0, 1.0), hflip=0.0), mean, std)
    ra = BatchViews(ViewSpec(8, scale=(1.0, 1.0), hflip=0.0, rand_augment=PAPER), mean, std)
    x = plain(images, torch.Generator().manual_seed(0))
    y = ra(images, torch.Generator().manual_seed(0))
    # the views draw the crop boxes and flips first; replay those draws to line the generator up
    g = torch.Generator().manual_seed(0)
    crop_boxes(16, 8, 8, (1.0, 1.0), (3 / 4, 4 / 3), g)
    torch.rand(16, generator=g)  # the flip draws
    expected = rand_augment(images.float(), PAPER, (128, 128, 128), g)
    assert torch.allclose(y, (expected / 255 - 0.5) / 0.25, atol=1e-5)
    assert not torch.allclose(x, y)


def test_streamed_batches_get_it_too_and_are_left_as_they_were():
    # finish() (batches cropped in DataLoader workers) applies the same policy, first in line
    images = _images(16, 3, size=8)
    before = images.clone()
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    views = BatchViews(ViewSpec(8, rand_augment=PAPER), mean, std)
    y = views.finish(images, torch.Generator().manual_seed(0))
    expected = rand_augment(images, PAPER, (128, 128, 128), torch.Generator().manual_seed(0))
    assert torch.allclose(y, (expected / 255 - 0.5) / 0.25, atol=1e-5)
    assert torch.equal(images, before)
