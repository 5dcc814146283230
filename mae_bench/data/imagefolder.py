"""imagefolder: the user's own images, one folder per class (ImageNet-style).

Class names and normalisation stats come from the train split; the test split must have the same
classes and is normalised like train.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from mae_bench.data.datasets import AnyDataset, ArrayDataset, StreamingDataset
from mae_bench.data.image_splits import _find_image_splits, _load_image_split
from mae_bench.data.info import DatasetInfo
from mae_bench.data.registry import _Options, register_dataset
from mae_bench.errors import DataError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _imagefolder_split(info: DatasetInfo, source: Path, opts: _Options) -> AnyDataset:
    result = _load_image_split(info, source, None, opts)
    if isinstance(result, StreamingDataset):
        return result
    h, w = result.images.shape[2:]
    info = replace(
        info, num_classes=len(result.classes), img_size=min(h, w), mean=result.mean, std=result.std
    )
    return ArrayDataset(result.images, result.labels, result.classes, info, result.bad_images)


def _load_imagefolder(
    info: DatasetInfo, split: str, found: dict[str, Any], opts: _Options
) -> AnyDataset:
    if "train" not in found:
        raise DataError(
            f"{found[split].parent} has {found[split].name} but no train/ (or train.tar[.gz]): "
            "imagefolder takes its class names and normalisation stats from the train split"
        )
    train = _imagefolder_split(info, found["train"], opts)
    if split == "train":
        return train
    test = _imagefolder_split(info, found[split], opts)
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
