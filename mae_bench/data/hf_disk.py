"""hf-disk: a Hugging Face ``datasets`` folder written by ``save_to_disk``, streamed.

``--data-dir`` is what ``DatasetDict.save_to_disk`` wrote (``dataset_dict.json`` and one folder
per split: ``train`` and ``test``, or ``validation``), or one ``Dataset.save_to_disk`` folder,
read as the train split. The first column with an ``Image`` feature holds the images, read as
their stored bytes (``Image(decode=False)``; our decode path decodes them once, in the
workers); the ``label`` column holds the classes, named by its ``ClassLabel`` when it has one,
else 0 .. the largest label. Normalisation is ImageNet's; the training size 224 px.

Needs the ``datasets`` package (``pip install 'mae-bench[hf-datasets]'``); finding the folder
does not, so ``mae-bench datasets`` lists it without the package.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mae_bench.data.datasets import StreamingDataset
from mae_bench.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD
from mae_bench.data.info import DatasetInfo
from mae_bench.data.registry import _Options, register_dataset
from mae_bench.errors import DataError

_SPLIT_NAMES = {"train": ("train",), "test": ("test", "validation", "val")}
LABEL_COLUMN = "label"
INSTALL = "pip install 'mae-bench[hf-datasets]'"


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()


def _find_hf_disk(root: Path) -> dict[str, Path]:
    """{split: its save_to_disk folder}; reads only ``dataset_dict.json`` (no import of
    ``datasets``), {} when ``root`` is not such a folder."""
    if not root.is_dir():
        return {}
    listed = root / "dataset_dict.json"
    if not listed.is_file():
        return {"train": root} if _is_saved_dataset(root) else {}
    try:
        splits = json.loads(listed.read_text(encoding="utf-8"))["splits"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    found = {}
    for split, names in _SPLIT_NAMES.items():
        hits = [root / n for n in names if n in splits and _is_saved_dataset(root / n)]
        if hits:
            found[split] = hits[0]
    return found


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"--dataset hf-disk reads with Hugging Face datasets, which is not "
                        f"installed: {INSTALL}") from e
    return datasets


def _open(folder: Path) -> Any:
    """The ``datasets.Dataset`` saved in ``folder`` (memory-mapped: nothing is read yet)."""
    datasets = _datasets()
    try:
        return datasets.load_from_disk(str(folder))
    except (OSError, ValueError) as e:  # pyarrow's errors are among these
        raise DataError(f"{folder} is not a readable save_to_disk folder ({e}); save it again "
                        "with save_to_disk") from e


def _image_column(dataset: Any, folder: Path) -> str:
    image = _datasets().Image
    names = [n for n, f in dataset.features.items() if isinstance(f, image)]
    if not names:
        raise DataError(f"{folder} has no Image column (columns: "
                        f"{', '.join(dataset.column_names)}); cast yours with "
                        "cast_column(NAME, datasets.Image()) and save it again")
    return names[0]


def _image_rows(folder: Path, column: str) -> Any:
    """Rows of the image column only, as stored bytes: {"bytes": ..., "path": ...}."""
    dataset = _open(folder).select_columns([column])
    return dataset.cast_column(column, _datasets().Image(decode=False))


class HFDiskDataset(StreamingDataset):
    """A ``save_to_disk`` split: ``StreamingDataset``'s decoding and bad-image accounting, the
    image bytes read from the memory-mapped Arrow files (opened once per process).

    Args:
        root: the split's save_to_disk folder.
        image_column: the column with the images.
        labels: per row, its class index.
        classes: class names.
        info: the registry entry handed on to the models (stats, img_size, num_classes).
        transform: maps uint8 [C, H, W] to uint8 [C, h, w] of a fixed size.
    """

    def __init__(self, root: Path, image_column: str, labels: Sequence[int], classes: list[str],
                 info: DatasetInfo,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__(root, [str(i) for i in range(len(labels))], list(labels), classes, info,
                         None, transform)
        self.image_column = image_column
        self._rows: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_rows": None}  # reopened in each process

    def where(self, index: int) -> str:
        return f"{self.root}[{index}]"

    def _read(self, index: int) -> bytes:
        if self._rows is None or self._pid != os.getpid():
            self._rows, self._pid = _image_rows(self.root, self.image_column), os.getpid()
        cell = self._rows[index][self.image_column]
        if cell["bytes"] is not None:
            return cell["bytes"]
        if cell["path"]:  # an image saved by reference: a missing file counts as a bad image
            return Path(cell["path"]).read_bytes()
        raise OSError("the row holds no image")


def _labels(dataset: Any, folder: Path) -> np.ndarray:
    if LABEL_COLUMN not in dataset.column_names:
        raise DataError(f"{folder} has no {LABEL_COLUMN!r} column (columns: "
                        f"{', '.join(dataset.column_names)}); rename yours with "
                        f"rename_column(NAME, {LABEL_COLUMN!r}) and save it again")
    try:
        labels = np.asarray(dataset[LABEL_COLUMN], dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{folder}: the {LABEL_COLUMN!r} column does not hold integer classes "
                        f"({e}); store class indices, e.g. with a ClassLabel feature") from e
    if len(labels) and labels.min() < 0:
        row = int(np.argmax(labels < 0))
        raise DataError(f"{folder}[{row}] has label {labels[row]}: unlabelled rows cannot be "
                        "trained or evaluated here; filter them out and save again")
    return labels


def _load_hf_disk(info: DatasetInfo, split: str, found: dict[str, Path],
                  opts: _Options) -> HFDiskDataset:
    folder = found[split]
    dataset = _open(folder)
    column = _image_column(dataset, folder)
    labels = _labels(dataset, folder)
    if not len(labels):
        raise DataError(f"{folder} holds no rows; save a split with images and labels")
    feature = dataset.features[LABEL_COLUMN]
    if isinstance(feature, _datasets().ClassLabel):
        classes = list(feature.names)
    else:  # plain integers: both splits decide, so that they agree on num_classes
        top = max([int(labels.max())] + [int(_labels(_open(f), f).max(initial=0))
                                         for s, f in found.items() if s != split])
        classes = [str(i) for i in range(top + 1)]
    if labels.max() >= len(classes):
        row = int(np.argmax(labels >= len(classes)))
        raise DataError(f"{folder}[{row}] has label {labels[row]}, but the ClassLabel lists "
                        f"{len(classes)} classes; fix the label or the feature")
    info = replace(info, num_classes=len(classes))
    return HFDiskDataset(folder, column, labels.tolist(), classes, info)


def register() -> None:
    """Add this module's data sets to the registry (called once, by ``mae_bench.data.catalog``)."""
    register_dataset(
        DatasetInfo(
            name="hf-disk",
            description="a Hugging Face datasets folder written by save_to_disk, streamed",
            channels=3,
            img_size=224,
            num_classes=None,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            splits=("train", "test"),
            needs_data_dir=True,
            formats="DatasetDict.save_to_disk: dataset_dict.json, train/ and test/ (or "
            "validation/) with an Image column and a label column",
            how_to_get=f"save yours: load_dataset(...).save_to_disk(DIR) ({INSTALL})",
        ),
        find=_find_hf_disk,
        load=_load_hf_disk,
        expected="a save_to_disk folder: dataset_dict.json with train and test (or validation) "
        "splits, or one saved Dataset",
    )
