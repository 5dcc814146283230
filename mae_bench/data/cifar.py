"""cifar10 and cifar100: the original python batches (a folder or the .tar.gz), or image folders.

Batches are unpickled with an allow-list (numpy arrays and plain containers only) and checked
against the official md5 digests (a mismatch only warns).
"""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mae_bench.data.classes import CIFAR10_CLASSES, CIFAR100_CLASSES
from mae_bench.data.datasets import AnyDataset, ArrayDataset, StreamingDataset, _array_dataset
from mae_bench.data.image_splits import _find_image_splits, _load_image_split
from mae_bench.data.index import _tar_parts
from mae_bench.data.info import DatasetInfo
from mae_bench.data.registry import _Options, register_dataset
from mae_bench.errors import DataError

log = logging.getLogger("mae_bench.data")  # one logger name for the whole package


@dataclass(frozen=True)
class _Cifar:
    folder: str
    archive: str
    files: dict[str, tuple[tuple[str, str], ...]]  # split -> ((file, official md5), ...)
    meta: tuple[str, str, str]  # (file, key of the class names, md5)
    label_key: str
    classes: tuple[str, ...]


# md5 digests of the original files, as listed in torchvision/datasets/cifar.py
_CIFAR10 = _Cifar(
    folder="cifar-10-batches-py",
    archive="cifar-10-python.tar.gz",
    files={
        "train": (
            ("data_batch_1", "c99cafc152244af753f735de768cd75f"),
            ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
            ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
            ("data_batch_4", "634d18415352ddfa80567beed471001a"),
            ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
        ),
        "test": (("test_batch", "40351d587109b95175f43aff81a1287e"),),
    },
    meta=("batches.meta", "label_names", "5ff9c542aee3614f3951f8cda6e48888"),
    label_key="labels",
    classes=CIFAR10_CLASSES,
)
_CIFAR100 = _Cifar(
    folder="cifar-100-python",
    archive="cifar-100-python.tar.gz",
    files={
        "train": (("train", "16019d7e3df5f24257cddd939b257f8d"),),
        "test": (("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),),
    },
    meta=("meta", "fine_label_names", "7973b15100ade9c7d40fb424638fde48"),
    label_key="fine_labels",
    classes=CIFAR100_CLASSES,
)


@dataclass(frozen=True)
class _CifarBatches:
    container: Path  # the folder holding the batch files, or the original .tar.gz
    in_archive: bool


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches: plain containers and numpy arrays, nothing that runs code."""

    _ALLOWED = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle(data: bytes, where: str) -> dict[str, Any]:
    try:
        obj = _NumpyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except Exception as e:  # any failure means: not a CIFAR batch
        raise DataError(f"{where} is not a CIFAR python batch ({e}); re-download it") from e
    if not isinstance(obj, dict):
        raise DataError(f"{where} is not a CIFAR python batch (no dict inside); re-download it")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_tar_members(archive: Path, names: set[str]) -> dict[str, bytes]:
    """Reads the named members of a (compressed) tar in one sequential pass."""
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r|*") as tf:
            for member in tf:
                name = "/".join(_tar_parts(member.name))
                if member.isfile() and name in names:
                    out[name] = tf.extractfile(member).read()  # type: ignore[union-attr]
                    if len(out) == len(names):
                        break
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{archive} is not a readable tar archive ({e}); re-download it") from e
    return out


def _load_cifar_batches(v: _Cifar, info: DatasetInfo, split: str, src: _CifarBatches) -> AnyDataset:
    wanted = (*v.files[split], (v.meta[0], v.meta[2]))
    if src.in_archive:
        members = _read_tar_members(src.container, {f"{v.folder}/{f}" for f, _ in wanted})
        blobs = {name.rsplit("/", 1)[1]: data for name, data in members.items()}
        where = {f: f"{src.container}:{v.folder}/{f}" for f, _ in wanted}
    else:
        files = {f: src.container / f for f, _ in wanted}
        blobs = {f: path.read_bytes() for f, path in files.items() if path.is_file()}
        where = {f: str(path) for f, path in files.items()}
    for file, md5 in wanted:
        if file not in blobs:
            if file == v.meta[0]:
                continue  # optional: the class names are known anyway
            raise DataError(f"{where[file]} is missing; get it: {info.how_to_get}")
        digest = hashlib.md5(blobs[file], usedforsecurity=False).hexdigest()
        if digest != md5:
            log.warning(
                "%s: md5 %s differs from the original's %s (a modified copy?)",
                where[file],
                digest,
                md5,
            )
    classes = v.classes
    if v.meta[0] in blobs:
        classes = tuple(_unpickle(blobs[v.meta[0]], where[v.meta[0]]).get(v.meta[1], classes))
    datas, labels = [], []
    for file, _ in v.files[split]:
        batch = _unpickle(blobs[file], where[file])
        data, label = np.asarray(batch.get("data")), batch.get(v.label_key)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or label is None:
            raise DataError(f"{where[file]} lacks uint8 'data' [N, 3072] or {v.label_key!r} labels")
        if len(label) != len(data):
            raise DataError(f"{where[file]} has {len(data)} images but {len(label)} labels")
        datas.append(data)
        labels.append(np.asarray(label, dtype=np.int64))
    images = np.concatenate(datas).reshape(-1, 3, 32, 32)  # the rows are already CHW
    return _array_dataset(info, images, np.concatenate(labels), classes)


def _find_cifar(v: _Cifar, root: Path) -> dict[str, Any]:
    for folder in (root / v.folder, root):
        found = {
            split: _CifarBatches(folder, in_archive=False)
            for split, files in v.files.items()
            if all((folder / f).is_file() for f, _ in files)
        }
        if found:
            return found
    if (root / v.archive).is_file():
        return {split: _CifarBatches(root / v.archive, in_archive=True) for split in v.files}
    return _find_image_splits(root)


def _load_cifar(
    v: _Cifar, info: DatasetInfo, split: str, found: dict[str, Any], opts: _Options
) -> AnyDataset:
    source = found[split]
    if isinstance(source, _CifarBatches):
        return _load_cifar_batches(v, info, split, source)
    log.info(
        "%s %s: reading image files from %s, not the original python batches",
        info.name,
        split,
        source,
    )
    result = _load_image_split(info, source, v.classes, opts)
    if isinstance(result, StreamingDataset):
        return result
    return ArrayDataset(result.images, result.labels, result.classes, info, result.bad_images)


def _cifar_how_to_get(v: _Cifar, cls: str) -> str:
    return (
        f"https://www.cs.toronto.edu/~kriz/{v.archive} (keep or extract it), or python -c "
        f"'import torchvision; torchvision.datasets.{cls}(DIR, download=True)'"
    )


def register() -> None:
    """Add this module's data sets to the registry (called once, by ``mae_bench.data.catalog``)."""
    for _v, _cls, _mean, _std in (
        (_CIFAR10, "CIFAR10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
        (_CIFAR100, "CIFAR100", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    ):
        _batch_files = ", ".join(f for files in _v.files.values() for f, _ in files)
        register_dataset(
            DatasetInfo(
                name=_cls.lower(),
                description=f"{_cls[:5]}-{_cls[5:]}: 60,000 32x32 colour images, {len(_v.classes)} "
                "classes",
                channels=3,
                img_size=32,
                num_classes=len(_v.classes),
                mean=_mean,
                std=_std,
                splits=("train", "test"),
                needs_data_dir=True,
                formats=f"python batches ({_v.folder}/ or {_v.archive}), or train/ and test/ class "
                "folders (or .tar/.tar.gz of them)",
                how_to_get=_cifar_how_to_get(_v, _cls),
            ),
            find=lambda root, v=_v: _find_cifar(v, root),
            load=lambda info, split, found, opts, v=_v: _load_cifar(v, info, split, found, opts),
            expected=f"{_v.folder}/ ({_batch_files}), {_v.archive}, or train/ and test/ class "
            "folders (or train.tar.gz, test.tar.gz)",
        )
