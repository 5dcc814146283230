"""digits: scikit-learn's 8x8 handwritten digits, embedded (no files to get)."""

from __future__ import annotations

from typing import Any

import numpy as np

from mae_bench.data.classes import DIGIT_CLASSES
from mae_bench.data.datasets import AnyDataset, _array_dataset
from mae_bench.data.info import DatasetInfo
from mae_bench.data.registry import _Options, register_dataset


def _load_digits(
    info: DatasetInfo, split: str, found: dict[str, Any], opts: _Options
) -> AnyDataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.images * 255 / 16).astype(np.uint8)[:, None]  # [1797, 1, 8, 8]
    train, test = train_test_split(
        np.arange(len(images)), test_size=0.2, stratify=digits.target, random_state=0
    )
    keep = train if split == "train" else test
    return _array_dataset(info, images[keep], digits.target[keep], DIGIT_CLASSES)


def register() -> None:
    """Add this module's data sets to the registry (called once, by ``mae_bench.data.catalog``)."""
    register_dataset(
        DatasetInfo(
            name="digits",
            description="scikit-learn's 1,797 handwritten digits, 8x8 grayscale: "
            "the embedded default",
            channels=1,
            img_size=8,  # native: patch-2 presets see 16 patches
            num_classes=10,
            mean=(0.3054,),  # train split, recomputed in tests/test_data.py
            std=(0.3760,),
            splits=("train", "test"),
            needs_data_dir=False,
            formats="embedded in scikit-learn (load_digits); stratified 80/20 split, "
            "random_state=0",
            how_to_get="nothing to get: it ships with scikit-learn",
        ),
        find=lambda root: {},
        load=_load_digits,
        expected="nothing (embedded)",
    )
