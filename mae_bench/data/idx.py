"""mnist and fashion-mnist: IDX files, gzipped or not, in the usual folder layouts."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from mae_bench.data.classes import DIGIT_CLASSES, FASHION_CLASSES
from mae_bench.data.datasets import AnyDataset, _array_dataset
from mae_bench.data.info import DatasetInfo
from mae_bench.data.registry import _Options, register_dataset
from mae_bench.errors import DataError


def _find_idx(torchvision_folder: str, root: Path) -> dict[str, Any]:
    def locate(folder: Path, stem: str) -> Path | None:
        names = (stem, stem.replace("-idx", ".idx"))  # the second spelling is a common re-upload
        candidates = (folder / f"{n}{gz}" for n in names for gz in ("", ".gz"))
        return next((p for p in candidates if p.is_file()), None)

    for folder in (root, root / "raw", root / torchvision_folder / "raw"):
        found = {}
        for split, prefix in (("train", "train"), ("test", "t10k")):
            images = locate(folder, f"{prefix}-images-idx3-ubyte")
            labels = locate(folder, f"{prefix}-labels-idx1-ubyte")
            if images and labels:
                found[split] = (images, labels)
        if found:
            return found
    return {}


def _read_idx(path: Path) -> np.ndarray:
    """Parses an IDX file of uint8 (magic 0 0 8 ndim, big-endian uint32 dims, data)."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path} cannot be read ({e}); re-download it") from e
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise DataError(
            f"{path} is not an IDX file of uint8 (magic {raw[:4].hex()}); re-download it"
        )
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim]) if len(raw) >= 4 + 4 * ndim else ()
    data = np.frombuffer(raw, dtype=np.uint8, offset=min(len(raw), 4 + 4 * ndim))
    if len(dims) != ndim or data.size != int(np.prod(dims)):
        raise DataError(f"{path} holds {data.size} values, its header says {dims}: truncated?")
    return data.reshape(dims).copy()


def _load_idx(
    classes: tuple[str, ...], info: DatasetInfo, split: str, found: dict[str, Any], opts: _Options
) -> AnyDataset:
    images_path, labels_path = found[split]
    images, labels = _read_idx(images_path), _read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(
            f"{images_path} {images.shape} and {labels_path} {labels.shape} do not pair up as "
            "[N, H, W] images and [N] labels"
        )
    return _array_dataset(info, images[:, None], labels, classes)


def register() -> None:
    """Add this module's data sets to the registry (called once, by ``mae_bench.data.catalog``)."""
    for _name, _folder, _classes, _mean, _std, _desc, _get in (
        (
            "mnist",
            "MNIST",
            DIGIT_CLASSES,
            (0.1307,),
            (0.3081,),
            "MNIST: 70,000 handwritten digits",
            "python -c 'import torchvision; torchvision.datasets.MNIST(DIR, download=True)'",
        ),
        (
            "fashion-mnist",
            "FashionMNIST",
            FASHION_CLASSES,
            (0.2860,),
            (0.3530,),
            "Fashion-MNIST: 70,000 Zalando product images",
            "apt-get install dataset-fashion-mnist (lands in "
            "/usr/share/datasets/fashion-mnist), or "
            "python -c 'import torchvision; torchvision.datasets.FashionMNIST(DIR, download=True)'",
        ),
    ):
        register_dataset(
            DatasetInfo(
                name=_name,
                description=f"{_desc}, 28x28 grayscale, 10 classes",
                channels=1,
                img_size=28,
                num_classes=10,
                mean=_mean,
                std=_std,
                splits=("train", "test"),
                needs_data_dir=True,
                formats=f"IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-...; "
                f"optionally .gz) in DIR, DIR/raw or DIR/{_folder}/raw",
                how_to_get=_get,
            ),
            find=lambda root, folder=_folder: _find_idx(folder, root),
            load=lambda info, split, found, opts, c=_classes: _load_idx(
                c, info, split, found, opts),
            expected=f"train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
            f"t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz] in it, raw/ or "
            f"{_folder}/raw/",
        )
