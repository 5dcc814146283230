"""Splits stored as class folders of image files (a folder or a .tar/.tar.gz of it).

Shared by imagefolder, CIFAR stored as images and the ImageNet presets: find the split entries,
decode a split into memory through the cache, or stream it when its pixels exceed the memory
budget. A data set of known classes may take them from a folder holding more (ImageNet-100 from
ImageNet-1k); the other class folders are left out before anything is decoded.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from mae_bench.data.cache import _cache_path, _Decoded, _read_cache, _write_cache
from mae_bench.data.datasets import StreamingDataset
from mae_bench.data.images import _channel_stats, _common_size, _decode, _gray_mask, _sample
from mae_bench.data.index import (
    IMAGE_SUFFIXES,
    _classify,
    _extract,
    _Index,
    _index_tar,
    _is_plain_tar,
    _read_compressed_tar,
    _walk,
)
from mae_bench.data.info import DatasetInfo
from mae_bench.data.registry import _Options
from mae_bench.errors import DataError

log = logging.getLogger("mae_bench.data")  # one logger name for the whole package

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")

_EXAMPLES = 3  # colour images a warning names (and the decode cache keeps the names of)


def _find_image_splits(
    root: Path, test_names: tuple[str, ...] = ("test", "val")
) -> dict[str, Path]:
    """{split: folder or archive} for ``train`` and ``test`` (or ``val``) entries in ``root``;
    ``test_names``: the names the test split may have, the first found wins (ImageNet's test/
    holds unlabelled images, so its presets look for val/ first)."""
    found = {}
    for split, names in (("train", ("train",)), ("test", test_names)):
        for name in names:
            hits = [root / name] if (root / name).is_dir() else []
            hits += [
                root / f"{name}{s}" for s in ARCHIVE_SUFFIXES if (root / f"{name}{s}").is_file()
            ]
            if hits:
                found[split] = hits[0]
                break
    return found


def _only(index: _Index, classes: tuple[str, ...] | None) -> tuple[_Index, list[int]]:
    """The images of ``index`` whose class folder is one of ``classes`` (all when None), and
    their positions in ``index``."""
    positions = list(range(len(index.members)))
    if classes is None:
        return index, positions
    wanted = set(classes)
    positions = [i for i in positions if index.class_names[i] in wanted]
    if len(positions) < len(index.members):
        others = len(set(index.class_names) - wanted)
        log.info("%s: %d other class folder(s) left out", index.root, others)
    return _Index(
        index.root,
        [index.members[i] for i in positions],
        [index.class_names[i] for i in positions],
        None if index.offsets is None else index.offsets[positions],
    ), positions


def _labels(
    index: _Index,
    class_order: tuple[str, ...] | None,
    info: DatasetInfo,
    from_superset: bool = False,
) -> tuple[list[str], list[int]]:
    """Class names and per-image label ids; DataError when there are no images or (for CIFAR
    stored as image folders, the ImageNet presets) the class folders are not the data set's
    classes. ``from_superset``: other class folders were left out already, so only missing
    ones can be wrong; the error names a few."""
    if class_order is not None and from_superset:
        missing = sorted(set(class_order) - set(index.class_names))
        if missing:
            raise DataError(
                f"class folders in {index.root} lack {len(missing)} of the {len(class_order)} "
                f"{info.name} classes ({', '.join(missing[:5])}{', ...' * (len(missing) > 5)}); "
                "give a folder that holds all of them (more class folders are left out)"
            )
    if not index.members:
        raise DataError(
            f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in class folders under "
            f"{index.root}; expected {index.root}/<class>/<image>"
        )
    found = sorted(set(index.class_names))
    if class_order is not None and set(found) != set(class_order):
        raise DataError(
            f"class folders in {index.root} ({', '.join(found[:12])}{', ...' * (len(found) > 12)}) "
            f"are not the {len(class_order)} {info.name} classes "
            f"({', '.join(class_order[:10])}...); read your own classes with the imagefolder "
            "data set (--dataset imagefolder)"
        )
    classes = list(class_order or found)
    ids = {c: i for i, c in enumerate(classes)}
    return classes, [ids[c] for c in index.class_names]


def _load_image_split(
    info: DatasetInfo,
    source: Path,
    class_order: tuple[str, ...] | None,
    opts: _Options,
    from_superset: bool = False,
) -> _Decoded | StreamingDataset:
    """Decodes one split (a folder or an archive of class folders) into memory, through the
    cache, or returns a StreamingDataset when its pixels exceed ``opts.max_in_memory_bytes``.

    Args:
        info: the data set (its name keys the cache and the errors).
        source: the split's folder or archive.
        class_order: the data set's classes in label order; None: the folder's own, sorted.
        opts: cache folder and memory budget.
        from_superset: the folder may hold more classes than ``class_order`` (ImageNet-100
            read from all of ImageNet-1k); the others are left out before anything is decoded.
    """
    budget = opts.max_in_memory_bytes
    keep = class_order if from_superset else None
    if source.is_dir():
        names, stamp = _walk(source)
        index: _Index | None = _classify(source, names, strip_prefix=False)
    else:
        st = source.stat()
        index, stamp = None, f"{st.st_size}:{st.st_mtime_ns}"
    cache = _cache_path(info, source, stamp, opts)
    cached = _read_cache(cache, budget)
    if cached is not None:
        log.info("%s: read decoded images from cache %s", source, cache)
        return cached
    if index is not None or _is_plain_tar(source):
        index, _ = _only(index or _index_tar(source), keep)
        classes, labels = _labels(index, class_order, info, from_superset)
        picks = _sample(len(index.members))
        sample = _Index(index.root, [index.members[i] for i in picks], [], _rows(index, picks))
        size = _common_size(sample.read_all())
        fits = len(labels) * 3 * size[0] * size[1] <= budget
        decoded = _decode(index, index.read_all(), labels, size, budget) if fits else None
    else:  # a compressed tar: one pass reads it all, unless it is obviously too big
        index, blobs = _read_compressed_tar(source, budget)
        index, kept = _only(index, keep)
        blobs = None if blobs is None else [blobs[i] for i in kept]
        classes, labels = _labels(index, class_order, info, from_superset)
        size = _common_size(blobs, _sample(len(blobs))) if blobs else (1, 1)
        decoded = None if blobs is None else _decode(index, blobs, labels, size, budget)
        if decoded is None:  # stream from an extracted copy, made once in the cache
            extracted = _extract(source, opts.cache_dir / "extracted" / cache.stem)
            index, _ = _only(_classify(extracted, _walk(extracted)[0], strip_prefix=True), keep)
            classes, labels = _labels(index, class_order, info, from_superset)
    if decoded is None:
        log.info("%s: %d images exceed %d bytes in memory; streaming", source, len(labels), budget)
        info = replace(info, num_classes=len(classes))
        return StreamingDataset(index.root, index.members, labels, classes, info, index.offsets)
    images, kept_labels, kept = decoded
    mean, std = _channel_stats(images)
    gray = _gray_mask(images)
    colour_examples = [index.where(kept[i]) for i in np.flatnonzero(~gray)[:_EXAMPLES]]
    result = _Decoded(
        torch.from_numpy(images), torch.from_numpy(kept_labels), classes,
        len(index.members) - len(kept), mean, std, int(gray.sum()), colour_examples,
    )
    _write_cache(cache, result)
    return result


def _rows(index: _Index, picks: list[int]) -> np.ndarray | None:
    return None if index.offsets is None else index.offsets[picks]
