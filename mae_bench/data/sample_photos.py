"""A folder of ImageNet-sized JPEGs made from the two photos scikit-learn ships, so that tests and
``mae-bench speed --data-only`` need no download.

``load_sample_images()`` holds ``china.jpg`` and ``flower.jpg`` (640 x 427). Each image of the
folder is a random crop of one of them, flipped or not, scaled (up where needed) to a size drawn
like ImageNet's: mostly 4:3 landscape and 3:4 portrait, some 3:2, 2:3, 16:9 and square; the long
side is 500 px for most images (the Flickr size most ImageNet photos have) and else log-uniform,
so widths lie in 270-900 px and heights in 225-600 px. Decoding cost follows the pixel count and
the JPEG quality, not the content, so two photos serve a benchmark of the data path as well as a
thousand would; they are useless for learning anything.

The folder is a pure function of its parameters (seeded), written in the ImageFolder layout
(``out/train/<class>/*.jpg`` and a small ``out/test/<class>/*.jpg``), with a stamp file written
last: a call with the same parameters reuses a complete folder.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mae_bench.data.registry import _default_cache_dir
from mae_bench.errors import DataError
from mae_bench.files import write_json_atomic

STAMP = "sample_photos.json"  # in the folder's root; written last, so a torn folder is redone
_FORMAT = 1  # bump when the drawing below changes: a stamp of another format is redone

# (width / height, weight): ImageNet's mix, mostly 4:3 landscape and 3:4 portrait
_ASPECTS = ((4 / 3, 0.55), (3 / 4, 0.15), (3 / 2, 0.10), (2 / 3, 0.05), (16 / 9, 0.05),
            (1.0, 0.10))
_COMMON_LONG_SIDE, _COMMON_SHARE = 500, 0.7  # most ImageNet photos are 500 px on the long side
_LONG_SIDE = (300, 900)  # the others: log-uniform in this range (before the limits below)
WIDTH = (270, 900)  # the limits every drawn size is scaled into
HEIGHT = (225, 600)
_CROP_AREA = (0.3, 1.0)  # share of the largest box of the drawn aspect inside the source photo


@dataclass(frozen=True)
class JpegFolder:
    """A folder ``make_jpeg_folder`` wrote or found.

    Attributes:
        root: the folder (holds ``train/`` and ``test/``).
        train_images: JPEGs in ``train/``.
        test_images: JPEGs in ``test/``.
        reused: True when a complete folder with the same parameters was already there.
    """

    root: Path
    train_images: int
    test_images: int
    reused: bool


def default_sample_dir(n_images: int) -> Path:
    """Where a command that needs a sample folder makes it when given none:
    ``$MAE_BENCH_CACHE`` (or ``~/.cache/mae-bench``) ``/sample-jpegs/n<n_images>``."""
    return _default_cache_dir() / "sample-jpegs" / f"n{n_images}"


def make_jpeg_folder(out_dir: str | Path, n_images: int = 500, classes: int = 10, seed: int = 0,
                     quality: int = 90) -> JpegFolder:
    """Write (or reuse) an ImageFolder of ImageNet-sized JPEGs cut from scikit-learn's photos.

    Args:
        out_dir: the folder; it must be new, empty, or one this function wrote before (another
            folder is never written into).
        n_images: JPEGs in ``train/``, spread round-robin over the classes.
        classes: class folders (``class_000``, ...), at least 1.
        seed: the draw; the same parameters give the same files.
        quality: JPEG quality (1-95, Pillow's scale).

    Returns:
        What was written or found.

    Raises:
        DataError: ``out_dir`` holds other files, or a parameter is out of range.
    """
    if n_images < 1 or classes < 1 or not 1 <= quality <= 95:
        raise DataError(f"make_jpeg_folder: need n_images >= 1, classes >= 1 and quality in "
                        f"1-95, got {n_images}, {classes}, {quality}")
    root = Path(out_dir).expanduser()
    n_test = max(classes, n_images // 10)  # every class in test/: imagefolder checks that
    params = {"format": _FORMAT, "n_images": n_images, "n_test": n_test, "classes": classes,
              "seed": seed, "quality": quality}
    stamp = root / STAMP
    if stamp.is_file():
        if _read_stamp(stamp) == params and _count(root / "train") == n_images \
                and _count(root / "test") == n_test:
            return JpegFolder(root, n_images, n_test, reused=True)
        stamp.unlink()  # ours, with other parameters or torn: redo it
        for split in ("train", "test"):
            shutil.rmtree(root / split, ignore_errors=True)
    elif root.exists() and any(root.iterdir()):
        raise DataError(f"{root} is not empty and was not made by make_jpeg_folder (no {STAMP}); "
                        "give a new or empty folder")
    photos = _photos()
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_images), ("test", n_test)):
        for c in range(classes):
            (root / split / f"class_{c:03d}").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image = _draw_image(photos, rng)
            image.save(root / split / f"class_{i % classes:03d}" / f"{split}_{i:06d}.jpg",
                       quality=quality)
    write_json_atomic(stamp, params)
    return JpegFolder(root, n_images, n_test, reused=False)


def draw_size(rng: np.random.Generator) -> tuple[int, int]:
    """One ImageNet-like (width, height): an aspect from ``_ASPECTS``, a long side of 500 px
    (70 %) or log-uniform in 300-900 px, then scaled into ``WIDTH`` x ``HEIGHT``."""
    ratios, weights = zip(*_ASPECTS, strict=True)
    aspect = ratios[rng.choice(len(ratios), p=np.array(weights) / sum(weights))]
    long_side = _COMMON_LONG_SIDE if rng.random() < _COMMON_SHARE else math.exp(
        rng.uniform(math.log(_LONG_SIDE[0]), math.log(_LONG_SIDE[1])))
    w, h = (long_side, long_side / aspect) if aspect >= 1 else (long_side * aspect, long_side)
    # the aspects above fit both limits at once, so shrinking never undoes growing
    scale = min(1.0, WIDTH[1] / w, HEIGHT[1] / h)
    scale = max(scale, WIDTH[0] / w, HEIGHT[0] / h)
    return round(w * scale), round(h * scale)


def _draw_image(photos: list[Image.Image], rng: np.random.Generator) -> Image.Image:
    """A random crop of a random photo, with the drawn size's aspect, flipped half the time."""
    width, height = draw_size(rng)
    photo = photos[rng.integers(len(photos))]
    aspect = width / height
    # the largest box of this aspect inside the photo, then a random share of its area
    box_w, box_h = min(photo.width, photo.height * aspect), min(photo.height, photo.width / aspect)
    shrink = math.sqrt(rng.uniform(*_CROP_AREA))
    box_w, box_h = box_w * shrink, box_h * shrink
    left = rng.uniform(0, photo.width - box_w)
    top = rng.uniform(0, photo.height - box_h)
    image = photo.resize((width, height), Image.BICUBIC,
                         box=(left, top, left + box_w, top + box_h))
    return image.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image


def _photos() -> list[Image.Image]:
    from sklearn.datasets import load_sample_images

    return [Image.fromarray(a) for a in load_sample_images().images]  # china, flower: 640 x 427


def _read_stamp(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _count(folder: Path) -> int:
    return sum(1 for _ in folder.glob("*/*.jpg")) if folder.is_dir() else 0
