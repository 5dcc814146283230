"""The two kinds of data set ``load_dataset`` returns.

``ArrayDataset`` holds decoded uint8 images in memory; ``StreamingDataset`` decodes one image per
``__getitem__`` (in DataLoader workers) and counts the unreadable ones in shared memory.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import mae_bench.data.images as images  # the module, so a patched _open_rgb reaches workers
from mae_bench.data.images import BAD_IMAGE_LIMIT
from mae_bench.data.info import DatasetInfo
from mae_bench.errors import DataError

log = logging.getLogger("mae_bench.data")  # one logger name for the whole package


@dataclass(eq=False)
class ArrayDataset(torch.utils.data.Dataset):
    """A data set decoded once and held in memory; ``ds[i]`` is ``(uint8 [C, H, W], label)``.

    Attributes:
        images: uint8 [N, C, H, W], contiguous.
        labels: int64 [N]; -1 marks unlabeled samples.
        classes: class names that ``labels`` index.
        info: the registry entry; for imagefolder a copy with num_classes, img_size, mean and std
            taken from the data.
        bad_images: unreadable images skipped while decoding.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    info: DatasetInfo
    bad_images: int = 0

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


_COUNT_SLOTS = 65  # row 0: the main process; row 1 + k: DataLoader worker k (mod 64)


class StreamingDataset(torch.utils.data.Dataset):
    """An image folder too large for memory, decoded one image per ``__getitem__``.

    An unreadable image is logged, counted and replaced by the next readable index, so batches
    keep their size. Counts live in shared memory, one row per worker so that workers never race,
    and survive fork-based DataLoader workers: call ``check_bad_fraction()`` after each epoch.

    Args:
        root: a folder (members are paths relative to it) or an uncompressed .tar (members are
            read by offset; each worker process opens the file once).
        members: per sample, its relative path or tar member name.
        labels: per sample, its class index.
        classes: class names.
        info: the registry entry handed on to the models (stats, img_size).
        offsets: [N, 2] (data offset, size) inside the tar; None for a folder.
        transform: maps uint8 [C, H, W] to uint8 [C, h, w] of a fixed size; or, when it has a
            true ``reads_bytes`` attribute, ``(file bytes, where, index)`` to what the collate
            function of ``mae_bench.data.pipeline`` batches.
    """

    def __init__(
        self,
        root: Path,
        members: list[str],
        labels: list[int],
        classes: list[str],
        info: DatasetInfo,
        offsets: np.ndarray | None = None,
        transform: Callable[..., Any] | None = None,
    ) -> None:
        self.root = Path(root)
        self._members = np.array([m.encode() for m in members])  # bytes, not objects: fork-friendly
        self._offsets = offsets
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.classes = list(classes)
        self.info = info
        self.transform = transform
        self._counts = torch.zeros(_COUNT_SLOTS, 2, dtype=torch.int64).share_memory_()
        self._handle: io.BufferedReader | None = None
        self._pid = -1

    def set_transform(self, transform: Callable[..., Any] | None) -> None:
        """Sets the transform applied to every image (see the class docstring)."""
        self.transform = transform

    def __len__(self) -> int:
        return len(self._members)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handle": None, "_pid": -1}  # file handles stay per process

    @property
    def bad_images(self) -> int:
        return int(self._counts[:, 0].sum())

    @property
    def seen_images(self) -> int:
        return int(self._counts[:, 1].sum())

    def check_bad_fraction(self, limit: float = BAD_IMAGE_LIMIT) -> None:
        """Raises DataError once more than ``limit`` of the (at least 100) images seen were bad."""
        bad, seen = self.bad_images, self.seen_images
        if seen >= 100 and bad > limit * seen:
            raise DataError(
                f"{bad} of {seen} images in {self.root} could not be read (over {limit:.0%}); "
                "fix or remove the files named in the warnings above"
            )

    def where(self, index: int) -> str:
        member = self._members[index].decode()
        return f"{self.root}/{member}" if self._offsets is None else f"{self.root}:{member}"

    def _read(self, index: int) -> bytes:
        if self._offsets is None:
            return (self.root / self._members[index].decode()).read_bytes()
        if self._handle is None or self._pid != os.getpid():
            self._handle, self._pid = open(self.root, "rb"), os.getpid()
        offset, size = self._offsets[index]
        self._handle.seek(int(offset))
        return self._handle.read(int(size))

    def _sample(self, i: int) -> Any:
        """Image ``i`` through the transform; None (warned) when unreadable. A transform with
        ``reads_bytes`` (``mae_bench.data.pipeline``) gets the file's bytes, its location and
        ``i``, and decodes what it needs itself."""
        try:
            data = self._read(i)
        except OSError as e:
            log.warning("skipping unreadable image %s (%s)", self.where(i), e)
            return None
        if getattr(self.transform, "reads_bytes", False):
            return self.transform(data, self.where(i), i)  # type: ignore[call-arg]
        image = images._open_rgb(data, self.where(i))
        if image is None:
            return None
        chw = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # [3, H, W]
        return chw if self.transform is None else self.transform(chw)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        worker = torch.utils.data.get_worker_info()
        slot = 0 if worker is None else 1 + worker.id % (_COUNT_SLOTS - 1)
        for step in range(len(self)):
            i = (index + step) % len(self)
            sample = self._sample(i)
            self._counts[slot, 1] += 1
            if sample is not None:
                return sample, int(self.labels[i])
            self._counts[slot, 0] += 1
        raise DataError(f"no image in {self.root} could be read; check the warnings above")


AnyDataset = ArrayDataset | StreamingDataset


def _array_dataset(
    info: DatasetInfo, images: np.ndarray, labels: Any, classes: Any
) -> ArrayDataset:
    return ArrayDataset(
        torch.from_numpy(np.ascontiguousarray(images)),
        torch.as_tensor(np.asarray(labels, dtype=np.int64)),
        list(classes),
        info,
    )
