"""shards: WebDataset-style tar shards, streamed one image per ``__getitem__``.

Layout: uncompressed tar files in which each sample is ``KEY.jpg`` (or .jpeg, .png, .webp, any
of ``IMAGE_SUFFIXES``) plus ``KEY.cls``, an ASCII integer label, consecutive in the tar. KEY is a
member's path up to the first dot of its file name, as WebDataset splits it; a sample's first
image is used and its other members (``KEY.json``, ``KEY.txt``) are ignored. ``--data-dir`` is
either a folder holding ``train-*.tar`` and ``test-*.tar`` (or ``val-*.tar``) shards, or a
pattern naming one split's shards, ``DIR/train-{000000..000099}.tar`` (zero-padded numeric
ranges; the other split is then ``test-*.tar`` or ``train-*.tar`` beside them).
``mae-bench shard`` writes such shards from an image folder (``mae_bench/data/shard_writer.py``).

Labels are the integers as written, never renumbered, so a label means the same in both splits
and in any other reader of the shards. Class names come from ``classes.txt`` (one name a line,
in label order) or ``classes.json`` beside the shards; without either, the classes are the
numbers 0 .. the largest label found in either split. ``classes.json`` is a list of names, or
an object with ``classes`` and optionally ``mean``, ``std`` (per channel, in [0, 1]) and
``img_size``; without them the ImageNet statistics and 224 px apply.

Each shard is indexed once (member names, data offsets and sizes, labels) and the index cached
under ``<cache_dir>/shards``, keyed by the shard's path, size and mtime. The training order is
``ShardDataset.epoch_order``: shards in a seeded order, a contiguous slice per rank, a
WebDataset shuffle buffer, so that reads stay near-sequential inside each shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tarfile
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mae_bench.data.datasets import StreamingDataset
from mae_bench.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD
from mae_bench.data.index import IMAGE_SUFFIXES, _is_plain_tar
from mae_bench.data.info import DatasetInfo
from mae_bench.data.registry import _Options, register_dataset
from mae_bench.errors import DataError
from mae_bench.files import atomic_file

log = logging.getLogger("mae_bench.data")  # one logger name for the whole package

SPLIT_PREFIXES = {"train": ("train",), "test": ("test", "val")}  # shard name: PREFIX-*.tar
LABEL_EXT = "cls"
IMAGE_EXTS = frozenset(s[1:] for s in IMAGE_SUFFIXES)
DEFAULT_SHUFFLE_BUFFER = 1000  # samples; WebDataset's usual size
INDEX_FORMAT = 1  # bump when the cached index changes meaning; old files are then ignored
_OPEN_SHARDS = 4  # file handles kept per process: a shuffle buffer spans a shard boundary
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_BLOCK = 512  # a tar block


def expand_pattern(name: str) -> list[str]:
    """Expands the numeric ranges of a shard name: ``a-{000..002}.tar`` -> ``a-000.tar``,
    ``a-001.tar``, ``a-002.tar``; several ranges multiply. A bound with a leading zero pads every
    number to the longer bound's width, as WebDataset's braceexpand does.

    Raises:
        DataError: braces that are not ``{LOW..HIGH}`` with LOW <= HIGH.
    """
    match = _RANGE.search(name)
    if match is None:
        if "{" in name or "}" in name:
            raise DataError(
                f"{name}: unsupported pattern; use zero-padded numeric ranges such as "
                "train-{000000..000099}.tar"
            )
        return [name]
    low, high = match.group(1), match.group(2)
    if int(low) > int(high):
        raise DataError(f"{name}: the range {match.group(0)} runs backwards; write it low..high")
    padded = (len(low) > 1 and low[0] == "0") or (len(high) > 1 and high[0] == "0")
    width = max(len(low), len(high)) if padded else 0
    head, tail = name[: match.start()], expand_pattern(name[match.end():])
    return [f"{head}{i:0{width}d}{rest}" for i in range(int(low), int(high) + 1) for rest in tail]


def _is_pattern(root: Path) -> bool:
    return "{" in root.name or "}" in root.name


def _shards_beside(folder: Path, split: str) -> list[Path]:
    for prefix in SPLIT_PREFIXES[split]:
        hits = sorted(p for p in folder.glob(f"{prefix}-*.tar") if p.is_file())
        if hits:
            return hits
    return []


def _find_shards(root: Path) -> dict[str, list[Path]]:
    """{split: its shard files, in name order} from a folder or a pattern; {} when a folder holds
    none. Lists names only: nothing is opened.

    Raises:
        DataError: a pattern that matches no shard, or only some of them.
    """
    if not _is_pattern(root):
        if not root.is_dir():
            return {}
        found = {s: _shards_beside(root, s) for s in SPLIT_PREFIXES}
        return {s: shards for s, shards in found.items() if shards}
    names = expand_pattern(root.name)
    missing = [n for n in names if not (root.parent / n).is_file()]
    if len(missing) == len(names):
        raise DataError(
            f"{root} matches no shard: none of {names[0]} .. {names[-1]} is in {root.parent}; "
            "check the pattern's prefix and range"
        )
    if missing:
        raise DataError(
            f"{root}: {len(missing)} of the {len(names)} shards it names are missing "
            f"({', '.join(missing[:3])}{', ...' * (len(missing) > 3)}); fix the range or "
            "restore them"
        )
    split = "test" if root.name.startswith(SPLIT_PREFIXES["test"]) else "train"
    other = "train" if split == "test" else "test"
    found = {split: [root.parent / n for n in names], other: _shards_beside(root.parent, other)}
    return {s: found[s] for s in SPLIT_PREFIXES if found[s]}


# --- indexing one shard ----------------------------------------------------------------------


@dataclass
class _ShardIndex:
    """The samples of one shard, in file order."""

    names: np.ndarray  # [n] str: the image member of each sample
    offsets: np.ndarray  # [n, 2] int64: (data offset, size) of the image
    labels: np.ndarray  # [n] int64


def _split_name(name: str) -> tuple[str, str]:
    """(KEY, extension) as WebDataset splits a member name: at the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _parse_label(path: Path, member: str, data: bytes) -> int:
    text = data.decode("ascii", errors="replace").strip()
    if not re.fullmatch(r"\d+", text):
        raise DataError(
            f"{path}:{member} holds {data[:20]!r}, not a class label; a .cls member holds a "
            "non-negative integer in ASCII, e.g. b'3'"
        )
    return int(text)


def _index_shard(path: Path) -> _ShardIndex:
    """Reads the member headers of one shard (and its .cls labels); data is not read."""
    unreadable = f"{path} is not a readable tar archive ({{}}); re-create it (mae-bench shard) " \
                 "or remove it"
    if not _is_plain_tar(path):
        raise DataError(f"{path} is compressed; shards are read by offset, so they must be "
                        "plain .tar files: decompress it or re-create it (mae-bench shard)")
    size = path.stat().st_size
    names: list[str] = []
    offsets: list[tuple[int, int]] = []
    labels: list[int] = []
    orphans = 0

    def close(key: str | None, image: tarfile.TarInfo | None, label: int | None) -> None:
        nonlocal orphans
        if image is not None and label is None:
            raise DataError(
                f"{path}: sample {key} has an image ({image.name}) but no {key}.{LABEL_EXT} "
                "label; every sample needs its class as KEY.cls (mae-bench shard writes them)"
            )
        if image is not None and label is not None:
            names.append(image.name)
            offsets.append((image.offset_data, image.size))
            labels.append(label)
        orphans += image is None and label is not None

    try:
        with tarfile.open(path, "r:") as tf:
            key: str | None = None
            image: tarfile.TarInfo | None = None
            label: int | None = None
            for member in tf:
                if not member.isfile():
                    continue
                if member.offset_data + member.size > size:
                    raise tarfile.ReadError(f"truncated inside {member.name}")
                k, ext = _split_name(member.name)
                if k != key:  # samples are consecutive members sharing a KEY
                    close(key, image, label)
                    key, image, label = k, None, None
                if ext in IMAGE_EXTS and image is None:
                    image = member
                elif ext == LABEL_EXT:
                    label = _parse_label(path, member.name, tf.extractfile(member).read())  # type: ignore[union-attr]
            close(key, image, label)
            end = tf.offset  # where iteration stopped: a valid tar has its end marker there
        with open(path, "rb") as f:
            f.seek(end)
            marker = f.read(_BLOCK)
        if marker != bytes(_BLOCK):  # tarfile stops silently at a bad header after the first
            raise tarfile.ReadError(f"no valid header or end marker at byte {end}: truncated or "
                                    "corrupt")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(unreadable.format(e)) from e
    if orphans:
        log.warning("%s: %d .cls labels without an image skipped", path, orphans)
    return _ShardIndex(np.array(names, dtype=str), np.array(offsets, dtype=np.int64).reshape(-1, 2),
                       np.array(labels, dtype=np.int64))


def _index_file(path: Path, cache_dir: Path) -> Path:
    st = path.stat()
    key = json.dumps([INDEX_FORMAT, str(path.resolve()), st.st_size, st.st_mtime_ns])
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return cache_dir / "shards" / f"{path.stem}-{digest}.npz"


def _shard_index(path: Path, cache_dir: Path) -> _ShardIndex:
    """One shard's index, from the cache when the shard is unchanged, else read and cached (a
    read-only cache costs a warning and a re-index next time)."""
    cached = _index_file(path, cache_dir)
    if cached.is_file():
        try:
            with np.load(cached, allow_pickle=False) as z:
                return _ShardIndex(z["names"], z["offsets"], z["labels"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            log.warning("ignoring unreadable shard index %s (%s)", cached, e)
    index = _index_shard(path)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(cached, "wb") as f:
            np.savez(f, names=index.names, offsets=index.offsets, labels=index.labels)
    except OSError as e:
        log.warning("could not write shard index %s (%s); indexing again next time", cached, e)
    return index


# --- classes and statistics ------------------------------------------------------------------


@dataclass(frozen=True)
class _Metadata:
    source: Path | None  # classes.txt or classes.json; None: neither
    classes: list[str] | None
    overrides: dict[str, Any]  # DatasetInfo fields: mean, std, img_size


_JSON_KEYS = ("classes", "mean", "std", "img_size")


def _metadata(folder: Path) -> _Metadata:
    """What ``classes.txt`` or ``classes.json`` beside the shards says (never both)."""
    txt, js = folder / "classes.txt", folder / "classes.json"
    if txt.is_file() and js.is_file():
        raise DataError(f"{folder} has both classes.txt and classes.json; keep one")
    if txt.is_file():
        classes = [line.strip() for line in txt.read_text(encoding="utf-8").splitlines()]
        while classes and not classes[-1]:
            classes.pop()
        if not classes:
            raise DataError(f"{txt} is empty; list one class name a line, in label order")
        return _Metadata(txt, classes, {})
    if not js.is_file():
        return _Metadata(None, None, {})
    try:
        data = json.loads(js.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{js} is not readable JSON ({e}); fix or remove it") from e
    data = {"classes": data} if isinstance(data, list) else data
    unknown = sorted(set(data) - set(_JSON_KEYS)) if isinstance(data, dict) else []
    classes = data.get("classes") if isinstance(data, dict) else None
    if unknown or not isinstance(classes, list) or not classes:
        raise DataError(f"{js} must be a list of class names or an object with "
                        f"{', '.join(_JSON_KEYS)} (classes required); fix or remove it")
    overrides: dict[str, Any] = {}
    for stat in ("mean", "std"):
        if stat in data:
            value = data[stat]
            if not (isinstance(value, list) and len(value) == 3
                    and all(isinstance(v, int | float) for v in value)):
                raise DataError(f"{js}: {stat} must be 3 numbers in [0, 1] units, got {value!r}")
            overrides[stat] = tuple(float(v) for v in value)
    if "img_size" in data:
        if not isinstance(data["img_size"], int) or data["img_size"] < 1:
            raise DataError(f"{js}: img_size must be a positive integer, got {data['img_size']!r}")
        overrides["img_size"] = data["img_size"]
    return _Metadata(js, [str(c) for c in classes], overrides)


# --- the order of one epoch ------------------------------------------------------------------


def _buffer_shuffle(stream: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """WebDataset's shuffle buffer: fill ``size`` slots, then per incoming sample emit a random
    slot and put the sample there; the last ``size`` leave in random order. A sample moves at
    most about ``size`` places, so reads stay near their position in the stream."""
    if size <= 1 or len(stream) <= 1:
        return stream.copy()
    items = stream.tolist()  # plain ints: this loop is the cost, once per epoch
    buffer, incoming = items[:size], items[size:]
    out: list[int] = []
    for sample, slot in zip(incoming, rng.integers(0, len(buffer), len(incoming)).tolist(),
                            strict=True):
        out.append(buffer[slot])
        buffer[slot] = sample
    out.extend(buffer[k] for k in rng.permutation(len(buffer)).tolist())
    return np.array(out, dtype=np.int64)


def shard_epoch_order(shard_sizes: Sequence[int], seed: int, epoch: int, rank: int = 0,
                      world_size: int = 1, buffer_size: int = DEFAULT_SHUFFLE_BUFFER
                      ) -> torch.Tensor:
    """The sample order of one epoch for one process, a pure function of its arguments.

    The shards are permuted by a generator seeded from (seed, epoch); their samples, in file
    order, make one stream; rank r takes the contiguous slice [r*n, (r+1)*n) with
    n = N // world_size (equal counts, no duplicates, the tail dropped); a shuffle buffer of
    ``buffer_size`` samples seeded from (seed, epoch, rank) reorders the slice.

    Args:
        shard_sizes: samples per shard, in the data set's shard order (indices are numbered
            shard after shard).
        seed, epoch, rank, world_size: as ``mae_bench.data.loader.epoch_order``.
        buffer_size: shuffle buffer slots; 1 keeps the stream order.

    Returns:
        [N // world_size] int64 indices.
    """
    sizes = np.asarray(shard_sizes, dtype=np.int64)
    starts = np.cumsum(sizes) - sizes
    # distinct first words keep the two streams apart (a seed sequence pads short ones with 0s)
    perm = np.random.default_rng([0, seed, epoch]).permutation(len(sizes))
    stream = np.concatenate([np.arange(starts[s], starts[s] + sizes[s]) for s in perm] or
                            [np.zeros(0, np.int64)])
    n = len(stream) // world_size
    part = stream[rank * n:(rank + 1) * n]
    rng = np.random.default_rng([1, seed, epoch, rank])
    return torch.from_numpy(_buffer_shuffle(part, buffer_size, rng))


# --- the data set ----------------------------------------------------------------------------


class ShardDataset(StreamingDataset):
    """A split stored as tar shards: ``StreamingDataset``'s decoding and bad-image accounting,
    with images read by offset from their shard and an epoch order that follows the shards.

    Args:
        root: the folder holding the shards.
        shards: the shard files, in the order their samples are numbered.
        shard_sizes: samples per shard.
        members: per sample, ``SHARD_NAME:MEMBER`` (the image member inside its shard).
        labels: per sample, its class index.
        classes: class names.
        info: the registry entry handed on to the models (stats, img_size, num_classes).
        offsets: [N, 2] (data offset, size) of each image inside its shard.
        buffer_size: shuffle buffer of ``epoch_order``, in samples.
        transform: maps uint8 [C, H, W] to uint8 [C, h, w] of a fixed size.
    """

    def __init__(self, root: Path, shards: Sequence[Path], shard_sizes: Sequence[int],
                 members: list[str], labels: Sequence[int], classes: list[str],
                 info: DatasetInfo, offsets: np.ndarray,
                 buffer_size: int = DEFAULT_SHUFFLE_BUFFER,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__(root, members, list(labels), classes, info, offsets, transform)
        self.shards = [str(p) for p in shards]
        self.shard_sizes = np.asarray(shard_sizes, dtype=np.int64)
        self._shard_of = np.repeat(np.arange(len(self.shards), dtype=np.int32), self.shard_sizes)
        self.buffer_size = buffer_size
        self._open: OrderedDict[int, Any] = OrderedDict()  # shard -> handle, most recent last

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_open": OrderedDict()}  # handles stay per process

    def where(self, index: int) -> str:
        return f"{self.root}/{self._members[index].decode()}"

    def _read(self, index: int) -> bytes:
        if self._pid != os.getpid():  # a forked worker: the parent's handles share its offsets
            self._open, self._pid = OrderedDict(), os.getpid()
        shard = int(self._shard_of[index])
        handle = self._open.pop(shard, None)
        if handle is None:
            handle = open(self.shards[shard], "rb")
            if len(self._open) >= _OPEN_SHARDS:
                self._open.popitem(last=False)[1].close()
        self._open[shard] = handle
        offset, size = self._offsets[index]
        handle.seek(int(offset))
        return handle.read(int(size))

    def epoch_order(self, seed: int, epoch: int, rank: int = 0,
                    world_size: int = 1) -> torch.Tensor:
        """``shard_epoch_order`` of this data set's shards (the loader calls it per epoch)."""
        return shard_epoch_order(self.shard_sizes, seed, epoch, rank, world_size,
                                 self.buffer_size)


def _load_shards(info: DatasetInfo, split: str, found: dict[str, list[Path]],
                 opts: _Options) -> ShardDataset:
    shards = found[split]
    folder = shards[0].parent
    meta = _metadata(folder)
    # Without a class list, num_classes comes from the labels of both splits, so that train and
    # test agree; indexing the other split costs once (the index is cached).
    indexed = {s: [_shard_index(p, opts.cache_dir) for p in found[s]]
               for s in (found if meta.classes is None else [split])}
    parts = indexed[split]
    if not any(len(p.labels) for p in parts):
        raise DataError(
            f"no samples in the {len(shards)} {split} shard(s) in {folder}: a sample is "
            f"KEY.jpg (or {', '.join(sorted(IMAGE_EXTS - {'jpg'}))}) plus KEY.{LABEL_EXT}; "
            "write shards with mae-bench shard"
        )
    if meta.classes is None:
        top = max(int(p.labels.max()) for ps in indexed.values() for p in ps if len(p.labels))
        classes = [str(i) for i in range(top + 1)]
    else:
        classes = meta.classes
        for path, part in zip(shards, parts, strict=True):
            bad = np.flatnonzero(part.labels >= len(classes))
            if len(bad):
                raise DataError(
                    f"{path}:{part.names[bad[0]]} has label {part.labels[bad[0]]}, but "
                    f"{meta.source} lists {len(classes)} classes (0..{len(classes) - 1}); fix "
                    "the label or the class list"
                )
    members = [f"{path.name}:{name}" for path, p in zip(shards, parts, strict=True)
               for name in p.names.tolist()]
    info = replace(info, num_classes=len(classes), **meta.overrides)
    return ShardDataset(
        folder, shards, [len(p.labels) for p in parts], members,
        np.concatenate([p.labels for p in parts]).tolist(), classes, info,
        np.concatenate([p.offsets for p in parts]),
        buffer_size=opts.shuffle_buffer or DEFAULT_SHUFFLE_BUFFER,
    )


def register() -> None:
    """Add this module's data sets to the registry (called once, by ``mae_bench.data.catalog``)."""
    register_dataset(
        DatasetInfo(
            name="shards",
            description="WebDataset-style tar shards (KEY.jpg + KEY.cls), streamed",
            channels=3,
            img_size=224,
            num_classes=None,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            splits=("train", "test"),
            needs_data_dir=True,
            formats="train-*.tar and test-*.tar shards of KEY.jpg/.png/.webp + KEY.cls, or a "
            "pattern DIR/train-{000000..000099}.tar",
            how_to_get="write them from an image folder: mae-bench shard DIR --out SHARDS",
            notes=(
                "labels: the integers of KEY.cls as written; class names from classes.txt (or "
                "classes.json, which may also give mean, std and img_size) beside the shards, "
                "else 0 .. the largest label",
                "order: shards permuted per (seed, epoch), a contiguous slice of their stream "
                f"per rank, a shuffle buffer of {DEFAULT_SHUFFLE_BUFFER} samples "
                "(--shuffle-buffer); reads stay near-sequential inside a shard",
                "index: member offsets read once per shard and cached (<cache>/shards), keyed "
                "by the shard's path, size and mtime",
            ),
        ),
        find=_find_shards,
        load=_load_shards,
        expected="train-*.tar and test-*.tar (or val-*.tar) shards of KEY.jpg + KEY.cls, or a "
        "pattern DIR/train-{000000..000099}.tar",
        patterns=True,
    )
