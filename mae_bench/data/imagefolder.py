"""imagefolder: the user's own images, one folder per class (ImageNet-style).

Class names and normalisation stats come from the train split; the test split must have the same
classes and is normalised like train.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from mae_bench.data.datasets import AnyDataset, ArrayDataset, StreamingDataset
from mae_bench.data.image_splits import _find_image_splits, _load_image_split
from mae_bench.data.images import _channel_stats
from mae_bench.data.info import DatasetInfo
from mae_bench.data.registry import _Options, register_dataset
from mae_bench.errors import DataError

log = logging.getLogger("mae_bench.data")  # one logger name for the whole package

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _to_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 [N, 3, H, W] as ``channels`` channels: 1 keeps the luma (ITU-R 601; the gray value
    itself for gray images)."""
    if channels == 3:
        return images
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (images.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)


def _imagefolder_split(info: DatasetInfo, source: Path, opts: _Options,
                       channels: int | None = None, warn: bool = True) -> AnyDataset:
    """One split in memory (or streamed when too big; a streamed split stays RGB).

    ``channels`` None: decided from the images. One channel only when every image is gray, so
    no pixel is ever lost: a colour file among grayscale ones makes the whole split RGB (the
    gray images repeated). That changes the model's input and its statistics, so when most
    images are gray it is said, naming the colour files: convert or remove them to get one
    channel. The test split takes the train split's channels; its colour images, if the train
    split is gray, are reduced to luma, also with a warning naming them. ``warn`` False: the
    train split read again only for the test split's sake stays quiet (it warned when loaded).
    """
    result = _load_image_split(info, source, None, opts)
    if isinstance(result, StreamingDataset):
        return result
    images = result.images
    n, colour = len(images), len(images) - result.gray_images
    examples = ", ".join(result.colour_examples)
    examples += ", ..." if colour > len(result.colour_examples) else ""
    if channels is None:
        channels = 1 if colour == 0 else 3
        if warn and 0 < colour < result.gray_images:
            log.warning("%s: %d of %d images are colour (%s), so every image is read as 3 "
                        "channels; convert those to grayscale (or remove them) to read the "
                        "folder as 1 channel", source, colour, n, examples)
    elif warn and channels == 1 and colour:
        log.warning("%s: %d of %d images are colour (%s); they are read as grayscale, like the "
                    "train split", source, colour, n, examples)
    images = _to_channels(images, channels)
    h, w = images.shape[2:]
    mean, std = result.mean, result.std
    if channels == 1:
        mean, std = _channel_stats(images.numpy())
    info = replace(info, num_classes=len(result.classes), img_size=min(h, w), channels=channels,
                   mean=mean, std=std)
    return ArrayDataset(images, result.labels, result.classes, info, result.bad_images)


def _load_imagefolder(
    info: DatasetInfo, split: str, found: dict[str, Any], opts: _Options
) -> AnyDataset:
    if "train" not in found:
        raise DataError(
            f"{found[split].parent} has {found[split].name} but no train/ (or train.tar[.gz]): "
            "imagefolder takes its class names and normalisation stats from the train split"
        )
    train = _imagefolder_split(info, found["train"], opts, warn=split == "train")
    if split == "train":
        return train
    test = _imagefolder_split(info, found[split], opts, channels=train.info.channels)
    if test.classes != train.classes:
        extra, missing = (
            set(test.classes) - set(train.classes),
            set(train.classes) - set(test.classes),
        )
        raise DataError(
            f"class folders of {found[split]} differ from {found['train']}: extra "
            f"{sorted(extra) or 'none'}, missing {sorted(missing) or 'none'}; use the same classes"
        )
    test.info = train.info  # the test split is normalised like the data the model trained on
    return test


def register() -> None:
    """Add this module's data sets to the registry (called once, by ``mae_bench.data.catalog``)."""
    register_dataset(
        DatasetInfo(
            name="imagefolder",
            description="your own images, one folder per class (ImageNet-style)",
            channels=3,
            img_size=224,
            num_classes=None,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            splits=("train", "test"),
            needs_data_dir=True,
            formats="train/ and test/ (or val/): class folders of jpg/png/bmp/webp/gif/tif images, "
            "or .tar/.tar.gz/.tgz archives of them",
            how_to_get="your own images: DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg "
            "(or DIR/train.tar, DIR/test.tar)",
        ),
        find=_find_image_splits,
        load=_load_imagefolder,
        expected="train/ and test/ (or val/) class folders, or train.tar[.gz] and test.tar[.gz]",
    )
