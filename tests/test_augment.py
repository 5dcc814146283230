"""Batched views: crop boxes follow torchvision's RandomResizedCrop rule, resampling is exact
where it can be checked by hand, the photometric ops equal torchvision's functional ops at fixed
factors, and MAE's views (no photometric op) are unchanged by them."""

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import RandomResizedCrop

from mae_bench.data import augment
from mae_bench.data.augment import (
    BatchViews,
    ViewSpec,
    color_jitter,
    crop_boxes,
    eval_resize,
    gaussian_blur,
    random_grayscale,
    resized_crops,
    solarize,
)


def test_boxes_inside_image_and_within_scale_and_ratio():
    g = torch.Generator().manual_seed(0)
    boxes = crop_boxes(4000, 32, 24, (0.2, 1.0), (3 / 4, 4 / 3), g)
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 32).all() and (left + w <= 24).all()
    assert (h >= 1).all() and (w >= 1).all()
    frac = h * w / (32 * 24)
    # rounding to whole pixels moves the area a little beyond the sampled range
    assert frac.min() > 0.15 and frac.max() <= 1.0
    assert torch.equal(boxes, boxes.round())


def test_boxes_match_torchvision_distribution():
    n = 20000
    g = torch.Generator().manual_seed(1)
    ours = crop_boxes(n, 32, 32, (0.2, 1.0), (3 / 4, 4 / 3), g)
    torch.manual_seed(1)
    img = torch.zeros(1, 32, 32)
    ref = torch.tensor([RandomResizedCrop.get_params(img, [0.2, 1.0], [3 / 4, 4 / 3])
                        for _ in range(n)], dtype=torch.float)  # (i, j, h, w)
    for col in range(4):
        a, b = ours[:, col], ref[:, col]
        assert abs(a.mean() - b.mean()) < 0.15, col
        assert abs(a.std() - b.std()) < 0.15, col


def test_impossible_scale_falls_back_to_centre_crop():
    boxes = crop_boxes(5, 20, 40, (2.0, 3.0), (3 / 4, 4 / 3))
    # width/height = 2 > 4/3: torchvision keeps the full height and width = round(20 * 4/3)
    expected = torch.tensor([(40 - 27) // 2, 27.0])
    assert torch.equal(boxes[:, 0], torch.zeros(5))
    assert torch.equal(boxes[:, 1], torch.full((5,), float(expected[0])))
    assert torch.equal(boxes[:, 2:], torch.tensor([[20.0, 27.0]]).expand(5, 2))


def test_full_box_is_identity_and_flip_is_flip():
    x = torch.rand(2, 3, 8, 8)
    full = torch.tensor([[0.0, 0.0, 8.0, 8.0]] * 2)
    same = resized_crops(x, full, 8, mode="bilinear")
    assert torch.allclose(same, x, atol=1e-5)
    flipped = resized_crops(x, full, 8, flip=torch.tensor([True, False]), mode="bilinear")
    assert torch.allclose(flipped[0], x[0].flip(-1), atol=1e-5)
    assert torch.allclose(flipped[1], x[1], atol=1e-5)


def test_crop_then_resize_matches_interpolate():
    x = torch.rand(1, 1, 16, 16)
    box = torch.tensor([[4.0, 2.0, 8.0, 8.0]])  # top 4, left 2, 8 x 8
    ours = resized_crops(x, box, 16, mode="bilinear")
    ref = F.interpolate(x[:, :, 4:12, 2:10], size=16, mode="bilinear", align_corners=False)
    # inside the crop both sample the same points; at its edge grid_sample may read the
    # neighbouring source pixels, which interpolate (clamping to the crop) cannot see
    assert torch.allclose(ours[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=1e-5)


def test_batch_views_shape_range_and_determinism():
    images = torch.randint(0, 256, (6, 3, 12, 12), dtype=torch.uint8)
    views = BatchViews(ViewSpec(img_size=16), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    a = views(images, torch.Generator().manual_seed(3))
    b = views(images, torch.Generator().manual_seed(3))
    c = views(images, torch.Generator().manual_seed(4))
    assert a.shape == (6, 3, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    lo, hi = (0 - 0.5) / 0.25, (1 - 0.5) / 0.25
    assert a.min() >= lo - 1e-6 and a.max() <= hi + 1e-6


def test_normalize_and_eval_resize():
    views = BatchViews(ViewSpec(img_size=4), (0.5,), (0.5,))
    x = torch.full((1, 1, 4, 4), 255.0)
    assert torch.allclose(views.normalize(x), torch.ones(1, 1, 4, 4))
    u8 = torch.full((2, 1, 8, 8), 128, dtype=torch.uint8)
    up = eval_resize(u8, 16)
    assert up.shape == (2, 1, 16, 16) and torch.allclose(up, torch.full_like(up, 128.0))


@pytest.mark.parametrize("ratio", [(0.5, 2.0), (3 / 4, 4 / 3)])
def test_aspect_ratios_in_range(ratio):
    boxes = crop_boxes(2000, 64, 64, (0.3, 0.6), ratio, torch.Generator().manual_seed(5))
    r = boxes[:, 3] / boxes[:, 2]
    # whole-pixel rounding widens the range by at most one pixel on each side
    assert r.min() >= ratio[0] * 0.85 and r.max() <= ratio[1] / 0.85
    assert math.isclose(float(torch.log(r).mean()), sum(map(math.log, ratio)) / 2, abs_tol=0.05)


# ------------------------------------------------------------------------ photometric ops


def _images(n: int = 4, c: int = 3, size: int = 12, seed: int = 0) -> torch.Tensor:
    """Random float images in [0, 1] with the corner cases of RGB -> HSV: grey pixels, and
    maxima shared by two channels (red-green, green-blue)."""
    x = torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed))
    if c == 3:
        x[0, :, :3, :3] = 0.4  # grey
        x[1, 1, :3] = x[1, 0, :3]  # r == g
        x[2, 2, :3] = x[2, 1, :3]  # g == b
        x[3, :, -2:] = 0.0  # black
    return x


def _per_image(fn, x: torch.Tensor, factors: list[float]) -> torch.Tensor:
    return torch.stack([fn(x[i], f) for i, f in enumerate(factors)])


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("kernel, reference, factors, atol", [
    (augment._brightness_, TF.adjust_brightness, [0.0, 0.6, 1.0, 1.8], 1e-6),
    (augment._contrast_, TF.adjust_contrast, [0.0, 0.6, 1.0, 1.8], 1e-5),
    (augment._saturation_, TF.adjust_saturation, [0.0, 0.6, 1.0, 1.8], 1e-5),
    (augment._hue, TF.adjust_hue, [-0.5, -0.13, 0.21, 0.5], 1e-5),
], ids=["brightness", "contrast", "saturation", "hue"])
def test_colour_ops_match_torchvision(kernel, reference, factors, atol, channels):
    x = _images(c=channels)
    ours = kernel(x.clone(), torch.tensor(factors))
    ref = _per_image(reference, x, factors)
    assert ours.shape == x.shape
    assert torch.allclose(ours, ref, atol=atol, rtol=0)
    if channels == 3 or reference in (TF.adjust_brightness, TF.adjust_contrast):
        assert not torch.allclose(ours, x, atol=1e-3)  # the factors did change something


def test_hue_shift_by_a_full_turn_is_identity_and_keeps_min_and_max():
    x = _images()
    same = augment._hue(x, torch.tensor([1.0, -1.0, 0.0, 1.0]))
    assert torch.allclose(same, x, atol=1e-5)
    shifted = augment._hue(x, torch.full((4,), 0.3))
    assert torch.allclose(shifted.amax(1), x.amax(1), atol=1e-6)
    assert torch.allclose(shifted.amin(1), x.amin(1), atol=1e-6)


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_gaussian_blur_matches_torchvision(kernel_size):
    x = _images(size=9)
    sigmas = [0.1, 0.7, 1.3, 2.0]
    ours = augment._gaussian_blur(x, torch.tensor(sigmas), kernel_size)
    ref = _per_image(lambda im, s: TF.gaussian_blur(im, [kernel_size] * 2, [s, s]), x, sigmas)
    assert torch.allclose(ours, ref, atol=1e-6, rtol=0)
    # always-on blur through the public op, sigma fixed by a one-point range
    assert torch.allclose(gaussian_blur(x, (0.7, 0.7), kernel_size, p=1.0),
                          _per_image(lambda im, s: TF.gaussian_blur(im, [kernel_size] * 2, [s, s]),
                                     x, [0.7] * 4), atol=1e-6, rtol=0)


def test_grayscale_and_solarize_match_torchvision():
    x = _images()
    assert torch.allclose(random_grayscale(x, 1.0), TF.rgb_to_grayscale(x, 3), atol=1e-6)
    assert torch.equal(solarize(x, 1.0), TF.solarize(x, 0.5))
    one = _images(c=1)
    assert torch.equal(random_grayscale(one, 1.0), one)


def _all_ops(x: torch.Tensor, p: float, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [color_jitter(x, 0.4, 0.4, 0.4, 0.1, p, g), random_grayscale(x, p, g),
            gaussian_blur(x, (0.5, 2.0), 3, p, g), solarize(x, p, g)]


def test_probability_zero_keeps_and_one_changes_every_image():
    x = _images(8)
    before = x.clone()
    for out in _all_ops(x, 0.0, seed=1):
        assert torch.equal(out, x)
    for out in _all_ops(x, 1.0, seed=1):
        changed = (out - x).flatten(1).abs().amax(1) > 1e-3  # [N]
        assert changed.all()
    assert torch.equal(x, before)  # the ops never write into their input


def test_ops_pick_images_with_probability_p():
    x = _images(300, size=6)
    for out in _all_ops(x, 0.3, seed=2):
        changed = (out - x).flatten(1).abs().amax(1) > 0  # [N]
        assert 0.2 < changed.float().mean() < 0.4
        # an image is either left exactly as it was or changed as a whole
        kept = ~changed
        assert torch.equal(out[kept], x[kept])


def test_jitter_factors_are_per_image_and_in_range():
    x = torch.full((300, 3, 4, 4), 0.25)  # brightness only: no clamping at 0.25 * 1.5
    out = color_jitter(x, 0.5, 0.0, 0.0, 0.0, 1.0, torch.Generator().manual_seed(3))
    factor = out / x  # [N, C, H, W], constant within an image
    assert torch.allclose(factor, factor[:, :1, :1, :1].expand_as(factor), atol=1e-6)
    f = factor[:, 0, 0, 0]
    assert f.min() >= 0.5 - 1e-6 and f.max() <= 1.5 + 1e-6
    assert f.std() > 0.2  # uniform on [0.5, 1.5] has std 0.29


def test_same_seed_same_output_and_one_channel_batches():
    x = _images(6)
    a, b, c = (_all_ops(x, 0.5, seed) for seed in (4, 4, 5))
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert any(not torch.equal(u, v) for u, v in zip(a, c, strict=True))
    one = _images(6, c=1)
    # no colour: saturation and hue leave a 1-channel image alone, grayscale too
    g = torch.Generator().manual_seed(6)
    assert torch.equal(color_jitter(one, 0.0, 0.0, 0.8, 0.5, 1.0, g), one)
    spec = ViewSpec(8, color_jitter=1.0, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1,
                    grayscale=1.0, blur=1.0, solarize=1.0)
    views = BatchViews(spec, (0.5,), (0.5,))
    u8 = torch.randint(0, 256, (6, 1, 10, 10), dtype=torch.uint8)
    out = views(u8, torch.Generator().manual_seed(7))
    assert out.shape == (6, 1, 8, 8) and torch.isfinite(out).all()
    assert torch.equal(out, views(u8, torch.Generator().manual_seed(7)))


# ------------------------------------------------------------------------ specs and views


def test_blur_kernel_size_is_simclrs_rule():
    sizes = {8: 3, 32: 3, 64: 7, 96: 9, 100: 11, 224: 23}
    assert {s: ViewSpec(s).blur_kernel_size for s in sizes} == sizes


def test_default_spec_has_no_photometric_op_and_bad_values_are_errors():
    assert not ViewSpec(32).photometric
    assert not ViewSpec(32, color_jitter=0.8).photometric  # jitter of strength 0 is a no-op
    assert ViewSpec(32, solarize=0.2).photometric
    with pytest.raises(ValueError, match=r"ViewSpec.hue must be in \[0, 0.5\], got 0.6"):
        ViewSpec(32, hue=0.6)
    with pytest.raises(ValueError, match=r"ViewSpec.blur is a probability in \[0, 1\], got 2"):
        ViewSpec(32, blur=2)


def _old_batch_views(images, spec, mean, std, generator):
    """BatchViews.__call__ as it was before the photometric ops (crop + flip + normalise)."""
    n, _, height, width = images.shape
    x = images.float()
    boxes = crop_boxes(n, height, width, spec.scale, spec.ratio, generator, images.device)
    flip = torch.rand(n, generator=generator, device=images.device) < spec.hflip
    x = resized_crops(x, boxes, spec.img_size, flip, spec.interpolation).clamp_(0, 255)
    return (x / 255.0 - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def test_mae_views_are_unchanged():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 12, 12), dtype=torch.uint8, generator=g)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    ours_gen, old_gen = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    ours = BatchViews(ViewSpec(img_size=16), mean, std)(images, ours_gen)
    assert torch.equal(ours, _old_batch_views(images, ViewSpec(16), mean, std, old_gen))
    # no extra random numbers were drawn ...
    assert torch.equal(torch.rand(3, generator=ours_gen), torch.rand(3, generator=old_gen))
    # ... and the numbers equal those computed before the photometric ops were added
    assert math.isclose(ours.double().sum().item(), 1682.0870630061254, rel_tol=1e-6)
    assert math.isclose(ours.double().square().sum().item(), 7205.057024966214, rel_tol=1e-6)


def test_batch_views_apply_jitter_grayscale_blur_solarize_in_that_order():
    spec = ViewSpec(10, color_jitter=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1,
                    grayscale=0.2, blur=0.5, solarize=0.2)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    images = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8)
    ours = BatchViews(spec, mean, std)(images, torch.Generator().manual_seed(8))
    g = torch.Generator().manual_seed(8)
    boxes = crop_boxes(16, 12, 12, spec.scale, spec.ratio, g)
    flip = torch.rand(16, generator=g) < spec.hflip
    x = resized_crops(images.float(), boxes, 10, flip, spec.interpolation).clamp(0, 255) / 255
    x = color_jitter(x, 0.4, 0.4, 0.2, 0.1, 0.8, g)
    x = solarize(gaussian_blur(random_grayscale(x, 0.2, g), (0.1, 2.0), 3, 0.5, g), 0.2, g)
    ref = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_finish_normalises_cropped_batches_after_the_photometric_ops():
    crops = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    plain = BatchViews(ViewSpec(8), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert torch.equal(plain.finish(crops), plain.normalize(crops.float()))
    solar = BatchViews(ViewSpec(8, solarize=1.0), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    x = crops.float() / 255
    expected = (torch.where(crops >= 128, 1 - x, x) - 0.5) / 0.25  # 128 / 255 >= 0.5 > 127 / 255
    assert torch.allclose(solar.finish(crops), expected, atol=1e-6)
    assert torch.allclose(solar.finish(crops.float()), expected, atol=1e-6)


# --- random erasing ------------------------------------------------------------------------


def _erased_boxes(before: torch.Tensor, after: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """(top, left, h, w) of the changed pixels of each image, asserting they form one
    rectangle changed in every channel (an independent reading of what was erased)."""
    boxes = []
    for b, a in zip(before, after, strict=True):
        changed = (b != a)  # [C, H, W]
        assert (changed.any(dim=0) == changed.all(dim=0)).all()  # every channel or none
        ys, xs = torch.nonzero(changed[0], as_tuple=True)
        if len(ys) == 0:
            boxes.append((0, 0, 0, 0))
            continue
        top, left = int(ys.min()), int(xs.min())
        h, w = int(ys.max()) - top + 1, int(xs.max()) - left + 1
        assert int(changed[0].sum()) == h * w  # a full rectangle, no holes
        boxes.append((top, left, h, w))
    return boxes


def test_random_erasing_fills_one_rectangle_of_the_paper_size_with_noise():
    x = torch.zeros(400, 3, 16, 16)
    out = augment.random_erasing(x.clone(), 1.0, torch.Generator().manual_seed(0))
    boxes = _erased_boxes(x, out)
    areas = torch.tensor([h * w for _, _, h, w in boxes], dtype=torch.float) / 256
    assert (areas > 0).float().mean() > 0.95  # p = 1: nearly every image (ten tries can miss)
    hit = areas > 0
    # timm's bounds: area 2-33 % of the image (rounded sides), aspect 0.3-3.3, strictly inside
    assert areas[hit].min() >= 0.02 * 0.5 and areas[hit].max() <= 1 / 3 * 1.5
    assert all(h < 16 and w < 16 for _, _, h, w in boxes)
    noise = out[out != 0]
    assert abs(float(noise.mean())) < 0.05 and abs(float(noise.std()) - 1.0) < 0.05


def test_random_erasing_probability_and_determinism():
    x = torch.zeros(4000, 1, 8, 8)
    out = augment.random_erasing(x.clone(), 0.25, torch.Generator().manual_seed(1))
    erased = (out != 0).flatten(1).any(dim=1).float().mean()
    assert abs(float(erased) - 0.25) < 0.03
    again = augment.random_erasing(x.clone(), 0.25, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


def test_random_erasing_off_changes_nothing_and_draws_nothing():
    gen = torch.Generator().manual_seed(2)
    state = gen.get_state()
    x = torch.randn(8, 3, 16, 16)
    out = augment.random_erasing(x.clone(), 0.0, gen)
    assert torch.equal(out, x) and torch.equal(gen.get_state(), state)
