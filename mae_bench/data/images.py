"""Decoding image files: any PIL-readable file to RGB, resized and centre-cropped to one size.

An unreadable image is logged and skipped; a split with more than ``BAD_IMAGE_LIMIT`` of them is
an error. Also the per-channel statistics of decoded images.
"""

from __future__ import annotations

import io
import logging
import re
from collections import Counter

import numpy as np
from PIL import Image

from mae_bench.data.index import _Index
from mae_bench.errors import DataError

log = logging.getLogger("mae_bench.data")  # one logger name for the whole package

BAD_IMAGE_LIMIT = 0.01  # a split with more unreadable images than this fraction is an error


def _header_size(data: bytes) -> tuple[int, int] | None:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception:  # not an image: the decode pass logs and counts it
        return None


def _open_rgb(data: bytes, where: str) -> Image.Image | None:
    """Decodes any PIL-readable image to RGB; None (logged) when it cannot be read."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")  # PIL warns when palette transparency meets RGB directly
            return im.convert("RGB")
    except Exception as e:  # PIL raises many types for broken files
        warn_unreadable(where, data, e)
        return None


def warn_unreadable(where: str, data: bytes, e: Exception) -> None:
    """The one warning for an image that cannot be read (a worker's crop path uses it too)."""
    # PIL names the in-memory buffer ("<_io.BytesIO object at 0x...>"), not the file
    reason = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e)).strip()
    log.warning("skipping unreadable image %s (%s: %s)", where, type(e).__name__,
                "empty file" if not data else reason or "cannot be decoded")


def _resize_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resizes so that ``size`` (w, h) is covered (the shorter side for a square), then crops the
    center."""
    if image.size == size:
        return image
    scale = max(size[0] / image.width, size[1] / image.height)
    w, h = max(size[0], round(image.width * scale)), max(size[1], round(image.height * scale))
    image = image.resize((w, h), Image.BILINEAR)  # PIL filters (antialiases) when shrinking
    left, top = (w - size[0]) // 2, (h - size[1]) // 2
    return image.crop((left, top, left + size[0], top + size[1]))


def _common_size(blobs: list[bytes], picks: list[int] | None = None) -> tuple[int, int]:
    """The most frequent (w, h) among the image headers (of ``picks`` only, if given)."""
    sizes = Counter(_header_size(blobs[i]) for i in (range(len(blobs)) if picks is None else picks))
    sizes.pop(None, None)
    return sizes.most_common(1)[0][0] if sizes else (1, 1)


def _sample(n: int) -> list[int]:
    return sorted({round(x) for x in np.linspace(0, n - 1, min(n, 32))})


def _decode(
    index: _Index, blobs: list[bytes], labels: list[int], size: tuple[int, int], budget: int
) -> tuple[np.ndarray, np.ndarray, list[int]] | None:
    """Decodes every image to uint8 [N, 3, h, w] at the most frequent size (``size`` is a guess
    from a sample; a wrong guess costs one more pass). Returns the images, their labels and the
    positions in ``blobs`` of the images kept; None if that size exceeds ``budget``.

    An unreadable image is warned about once: a later pass skips the ones the first found bad.
    """
    bad_seen: set[int] = set()
    while len(blobs) * 3 * size[0] * size[1] <= budget:
        images = np.empty((len(blobs), 3, size[1], size[0]), dtype=np.uint8)
        kept: list[int] = []
        native: Counter[tuple[int, int]] = Counter()
        for i, blob in enumerate(blobs):
            image = None if i in bad_seen else _open_rgb(blob, index.where(i))
            if image is None:
                bad_seen.add(i)
                continue
            native[image.size] += 1
            images[len(kept)] = np.asarray(_resize_crop(image, size)).transpose(2, 0, 1)
            kept.append(i)
        bad = len(blobs) - len(kept)
        if bad > BAD_IMAGE_LIMIT * len(blobs):
            raise DataError(
                f"{bad} of {len(blobs)} images in {index.root} could not be read (over 1 %); "
                "fix or remove the files named in the warnings above"
            )
        if native.most_common(1)[0][0] == size:
            return images[: len(kept)], np.asarray(labels, dtype=np.int64)[kept], kept
        size = native.most_common(1)[0][0]
    return None


def _gray_mask(images: np.ndarray) -> np.ndarray:
    """bool [N]: which images of uint8 [N, 3, H, W] have three equal channels (grayscale files
    decode to RGB with the gray value repeated)."""
    step = 4096
    return np.concatenate([
        ((chunk[:, 0] == chunk[:, 1]) & (chunk[:, 1] == chunk[:, 2])).reshape(len(chunk), -1)
        .all(axis=1)
        for chunk in (images[i : i + step] for i in range(0, len(images), step))
    ] or [np.zeros(0, bool)])


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std in [0, 1] units of uint8 images [N, C, H, W]."""
    n, c = images.shape[:2]
    total, total_sq = np.zeros(c), np.zeros(c)
    step = max(1, 2**24 // max(1, int(np.prod(images.shape[1:]))))  # ~128 MB of float64 a chunk
    for start in range(0, n, step):
        chunk = images[start : start + step].astype(np.float64) / 255  # [n, C, H, W]
        total += chunk.sum(axis=(0, 2, 3))
        total_sq += np.square(chunk).sum(axis=(0, 2, 3))
    count = max(1, n * images.shape[2] * images.shape[3])
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)
