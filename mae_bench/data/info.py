"""``DatasetInfo``: what the benchmark knows about a data set before reading it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetInfo:
    """What the benchmark knows about a data set before reading it.

    Attributes:
        name: registry key, e.g. "cifar10".
        description: one line.
        channels: 1 or 3, as ``load_dataset`` returns them.
        img_size: default training image size.
        num_classes: None when only known after reading (imagefolder).
        mean: per-channel normalisation mean in [0, 1] units.
        std: per-channel normalisation std in [0, 1] units.
        splits: the split names ``load_dataset`` accepts.
        needs_data_dir: False only for embedded data (digits).
        formats: the files it reads, for ``mae-bench datasets``.
        how_to_get: one line: where the files come from.
        notes: more lines for ``mae-bench datasets NAME``: how it is read, the published recipes
            that use it.
    """

    name: str
    description: str
    channels: int
    img_size: int
    num_classes: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    splits: tuple[str, ...]
    needs_data_dir: bool
    formats: str
    how_to_get: str
    notes: tuple[str, ...] = ()
