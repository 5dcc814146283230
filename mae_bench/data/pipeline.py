"""The streamed data path: what the DataLoader workers do with each image file, what is left for
the training device, and how a batch is put together in between.

Four splits of the work (``data.pipeline``; auto: ``device-resize``, on a GPU and on the CPU):

- ``device-resize``: a worker reads the file's header, draws each view's crop box and flip,
  decodes only the boxes' region of a JPEG (libjpeg-turbo through ``jpeg_region``, at 1/4 or
  1/8 scale when even the smallest box keeps twice the output size there; without the region
  decoder, the whole image with ``torchvision.io.decode_jpeg`` or PIL's DCT-scaled decode;
  PIL for other formats) and cuts the boxes; the resize to
  the training size runs on the device (``crops.CropBatch``), beside the colour augmentations.
  The resize is what costs a worker most after the decode, and a GPU does it almost for free;
- ``device-decode``: a worker reads the header and draws the boxes only; the device decodes the
  JPEG bytes (batched nvJPEG on CUDA), crops and resizes (``crops.EncodedBatch``). Other
  formats are decoded in the worker;
- ``dali``: the workers as for ``device-decode``; NVIDIA DALI, when installed, decodes each
  view's box and resizes it on the device (``mae_bench.data.dali``: nvJPEG on a GPU,
  libjpeg-turbo threads on a CPU);
- ``workers``: the same decode and cut, and the resize too, in the worker (with the same kernel,
  so the same pixels). It costs more CPU per image than ``device-resize`` even when the device is
  the CPU (a worker's fixed-size output is collated once more, and the crop it resizes is a
  strided view), so auto does not pick it; it is there to compare and for callers that want
  finished uint8 views from the loader.

The boxes and flips follow torchvision's ``RandomResizedCrop`` + ``RandomHorizontalFlip`` draws
exactly, from a generator seeded by (run seed, epoch, sample index): a sample's crops do not
depend on the number of workers, and a resumed run replays them.
"""

from __future__ import annotations

import functools
import io
import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

import mae_bench.data.images as images  # the module, so a patched _open_rgb reaches workers
from mae_bench.data import jpeg_region
from mae_bench.data.augment import ViewSpec
from mae_bench.data.crops import CropBatch, EncodedBatch, decode_jpeg, resize_crop

log = logging.getLogger("mae_bench.data")  # one logger name for the whole package

PIPELINES = ("device-resize", "device-decode", "workers", "dali")
# A JPEG is decoded at 1/s scale (DCT scaling) only for s = 8 or 4: at 1/2 scale PIL's decode
# is hardly faster than libjpeg-turbo's full decode through torchvision. The region decoder uses
# the same scales, so that both paths cut the same pixels (tests/test_jpeg_region.py).
_DCT_SCALES = (8, 4)
Box = tuple[int, int, int, int]  # (top, left, height, width) in pixels


def sample_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
               generator: torch.Generator | None = None) -> Box:
    """One RandomResizedCrop box, drawn exactly as torchvision's ``v2.RandomResizedCrop`` draws
    it (the same random calls in the same order: ten tries, then the centre-crop fallback)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1],
                                                  generator=generator).item())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_flip(p: float, generator: torch.Generator | None = None) -> bool:
    """torchvision's ``RandomHorizontalFlip(p)`` draw: flip when a uniform number is below p."""
    return bool(torch.rand(1, generator=generator).item() < p)


def dct_scale(boxes: Sequence[Box], out_sizes: Sequence[int]) -> int:
    """The JPEG decode scale 1/s (s = 8 or 4; else 1: a full decode) that leaves every box at
    least twice its output size on both sides.

    Twice, not once: the box's edges are rounded to the reduced pixels (up to s / 2 pixels at
    full resolution), which then moves them by at most a quarter of an output pixel, and the
    antialiased resize after the decode still does most of the filtering, as it does on the
    full-resolution crop.

    Args:
        boxes: (top, left, height, width) per view, full-resolution pixels.
        out_sizes: each view's output side.
    """
    room = min(min(h, w) / size for (_, _, h, w), size in zip(boxes, out_sizes, strict=True))
    return next((s for s in _DCT_SCALES if room >= 2 * s), 1)


def scaled_box(box: Box, s: int, height: int, width: int) -> Box:
    """A full-resolution box in the pixels of an image decoded at 1/s scale (``height`` x
    ``width``): its edges rounded to the nearest reduced pixel, at least one pixel kept."""
    top, left, h, w = box
    t, le = min(round(top / s), height - 1), min(round(left / s), width - 1)
    b = min(height, max(round((top + h) / s), t + 1))
    r = min(width, max(round((left + w) / s), le + 1))
    return t, le, b - t, r - le


def _header(data: bytes, where: str) -> tuple[int, int, str | None] | None:
    """(height, width, format) from the file's header, nothing decoded; None (warned) when it
    cannot be read."""
    decoder = jpeg_region.load() if data[:2] == b"\xff\xd8" else None
    size = decoder.header(data) if decoder is not None else None
    if size is not None:  # libjpeg's header parse: a tenth of PIL's Image.open
        return size[0], size[1], "JPEG"
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size[1], im.size[0], im.format
    except Exception as e:  # PIL raises many types for broken files
        images.warn_unreadable(where, data, e)
        return None


class _SampleDraws:
    """Per-sample generators: seeded by (run seed, epoch, sample index), so that a sample's
    boxes and flips are the same whichever worker reads it and whenever (a resumed run)."""

    def __init__(self) -> None:
        self.epoch_seed = 0

    def generator(self, index: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.epoch_seed * 1_000_003 + index) % 2**63)


class DecodeCrop(_SampleDraws):
    """Worker side of ``device-resize``: file bytes -> one (crop, flip) per view; with
    ``resize`` (the ``workers`` pipeline), one finished view per view instead.

    ``__call__(data, where, index)`` returns a tuple with, per view, a uint8 crop [C, h, w] at
    the decode scale and its flip, or (``resize``) the crop resized to the view's size and
    flipped, uint8 [C, s, s]; None (warned) when the file cannot be read.
    """

    reads_bytes = True  # StreamingDataset hands over the file's bytes, not decoded pixels

    def __init__(self, specs: Sequence[ViewSpec], resize: bool = False):
        super().__init__()
        self.specs = list(specs)
        self.resize = resize

    def _draw(self, height: int, width: int, index: int) -> tuple[list[Box], list[bool]]:
        g = self.generator(index)
        boxes, flips = [], []
        for s in self.specs:
            boxes.append(sample_box(height, width, s.scale, s.ratio, g))
            flips.append(sample_flip(s.hflip, g))
        return boxes, flips

    def _start(self, data: bytes, where: str, index: int) -> tuple | None:
        """(height, width, format, boxes, flips) from the header and the sample's draws; None
        (warned) when the header cannot be read."""
        header = _header(data, where)
        if header is None:
            return None
        return *header, *self._draw(header[0], header[1], index)

    def __call__(self, data: bytes, where: str, index: int) -> tuple | None:
        start = self._start(data, where, index)
        if start is None:
            return None
        height, width, fmt, boxes, flips = start
        crops = self._region_crops(data, height, width, boxes) if fmt == "JPEG" else None
        if crops is None:
            pixels, s = self._decode(data, where, fmt, (width, height), boxes)
            if pixels is None:
                return None
            _, dh, dw = pixels.shape
            crops = []
            for box in boxes:
                t, left, h, w = scaled_box(box, s, dh, dw) if s > 1 else box
                crops.append(pixels[:, t:t + h, left:left + w])
        if self.resize:
            return tuple(resize_crop(c, sp.img_size, sp.interpolation, f)
                         for c, sp, f in zip(crops, self.specs, flips, strict=True))
        return tuple(zip(crops, flips, strict=True))

    def _region_crops(self, data: bytes, height: int, width: int,
                      boxes: list[Box]) -> list[Tensor] | None:
        """Each view's crop [3, h, w] (at the decode scale) from one region decode of the
        boxes' union (``jpeg_region``); None when there is no region decoder or libjpeg refuses
        the file (the whole-image path then decodes it, or says why it cannot)."""
        decoder = jpeg_region.load()
        if decoder is None:
            return None
        s = dct_scale(boxes, [sp.img_size for sp in self.specs])
        if s > 1:  # libjpeg's size at 1/s: ceil(H / s) x ceil(W / s)
            boxes = [scaled_box(b, s, -(-height // s), -(-width // s)) for b in boxes]
        top, left = min(b[0] for b in boxes), min(b[1] for b in boxes)
        bottom, right = max(b[0] + b[2] for b in boxes), max(b[1] + b[3] for b in boxes)
        region = decoder.decode(data, (top, left, bottom - top, right - left), s)
        if region is None:
            return None
        return [region[:, t - top:t - top + h, le - left:le - left + w] for t, le, h, w in boxes]

    def _decode(self, data: bytes, where: str, fmt: str | None, size: tuple[int, int],
                boxes: list[Box]) -> tuple[Tensor | None, int]:
        """The whole image, uint8 [C, H/s, W/s], and s; (None, 1) when unreadable (warned)."""
        if fmt == "JPEG":
            s = dct_scale(boxes, [sp.img_size for sp in self.specs])
            try:
                if s > 1:
                    with Image.open(io.BytesIO(data)) as im:
                        # PIL decodes at the largest 1/k (k <= 8) keeping at least the size
                        # asked for: W // s (not ceil(W / s), which can leave it k = s / 2)
                        im.draft("RGB", (max(1, size[0] // s), max(1, size[1] // s)))
                        rgb = np.array(im.convert("RGB") if im.mode != "RGB" else im)
                    if rgb.shape[:2] != (-(-size[1] // s), -(-size[0] // s)):
                        raise ValueError("PIL chose another DCT scale")  # the full decode, below
                    return torch.from_numpy(rgb).permute(2, 0, 1), s  # [3, H/s, W/s]
                return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8)), 1
            except Exception:  # libjpeg's verdict on a broken file: let PIL say why, below
                pass
        rgb = images._open_rgb(data, where)
        if rgb is None:
            return None, 1
        return torch.from_numpy(np.array(rgb)).permute(2, 0, 1), 1


class ReadBoxes(DecodeCrop):
    """Worker side of ``device-decode``: file bytes -> the bytes again (JPEG) or the decoded
    pixels (other formats), with every view's full-resolution box and flip."""

    def __call__(self, data: bytes, where: str, index: int) -> tuple | None:
        start = self._start(data, where, index)
        if start is None:
            return None
        height, width, fmt, boxes, flips = start
        if fmt == "JPEG":
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), (0, height, width), \
                boxes, flips
        rgb = images._open_rgb(data, where)
        if rgb is None:
            return None
        pixels = torch.from_numpy(np.array(rgb)).permute(2, 0, 1).contiguous()  # [3, H, W]
        return pixels.reshape(-1), tuple(pixels.shape), boxes, flips


def collate_crops(samples: list[tuple[tuple, int]]) -> tuple[list[CropBatch], Tensor]:
    """DataLoader collate for ``DecodeCrop`` samples: one CropBatch per view, and the labels."""
    views = len(samples[0][0])
    batches = [CropBatch.pack([s[0][v][0] for s in samples], [s[0][v][1] for s in samples])
               for v in range(views)]
    return batches, torch.tensor([s[1] for s in samples], dtype=torch.int64)


def collate_encoded(samples: list[tuple[tuple, int]], decoder: str = "torchvision"
                    ) -> tuple[list, Tensor]:
    """DataLoader collate for ``ReadBoxes`` samples: one view object per view, sharing one
    ``EncodedBatch`` (each image decoded once for all its views; with ``decoder="dali"``,
    each view's box by DALI), and the labels."""
    data = [s[0][0] for s in samples]
    batch = EncodedBatch(
        data=torch.cat(data), lengths=torch.tensor([len(d) for d in data], dtype=torch.int64),
        shapes=torch.tensor([s[0][1] for s in samples], dtype=torch.int64),
        boxes=torch.tensor([s[0][2] for s in samples], dtype=torch.int64),  # [B, V, 4]
        flips=torch.tensor([s[0][3] for s in samples], dtype=torch.bool),  # [B, V]
        decoder=decoder)
    views = batch.boxes.shape[1]
    return [batch.view(v) for v in range(views)], \
        torch.tensor([s[1] for s in samples], dtype=torch.int64)


def resolve_pipeline(name: str | None) -> str:
    """The pipeline a setting names: None and "auto" are ``device-resize``, on a GPU (the resize
    is almost free there) and on the CPU too (it costs less CPU per image than resizing in the
    workers: ``mae-bench speed --data-only`` measures both)."""
    return "device-resize" if name in (None, "auto") else str(name)


def jpeg_decoder(pipeline: str) -> str:
    """Where and with what ``pipeline`` decodes JPEGs, in words (run.json, the data benchmark)."""
    if pipeline == "device-decode":
        return ("on the device: torchvision.io.decode_jpeg, whole images (nvJPEG on CUDA, "
                "libjpeg-turbo on the CPU)")
    if pipeline == "dali":
        from mae_bench.data import dali

        return (f"on the device: NVIDIA DALI {dali.check_installed()} fn.decoders.image_slice "
                "(crop boxes only)")
    return f"in the workers: {jpeg_region.describe()}"


def worker_transform(specs: Sequence[ViewSpec], pipeline: str):
    """The per-sample transform of ``pipeline`` for ``specs`` and its collate function (None:
    the DataLoader's default).

    Raises:
        ValueError: an unknown pipeline.
        DataError: ``dali`` without NVIDIA DALI installed.
    """
    # Imported here, in the main process, so that forked workers inherit them: importing
    # torchvision's decoders and resize costs each worker about a second of CPU, every epoch
    # (workers are not persistent).
    import torchvision.io  # noqa: F401
    import torchvision.transforms.v2.functional  # noqa: F401

    jpeg_region.load()  # built (first time on a machine) and loaded here, before the fork

    if pipeline == "device-resize":
        return DecodeCrop(specs), collate_crops
    if pipeline == "device-decode":
        return ReadBoxes(specs), collate_encoded
    if pipeline == "dali":
        from mae_bench.data import dali

        dali.check_installed()  # one line, with how to install it, before any worker starts
        return ReadBoxes(specs), functools.partial(collate_encoded, decoder="dali")
    if pipeline == "workers":
        return DecodeCrop(specs, resize=True), None
    raise ValueError(f"unknown data pipeline {pipeline!r}; valid: {', '.join(PIPELINES)}")
