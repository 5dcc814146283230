"""The dataset registry: register a format, look a name up, find its files, load a split.

``load_dataset(name, split, data_dir)`` checks the name, the split and the data folder (each
problem a one-line ``DataError`` naming the path and the fix), then hands over to the format's
loader. Importing ``mae_bench.data`` registers the built-in formats.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mae_bench.data.datasets import AnyDataset, ArrayDataset, StreamingDataset
from mae_bench.data.info import DatasetInfo
from mae_bench.errors import DataError, MaeBenchError

log = logging.getLogger("mae_bench.data")  # one logger name for the whole package


@dataclass(frozen=True)
class _Options:
    cache_dir: Path
    max_in_memory_bytes: int
    shuffle_buffer: int | None = None  # tar shards' shuffle buffer (None: the format's default)


# find(root) -> {split: where its files are}; cheap (names and sizes only), {} when nothing fits.
Finder = Callable[[Path], dict[str, Any]]
# load(info, split, found, options): found is what find returned (one split may need another).
Loader = Callable[[DatasetInfo, str, dict[str, Any], _Options], AnyDataset]


@dataclass(frozen=True)
class _Format:
    find: Finder
    load: Loader
    expected: str  # the layout ``find`` looks for, for error messages
    patterns: bool = False  # the data dir may be a file-name pattern (see register_dataset)


DATASETS: dict[str, DatasetInfo] = {}
_FORMATS: dict[str, _Format] = {}
# Folders searched when neither --data-dir nor $MAE_BENCH_DATA/<name> (nor the cache) has data.
_SYSTEM_DIRS: dict[str, tuple[Path, ...]] = {
    "fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),),  # apt: dataset-fashion-mnist
}


def register_dataset(info: DatasetInfo, find: Finder, load: Loader, expected: str, *,
                     patterns: bool = False) -> DatasetInfo:
    """Adds a data set to the registry.

    Args:
        info: its description; ``info.name`` is the registry key.
        find: maps a data folder to ``{split: source}`` without decoding anything.
        load: ``(info, split, found, options) -> ArrayDataset | StreamingDataset``.
        expected: the files ``find`` looks for, quoted in error messages.
        patterns: the data dir may also be a pattern of file names, with braces in its last
            part (shards: ``DIR/train-{000000..000099}.tar``): the folder holding the files is
            checked, and ``find`` gets the pattern itself.
    """
    if info.name in DATASETS:
        raise ValueError(f"dataset {info.name!r} is registered twice")
    DATASETS[info.name] = info
    _FORMATS[info.name] = _Format(find, load, expected, patterns)
    return info


def get_dataset_info(name: str) -> DatasetInfo:
    """The registry entry for ``name``; DataError listing the valid names when unknown."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    return DATASETS[name]


def default_data_dir(name: str) -> Path | None:
    """Where ``name`` is looked for when no data dir is given; None for embedded data.

    ``$MAE_BENCH_DATA/<name>`` if that variable is set, else ``~/.cache/mae-bench/data/<name>``;
    when that folder does not exist, a system copy (Debian's dataset-fashion-mnist) if present.
    """
    if not get_dataset_info(name).needs_data_dir:
        return None
    base = os.environ.get("MAE_BENCH_DATA")
    primary = Path(base) / name if base else Path.home() / ".cache" / "mae-bench" / "data" / name
    if not primary.exists():
        for system_dir in _SYSTEM_DIRS.get(name, ()):
            if system_dir.is_dir():
                return system_dir
    return primary


def _default_cache_dir() -> Path:
    return Path(os.environ.get("MAE_BENCH_CACHE") or Path.home() / ".cache" / "mae-bench")


def _checked_root(info: DatasetInfo, data_dir: str | Path | None) -> Path:
    """The data folder to read: it exists, is a folder and is not empty. For a format that reads
    file-name patterns, a pattern is returned as given once the folder holding it passes."""
    given = data_dir is not None
    path = Path(data_dir).expanduser() if given else default_data_dir(info.name)
    assert path is not None  # only embedded data sets have no folder
    # Only a pattern's folder can be checked here; ``find`` expands the names (and says when
    # none exists). Every other data dir is the folder itself, with the messages below.
    braces = "{" in path.name or "}" in path.name
    root = path.parent if _FORMATS[info.name].patterns and braces else path
    origin = "data dir" if given else "default data dir (pass --data-dir or set MAE_BENCH_DATA)"
    if not root.exists():
        raise DataError(
            f"{origin} {root} for {info.name} does not exist; get it: {info.how_to_get}"
        )
    if not root.is_dir():
        raise DataError(f"{origin} {root} for {info.name} is a file; pass the folder that holds it")
    if next(root.iterdir(), None) is None:
        raise DataError(f"{origin} {root} for {info.name} is empty; get it: {info.how_to_get}")
    return path


def _find(info: DatasetInfo, root: Path) -> dict[str, Any]:
    found = _FORMATS[info.name].find(root)
    if not found:
        others = _read_by_others(info.name, root)
        hint = f"it holds {' or '.join(others)} data (--dataset {others[0]}); " if others else ""
        raise DataError(
            f"{root} does not hold {info.name}: expected {_FORMATS[info.name].expected}; "
            f"{hint}get it: {info.how_to_get}"
        )
    return found


def _read_by_others(name: str, root: Path) -> list[str]:
    """The other data sets whose files are in ``root`` (an image folder given as mnist is
    imagefolder data). When a generic format (classes known only from the data) reads the
    folder, the fixed data sets that also accept image folders (cifar) are left out: their
    classes are checked only when loading."""
    others = [o for o, i in DATASETS.items()
              if o != name and i.needs_data_dir and _FORMATS[o].find(root)]
    generic = [o for o in others if DATASETS[o].num_classes is None]
    return generic or others


def available_splits(name: str, data_dir: str | Path | None) -> tuple[str, ...]:
    """The splits of ``name`` found in ``data_dir`` (all of an embedded data set's); none when
    the folder is missing or holds something else. Decodes nothing."""
    info = get_dataset_info(name)
    if not info.needs_data_dir:
        return info.splits
    try:
        found = _find(info, _checked_root(info, data_dir))
    except DataError:
        return ()
    return tuple(s for s in info.splits if s in found)


def dataset_status(name: str, data_dir: str | Path | None) -> tuple[bool, str]:
    """(found, one line: the folder looked at and which splits are there). Decodes nothing."""
    info = get_dataset_info(name)
    if not info.needs_data_dir:
        return True, "embedded (scikit-learn load_digits), nothing to get"
    try:
        root = _checked_root(info, data_dir)
        found = _find(info, root)
    except DataError as e:
        return False, str(e)
    missing = [s for s in info.splits if s not in found]
    return True, f"{root}: found {', '.join(found)}" + (
        f"; missing {', '.join(missing)}" if missing else ""
    )


def load_dataset(
    name: str,
    split: str,
    data_dir: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    max_in_memory_bytes: int = 4 * 2**30,
    shuffle_buffer: int | None = None,
) -> ArrayDataset | StreamingDataset:
    """Loads one split of a registered data set.

    Args:
        name: registry key (see ``DATASETS``).
        split: one of ``get_dataset_info(name).splits``.
        data_dir: the folder holding the files; None: ``default_data_dir(name)``.
        cache_dir: where decoded image folders (.npz) and extracted .tar.gz archives go;
            None: ``$MAE_BENCH_CACHE`` or ``~/.cache/mae-bench``. Sources are never written.
        max_in_memory_bytes: image folders whose decoded pixels exceed this are streamed.
        shuffle_buffer: samples in a streamed format's shuffle buffer (tar shards); None: its
            default.

    Returns:
        An ArrayDataset (uint8 [N, C, H, W] in memory) or, for large image folders, a
        StreamingDataset.
    """
    info = get_dataset_info(name)
    if split not in info.splits:
        raise DataError(
            f"unknown split {split!r} for {name}; valid splits: {', '.join(info.splits)}"
        )
    options = _Options(Path(cache_dir or _default_cache_dir()).expanduser(), max_in_memory_bytes,
                       shuffle_buffer)
    if not info.needs_data_dir:
        if data_dir is not None:
            log.warning("%s is embedded; data dir %s is ignored", name, data_dir)
        return _FORMATS[name].load(info, split, {}, options)
    root = _checked_root(info, data_dir)
    found = _find(info, root)
    if split not in found:
        raise DataError(
            f"{root} has no {split} split of {name} (found: {', '.join(found)}); "
            f"expected {_FORMATS[name].expected}"
        )
    return _FORMATS[name].load(info, split, found, options)


@dataclass(frozen=True)
class DatasetCheck:
    """What ``check_dataset`` found.

    Attributes:
        usable: the files are there and a split loads.
        detail: one line: the folder and the splits found (and images skipped), or the problem.
        info: the data set as loaded (an image folder's own size, channels and classes); the
            registry's entry when it could not be loaded.
    """

    usable: bool
    detail: str
    info: DatasetInfo


def check_dataset(name: str, data_dir: str | Path | None) -> DatasetCheck:
    """Whether ``name`` can be used from ``data_dir``: ``dataset_status``, then its train split
    (or the first split found) is loaded, so that a folder with the right layout but the wrong
    content is not usable: image folders of other classes than CIFAR's, too many unreadable
    images, truncated files. Decoded image folders are cached, so only the first check costs a
    decode."""
    info = get_dataset_info(name)
    found, detail = dataset_status(name, data_dir)
    if not found or not info.needs_data_dir:
        return DatasetCheck(found, detail, info)
    root = _checked_root(info, data_dir)
    splits = _find(info, root)
    split = "train" if "train" in splits else next(s for s in info.splits if s in splits)
    try:
        dataset = load_dataset(name, split, root)
    except (MaeBenchError, OSError) as e:  # a DataError above all
        return DatasetCheck(False, str(e), info)
    loaded = dataset.info
    if isinstance(dataset, ArrayDataset):  # the size and channels of the images themselves
        channels, h, w = dataset.images.shape[1:]
        loaded = replace(loaded, channels=channels, img_size=min(h, w))
    if dataset.bad_images:
        detail += f"; {dataset.bad_images} unreadable image(s) in {split} skipped"
    if info.num_classes is not None and loaded.img_size != info.img_size:  # e.g. CIFAR as files
        detail += f"; its images are {loaded.img_size} px, not {name}'s {info.img_size}"
    return DatasetCheck(True, detail, loaded)
