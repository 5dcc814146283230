"""Batched views: crop boxes follow torchvision's RandomResizedCrop rule, resampling is exact
where it can be checked by hand."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import RandomResizedCrop

from mae_bench.augment import BatchViews, ViewSpec, crop_boxes, eval_resize, resized_crops


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
