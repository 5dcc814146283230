"""svhn: the cropped-digit .mat files (train_32x32.mat, test_32x32.mat, extra_32x32.mat)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mae_bench.data.classes import DIGIT_CLASSES
from mae_bench.data.datasets import AnyDataset, _array_dataset
from mae_bench.data.info import DatasetInfo
from mae_bench.data.registry import _Options, register_dataset
from mae_bench.errors import DataError

_SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat", "extra": "extra_32x32.mat"}


def _find_svhn(root: Path) -> dict[str, Any]:
    return {s: root / f for s, f in _SVHN_FILES.items() if (root / f).is_file()}


def _load_svhn(info: DatasetInfo, split: str, found: dict[str, Any], opts: _Options) -> AnyDataset:
    from scipy.io import loadmat

    path = found[split]
    try:
        mat = loadmat(path)
        x, y = mat["X"], mat["y"].ravel().astype(np.int64)  # X: [32, 32, 3, N]
    except Exception as e:  # scipy raises many types for a bad file
        raise DataError(
            f"{path} is not an SVHN .mat file with X and y ({e}); re-download it"
        ) from e
    if x.dtype != np.uint8 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
        raise DataError(f"{path}: X is {x.dtype} {x.shape}, expected uint8 [32, 32, 3, {len(y)}]")
    y[y == 10] = 0  # SVHN stores the digit 0 as label 10
    return _array_dataset(info, x.transpose(3, 2, 0, 1), y, DIGIT_CLASSES)


def register() -> None:
    """Add this module's data sets to the registry (called once, by ``mae_bench.data.catalog``)."""
    register_dataset(
        DatasetInfo(
            name="svhn",
            description="SVHN: street-view house-number digits, 32x32 colour, 10 classes",
            channels=3,
            img_size=32,
            num_classes=10,
            mean=(0.4377, 0.4438, 0.4728),
            std=(0.1980, 0.2010, 0.1970),
            splits=("train", "test", "extra"),
            needs_data_dir=True,
            formats="cropped-digit .mat files: train_32x32.mat, test_32x32.mat (extra_32x32.mat)",
            how_to_get="http://ufldl.stanford.edu/housenumbers/ (the 32x32 .mat files), or "
            "python -c "
            "'import torchvision; torchvision.datasets.SVHN(DIR, split=\"train\", download=True)'",
        ),
        find=_find_svhn,
        load=_load_svhn,
        expected="train_32x32.mat and test_32x32.mat",
    )
