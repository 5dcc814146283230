"""stl10: the binary version (stl10_binary/*.bin), including the 100k unlabeled images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mae_bench.data.classes import STL10_CLASSES
from mae_bench.data.datasets import AnyDataset, _array_dataset
from mae_bench.data.info import DatasetInfo
from mae_bench.data.registry import _Options, register_dataset
from mae_bench.errors import DataError

_STL10_FILES = {
    "train": ("train_X.bin", "train_y.bin"),
    "test": ("test_X.bin", "test_y.bin"),
    "unlabeled": ("unlabeled_X.bin", None),
}
_STL10_IMAGE_BYTES = 3 * 96 * 96


def _find_stl10(root: Path) -> dict[str, Any]:
    for folder in (root / "stl10_binary", root):
        found = {
            split: (folder / x, folder / y if y else None)
            for split, (x, y) in _STL10_FILES.items()
            if (folder / x).is_file() and (y is None or (folder / y).is_file())
        }
        if "train" in found and "unlabeled" in found:
            found["train+unlabeled"] = None
        if found:
            return found
    return {}


def _load_stl10(info: DatasetInfo, split: str, found: dict[str, Any], opts: _Options) -> AnyDataset:
    parts = [found[s] for s in split.split("+")]
    counts = []
    for x_path, _ in parts:
        size = x_path.stat().st_size
        if size == 0 or size % _STL10_IMAGE_BYTES:
            raise DataError(f"{x_path} has {size} bytes, not a multiple of 96*96*3: re-download it")
        counts.append(size // _STL10_IMAGE_BYTES)
    images = np.empty((sum(counts), 3, 96, 96), dtype=np.uint8)  # the one in-memory copy
    labels = np.full(sum(counts), -1, dtype=np.int64)
    start = 0
    for (x_path, y_path), n in zip(parts, counts, strict=True):
        stored = np.memmap(x_path, dtype=np.uint8, mode="r", shape=(n, 3, 96, 96))
        for i in range(0, n, 4096):  # chunks: the page cache, not our heap, holds the file
            chunk = stored[i : i + 4096]  # [n, 3, W, H]: each channel is stored column-major
            images[start + i : start + i + len(chunk)] = chunk.transpose(0, 1, 3, 2)
        del stored
        if y_path is not None:
            y = np.fromfile(y_path, dtype=np.uint8)
            if len(y) != n or y.min() < 1 or y.max() > 10:
                raise DataError(f"{y_path}: expected {n} labels in 1..10 for {x_path.name}")
            labels[start : start + n] = y.astype(np.int64) - 1
        start += n
    names_file = parts[0][0].parent / "class_names.txt"
    classes = names_file.read_text().split() if names_file.is_file() else STL10_CLASSES
    return _array_dataset(info, images, labels, classes)


def register() -> None:
    """Add this module's data sets to the registry (called once, by ``mae_bench.data.catalog``)."""
    register_dataset(
        DatasetInfo(
            name="stl10",
            description="STL-10: 96x96 colour, 5k labeled train, 8k test, 100k unlabeled, "
            "10 classes",
            channels=3,
            img_size=96,
            num_classes=10,
            mean=(0.4467, 0.4398, 0.4066),
            std=(0.2603, 0.2566, 0.2713),
            splits=("train", "test", "unlabeled", "train+unlabeled"),
            needs_data_dir=True,
            formats="binary version: stl10_binary/ with train_X.bin, train_y.bin, test_X.bin, "
            "test_y.bin, unlabeled_X.bin",
            how_to_get="https://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz "
            "(extract it), or "
            "python -c 'import torchvision; torchvision.datasets.STL10(DIR, download=True)'",
        ),
        find=_find_stl10,
        load=_load_stl10,
        expected="stl10_binary/ with train_X.bin, train_y.bin, test_X.bin, test_y.bin "
        "(and unlabeled_X.bin)",
    )
