"""Where the images of a split are: class folders on disk, or inside a tar archive.

``_Index`` lists each image (a path, or a tar member with its offset) and its class folder;
compressed archives are read in one pass or extracted once into the cache.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mae_bench.errors import DataError

log = logging.getLogger("mae_bench.data")  # one logger name for the whole package

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})


def _tar_parts(name: str) -> list[str]:
    return [p for p in name.split("/") if p not in ("", ".")]


def _is_image(parts: list[str]) -> bool:
    hidden = any(p.startswith(".") or p == "__MACOSX" for p in parts)
    return bool(parts) and not hidden and Path(parts[-1]).suffix.lower() in IMAGE_SUFFIXES


@dataclass
class _Index:
    """The images of one split: where each is and which class folder it sits in."""

    root: Path  # a folder, or a tar file
    members: list[str]  # per image: path relative to root, or tar member name
    class_names: list[str]
    offsets: np.ndarray | None = None  # [N, 2] (data offset, size) in an uncompressed tar

    def where(self, i: int) -> str:
        sep = "/" if self.offsets is None else ":"
        return f"{self.root}{sep}{self.members[i]}"

    def read_all(self) -> list[bytes]:
        if self.offsets is None:
            return [(self.root / m).read_bytes() for m in self.members]
        with open(self.root, "rb") as f:
            return [_read_at(f, int(o), int(n)) for o, n in self.offsets]


def _read_at(f: io.BufferedReader, offset: int, size: int) -> bytes:
    f.seek(offset)
    return f.read(size)


def _classify(
    root: Path, names: list[str], strip_prefix: bool, offsets: list | None = None
) -> _Index:
    """Keeps the images inside a class folder; with ``strip_prefix`` (archives), a single common
    top folder such as ``train/`` is dropped first."""
    parts = [_tar_parts(n) for n in names]
    keep = [i for i, p in enumerate(parts) if _is_image(p)]
    tops = {parts[i][0] for i in keep}
    skip = int(strip_prefix and len(tops) == 1 and all(len(parts[i]) >= 3 for i in keep))
    keep = [i for i in keep if len(parts[i]) >= 2 + skip]
    return _Index(
        root,
        [names[i] for i in keep],
        [parts[i][skip] for i in keep],
        None if offsets is None else np.array([offsets[i] for i in keep], dtype=np.int64),
    )


def _walk(folder: Path) -> tuple[list[str], str]:
    """Relative paths of all files below ``folder`` (sorted) and a digest of names, sizes and
    mtimes: the folder's cache stamp."""
    names: list[str] = []
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(folder).as_posix()
        for f in sorted(filenames):
            st = os.stat(os.path.join(dirpath, f))
            names.append(f if rel == "." else f"{rel}/{f}")
            digest.update(f"{names[-1]}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return names, digest.hexdigest()


def _is_plain_tar(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(6)
    return head[:2] != b"\x1f\x8b" and head[:3] != b"BZh" and head != b"\xfd7zXZ\x00"


def _index_tar(path: Path) -> _Index:
    try:
        with tarfile.open(path, "r:") as tf:
            members = [m for m in tf if m.isfile()]
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"{path} is not a readable tar archive ({e}); re-create it") from e
    names = [m.name for m in members]
    return _classify(path, names, True, [(m.offset_data, m.size) for m in members])


def _read_compressed_tar(path: Path, budget: int) -> tuple[_Index, list[bytes] | None]:
    """One pass over a .tar.gz: its index and image bytes (None once those pass ``budget``: the
    pixels, never smaller than the encoded bytes, would not fit either)."""
    names: list[str] = []
    blobs: list[bytes] = []
    total = 0
    try:
        with tarfile.open(path, "r|*") as tf:
            for member in tf:
                if member.isfile() and _is_image(_tar_parts(member.name)):
                    names.append(member.name)
                    total += member.size
                    if total <= budget:
                        blobs.append(tf.extractfile(member).read())  # type: ignore[union-attr]
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path} is not a readable tar archive ({e}); re-create it") from e
    index = _classify(path, names, strip_prefix=True)
    if total > budget:
        return index, None
    kept = set(index.members)
    return index, [b for n, b in zip(names, blobs, strict=True) if n in kept]


def _extract(archive: Path, dest: Path) -> Path:
    """Extracts the images of ``archive`` into ``dest`` (in the cache) once; returns ``dest``."""
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    log.info("extracting %s into %s (once)", archive, dest)
    try:
        with tarfile.open(archive, "r|*") as tf:
            for member in tf:
                parts = _tar_parts(member.name)
                if member.isfile() and _is_image(parts) and ".." not in parts:
                    target = tmp.joinpath(*parts)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with tf.extractfile(member) as src, open(target, "wb") as dst:  # type: ignore[union-attr]
                        shutil.copyfileobj(src, dst)
        os.replace(tmp, dest)
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise DataError(f"{archive} is not a readable tar archive ({e}); re-create it") from e
    except OSError:
        if not dest.is_dir():  # another process finishing first is fine
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
