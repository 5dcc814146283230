"""The streamed data path split between workers and device (mae_bench/data/pipeline.py and
crops.py): torchvision's crop draws exactly, the same pixels as the all-in-workers path for the
same box, DCT-scaled decodes within interpolation tolerance, unreadable files counted."""

from __future__ import annotations

import io
import logging
import math
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from mae_bench.data.augment import BatchViews, ViewSpec
from mae_bench.data.crops import CropBatch, EncodedBatch
from mae_bench.data.pipeline import (
    DecodeCrop,
    ReadBoxes,
    collate_crops,
    collate_encoded,
    dct_scale,
    resolve_pipeline,
    sample_box,
    sample_flip,
    scaled_box,
    worker_transform,
)


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth RGB test image [h, w, 3] (gradients and a few blobs: JPEG-friendly, so the
    tolerance checks measure the resize, not the codec's noise)."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    rng = np.random.default_rng(seed)
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(1, 4, 3)
        channels.append(127 + 100 * np.sin(2 * np.pi * (fx * x + fy * y) + phase))
    return np.stack(channels, -1).clip(0, 255).astype(np.uint8)


def _encode(array: np.ndarray, fmt: str, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.mark.parametrize("size", [(37, 53), (300, 200), (20, 400), (400, 20), (1, 1)])
def test_crop_boxes_and_flips_are_torchvisions_draws_exactly(size: tuple[int, int]) -> None:
    """The same random calls in the same order: for every seed, the box torchvision's
    RandomResizedCrop would cut (extreme aspect ratios reach its centre-crop fallback)."""
    h, w = size
    crop = v2.RandomResizedCrop(8, scale=(0.2, 1.0))
    flip = v2.RandomHorizontalFlip(0.5)
    image = torch.zeros(3, h, w, dtype=torch.uint8)
    flips = []
    for seed in range(60):
        torch.manual_seed(seed)
        want = crop.make_params([image])
        torch.manual_seed(seed)
        assert sample_box(h, w, (0.2, 1.0), (3 / 4, 4 / 3)) == (
            want["top"], want["left"], want["height"], want["width"])
        torch.manual_seed(seed)
        pixels = torch.arange(2).view(1, 1, 2)
        flipped = not torch.equal(flip(pixels), pixels)
        torch.manual_seed(seed)
        assert sample_flip(0.5) == flipped
        flips.append(flipped)
    assert 10 < sum(flips) < 50  # both outcomes drawn


def test_dct_scale_keeps_every_box_twice_its_output_size() -> None:
    assert dct_scale([(0, 0, 900, 1000)], [224]) == 1  # 4x room only: 1/4 would leave 225
    assert dct_scale([(0, 0, 900, 1000)], [112]) == 4
    assert dct_scale([(0, 0, 900, 1000)], [56]) == 8
    assert dct_scale([(0, 0, 500, 600), (0, 0, 100, 100)], [56, 12]) == 4  # the tightest view
    assert dct_scale([(0, 0, 500, 600), (0, 0, 100, 100)], [56, 16]) == 1
    for box in [(13, 7, 451, 333), (0, 0, 1000, 900), (599, 399, 1, 1)]:
        t, left, h, w = scaled_box(box, 4, 250, 225)  # image 1000 x 900 at 1/4
        assert 0 <= t < 250 and 0 <= left < 225 and h >= 1 and w >= 1
        assert t + h <= 250 and left + w <= 225
        assert abs(4 * t - box[0]) <= 2 and abs(4 * (t + h) - min(1000, box[0] + box[2])) <= 4


def _through(transform, collate, data: list[bytes], specs: list[ViewSpec]) -> list[torch.Tensor]:
    """Worker transform, collate and the device's resize: uint8 [B, C, s, s] per view."""
    samples = [(transform(d, f"img{i}", i), i) for i, d in enumerate(data)]
    views, labels = collate(samples)
    assert labels.tolist() == list(range(len(data)))
    return [v.to("cpu").resize(s.img_size, s.interpolation)
            for v, s in zip(views, specs, strict=True)]


def _reference(array: np.ndarray, boxes: list[tuple], flips: list[bool], spec: ViewSpec):
    """torchvision's resized crop of the full-resolution image for the same boxes (the
    all-in-workers path's kernel): uint8 [B, C, s, s]."""
    mode = InterpolationMode.BICUBIC if spec.interpolation == "bicubic" else \
        InterpolationMode.BILINEAR
    chw = torch.from_numpy(np.array(array)).permute(2, 0, 1)
    out = []
    for (t, left, h, w), f in zip(boxes, flips, strict=True):
        crop = TF.resized_crop(chw, t, left, h, w, [spec.img_size] * 2, mode, antialias=True)
        out.append(crop.flip(-1) if f else crop)
    return torch.stack(out)


def _draws(transform: DecodeCrop, sizes: list[tuple[int, int]]) -> list[tuple[list, list]]:
    return [transform._draw(h, w, i) for i, (h, w) in enumerate(sizes)]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_device_resize_gives_the_all_in_workers_pixels_for_the_same_boxes(fmt: str) -> None:
    """Without DCT scaling (the boxes leave less than 4x room) the crop is cut from the
    full-resolution decode and resized with torchvision's kernel: the very pixels of
    ``v2.RandomResizedCrop`` on that box. For JPEG the decoders may differ (PIL / libjpeg-turbo
    through torchvision): a level at most."""
    specs = [ViewSpec(24), ViewSpec(16, scale=(0.05, 0.4), interpolation="bilinear")]
    arrays = [_photo(40 + 3 * i, 50 - 2 * i, i) for i in range(6)]
    data = [_encode(a, fmt) for a in arrays]
    for transform, collate in ((DecodeCrop(specs), collate_crops),
                               (ReadBoxes(specs), collate_encoded)):
        transform.epoch_seed = 11
        out = _through(transform, collate, data, specs)
        draws = _draws(transform, [a.shape[:2] for a in arrays])
        for v, spec in enumerate(specs):
            decoded = [np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for d in data]
            want = torch.stack([_reference(a, [b[v]], [f[v]], spec)[0]
                                for a, (b, f) in zip(decoded, draws, strict=True)])
            assert out[v].shape == (6, 3, spec.img_size, spec.img_size)
            diff = (out[v].int() - want.int()).abs()
            assert int(diff.max()) <= (0 if fmt == "PNG" else 2), (transform, v)
    # the workers pipeline: the same decode, cut and kernel in the worker, so the same pixels
    done = DecodeCrop(specs, resize=True)
    done.epoch_seed = 11
    finished = [done(d, f"img{i}", i) for i, d in enumerate(data)]
    for v in range(len(specs)):
        assert torch.equal(torch.stack([f[v] for f in finished]), out[v])


@pytest.mark.parametrize("size", [16, 24, 48])
def test_dct_scaled_decode_agrees_with_the_full_resolution_path_within_tolerance(size) -> None:
    """Large boxes and a small output: the JPEG is decoded at 1/4 or 1/8 scale, the box's edges
    rounded to the reduced pixels (at most s / 2 full-resolution pixels off: a quarter of an
    output pixel), then resized. For the box it actually cut, its pixels are within half a
    level on average of the full-resolution resized crop: far below what two standard
    interpolations (bilinear and bicubic) of that crop differ by."""
    spec = ViewSpec(size, scale=(0.3, 1.0))
    arrays = [_photo(960, 1280, i) for i in range(4)]
    data = [_encode(a, "JPEG") for a in arrays]
    decoded = [np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for d in data]
    transform = DecodeCrop([spec])
    transform.epoch_seed = 3
    draws = _draws(transform, [(960, 1280)] * 4)
    (out,) = _through(transform, collate_crops, data, [spec])
    cut = []
    for (box,), _ in draws:
        s = dct_scale([box], [size])
        assert s in (4, 8)
        t, left, h, w = scaled_box(box, s, 960 // s, 1280 // s)
        cut.append((s * t, s * left, s * h, s * w))  # the box in full-resolution pixels
        for drawn, kept in zip((box[0], box[1], box[0] + box[2], box[1] + box[3]),
                               (s * t, s * left, s * (t + h), s * (left + w)), strict=True):
            assert abs(drawn - kept) <= s / 2
    flips = [f[0] for _, f in draws]
    want = torch.stack([_reference(a, [b], [f], spec)[0]
                        for a, b, f in zip(decoded, cut, flips, strict=True)])
    bilinear = ViewSpec(size, scale=(0.3, 1.0), interpolation="bilinear")
    other = torch.stack([_reference(a, [b], [f], bilinear)[0]
                         for a, b, f in zip(decoded, cut, flips, strict=True)])
    diff = float((out.float() - want.float()).abs().mean())
    assert diff < 0.5 and diff < float((other.float() - want.float()).abs().mean()) / 2, diff
    # a wrong box (the flip forgotten, or the box not scaled) is far off
    assert float((out.flip(-1).float() - want.float()).abs().mean()) > 10 * diff


def test_gray_palette_and_cmyk_files_come_out_rgb() -> None:
    spec = ViewSpec(12)
    rgb = _photo(30, 40)
    gray = _encode(rgb[..., 0], "JPEG")
    palette_buf = io.BytesIO()
    Image.fromarray(rgb).convert("P").save(palette_buf, "PNG", transparency=0)
    cmyk_buf = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(cmyk_buf, "JPEG")
    data = [gray, palette_buf.getvalue(), cmyk_buf.getvalue()]
    for transform, collate in ((DecodeCrop([spec]), collate_crops),
                               (ReadBoxes([spec]), collate_encoded)):
        (out,) = _through(transform, collate, data, [spec])
        assert out.shape == (3, 3, 12, 12) and out.dtype == torch.uint8
        assert torch.equal(out[0, 0], out[0, 1]) and torch.equal(out[0, 1], out[0, 2])  # gray


def test_unreadable_files_are_warned_and_skipped(caplog: pytest.LogCaptureFixture) -> None:
    spec = ViewSpec(12)
    good = _encode(_photo(200, 300), "JPEG")
    truncated = good[: len(good) // 2]  # a header that reads, data that does not
    with caplog.at_level(logging.WARNING, logger="mae_bench.data"):
        assert DecodeCrop([spec])(b"not an image", "x/bad.jpg", 0) is None
        assert ReadBoxes([spec])(b"", "x/empty.jpg", 0) is None
        assert DecodeCrop([spec])(truncated, "x/cut.jpg", 1) is None
    assert "x/bad.jpg (UnidentifiedImageError" in caplog.text
    assert "x/empty.jpg (UnidentifiedImageError: empty file)" in caplog.text
    assert "x/cut.jpg (OSError" in caplog.text
    # decoded on the device: the broken file is replaced by a readable one of its batch
    samples = [(ReadBoxes([spec])(d, f"f{i}", i), i) for i, d in enumerate([good, truncated])]
    assert samples[1][0] is not None  # the worker read its header only
    views, _ = collate_encoded(samples)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mae_bench.data"):
        out = views[0].resize(12)
    assert "could not be decoded on the device" in caplog.text
    assert out.shape == (2, 3, 12, 12) and views[0].batch._broken == [1]


def test_crop_batches_pack_crops_of_different_sizes_and_flip_after_the_resize() -> None:
    crops = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in [(5, 7), (9, 4)]]
    batch = CropBatch.pack(crops, [False, True])
    assert batch.pixels.numel() == 3 * (35 + 36) and len(batch) == 2
    assert all(torch.equal(a, b) for a, b in zip(batch.crops(), crops, strict=True))
    out = batch.resize(6, "bilinear")
    want = [TF.resize(c, [6, 6], InterpolationMode.BILINEAR, antialias=True) for c in crops]
    assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1].flip(-1))
    pinned_or_same = batch.to("cpu")
    assert torch.equal(pinned_or_same.pixels, batch.pixels)


def test_finish_resizes_crop_batches_then_normalises() -> None:
    spec = ViewSpec(8)
    crops = [torch.full((3, 10 + i, 12), 60 * i, dtype=torch.uint8) for i in range(3)]
    views = BatchViews(spec, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    out = views.finish(CropBatch.pack(crops, [False] * 3))
    assert out.shape == (3, 3, 8, 8)
    for i in range(3):  # a constant image stays constant: (60 i / 255 - 0.5) / 0.25
        assert torch.allclose(out[i], torch.full_like(out[i], (60 * i / 255 - 0.5) / 0.25),
                              atol=1e-5)


def test_draws_depend_on_the_sample_and_epoch_not_the_worker() -> None:
    spec = ViewSpec(12)
    a, b = DecodeCrop([spec]), pickle.loads(pickle.dumps(DecodeCrop([spec])))
    a.epoch_seed = b.epoch_seed = 7
    assert a._draw(100, 80, 5) == b._draw(100, 80, 5)  # another process, the same crop
    assert a._draw(100, 80, 5) != a._draw(100, 80, 6)
    b.epoch_seed = 8
    assert a._draw(100, 80, 5) != b._draw(100, 80, 5)
    # the box sizes follow RandomResizedCrop's distribution: area fraction ~ U(0.2, 1) where it
    # fits (the mean of the accepted areas is a little under 0.6 for a square image)
    areas = [math.prod(a._draw(200, 200, i)[0][0][2:]) / 200**2 for i in range(2000)]
    assert 0.2 - 1e-3 <= min(areas) and max(areas) <= 1.0 and 0.5 < np.mean(areas) < 0.62


def test_pipeline_names() -> None:
    assert resolve_pipeline(None) == resolve_pipeline("auto") == "device-resize"
    assert resolve_pipeline("device-decode") == "device-decode"
    assert isinstance(worker_transform([ViewSpec(8)], "device-decode")[0], ReadBoxes)
    with pytest.raises(ValueError, match="unknown data pipeline 'gpu'; valid: device-resize"):
        worker_transform([ViewSpec(8)], "gpu")


def test_encoded_batch_decodes_each_image_once_for_all_views() -> None:
    specs = [ViewSpec(8), ViewSpec(6)]
    data = [_encode(_photo(20, 30, i), "JPEG") for i in range(3)]
    samples = [(ReadBoxes(specs)(d, str(i), i), i) for i, d in enumerate(data)]
    views, _ = collate_encoded(samples)
    assert views[0].batch is views[1].batch and isinstance(views[0].batch, EncodedBatch)
    views[0].resize(8)
    first = views[0].batch._decoded
    views[1].resize(6)
    assert views[1].batch._decoded is first  # decoded once
