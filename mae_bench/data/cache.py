"""The decode cache: a decoded image split stored as one .npz under ``<cache_dir>/arrays``.

The file name hashes the format version, the data set, the source path and its stamp (names,
sizes and mtimes), so a changed source is decoded again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mae_bench.data.info import DatasetInfo
from mae_bench.data.registry import _Options
from mae_bench.files import atomic_file

log = logging.getLogger("mae_bench.data")  # one logger name for the whole package

CACHE_FORMAT = 2  # bump when the cached arrays change meaning; old cache files are then ignored


@dataclass
class _Decoded:
    images: torch.Tensor  # uint8 [N, 3, H, W]
    labels: torch.Tensor  # int64 [N]
    classes: list[str]
    bad_images: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    gray_images: int  # images with three equal channels (grayscale files)
    colour_examples: list[str]  # where the first few of the other (colour) images are


def _cache_path(info: DatasetInfo, source: Path, stamp: str, opts: _Options) -> Path:
    key = json.dumps([CACHE_FORMAT, info.name, str(source.resolve()), stamp])
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return opts.cache_dir / "arrays" / f"{info.name}-{source.name}-{digest}.npz"


def _read_cache(path: Path, budget: int) -> _Decoded | None:
    """The decoded split stored at ``path``, or one decoded earlier in the same
    ``cache_writes_held`` block and not written yet (so a command that reads a split twice,
    as imagefolder's test split reads the train split, decodes and warns once); None if
    neither exists or its pixels exceed ``budget``."""
    for pending in _HELD:
        for held_path, decoded in pending:
            if held_path == path:
                return None if decoded.images.numel() > budget else decoded
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(np.prod(z["shape"])) > budget:
                return None
            return _Decoded(
                torch.from_numpy(z["images"]),
                torch.from_numpy(z["labels"]),
                [str(c) for c in z["classes"]],
                int(z["bad_images"]),
                tuple(float(m) for m in z["mean"]),
                tuple(float(s) for s in z["std"]),
                int(z["gray_images"]),
                [str(w) for w in z["colour_examples"]],
            )
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        log.warning("ignoring unreadable cache file %s (%s)", path, e)
        return None


_HELD: list[list[tuple[Path, _Decoded]]] = []  # one list per open ``cache_writes_held``


@contextlib.contextmanager
def cache_writes_held() -> Iterator[None]:
    """Decode-cache files produced inside are written when the block ends without an error,
    not before: a command that decodes a folder and is then refused for bad input (a mask
    ratio or an image size that does not fit the decoded images) leaves nothing behind."""
    pending: list[tuple[Path, _Decoded]] = []
    _HELD.append(pending)
    try:
        yield
    finally:
        _HELD.remove(pending)
    for path, decoded in pending:  # only reached without an error
        _write_cache(path, decoded)


def _write_cache(path: Path, decoded: _Decoded) -> None:
    """Writes atomically (temp file + rename); a read-only cache only costs a warning. Inside
    ``cache_writes_held`` the write waits for the block's end."""
    if _HELD:
        _HELD[-1].append((path, decoded))
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, "wb") as f:
            np.savez(
                f,
                images=decoded.images.numpy(),
                labels=decoded.labels.numpy(),
                shape=np.array(decoded.images.shape),
                classes=np.array(decoded.classes),
                bad_images=decoded.bad_images,
                mean=decoded.mean,
                std=decoded.std,
                gray_images=decoded.gray_images,
                colour_examples=np.array(decoded.colour_examples, dtype=str),
            )
    except OSError as e:
        log.warning("could not write cache file %s (%s); decoding again next time", path, e)
