"""Writing WebDataset-style tar shards from an image folder (``mae-bench shard``).

Each sample becomes ``KEY.EXT`` (the original file's bytes, never re-encoded; its extension in
lower case) plus ``KEY.cls`` (its label in ASCII), and ``classes.txt`` beside the shards lists
the class names in label order: the layout ``mae_bench/data/shards.py`` reads. KEY is the
sample's position in the split's seeded order, zero-padded, so keys are unique, sort like the
file order and contain no dot (WebDataset splits a name at its first dot).
"""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from mae_bench.data.index import _classify, _Index, _index_tar, _is_plain_tar, _walk
from mae_bench.data.shards import LABEL_EXT
from mae_bench.errors import DataError, MaeBenchError
from mae_bench.files import atomic_file, current_umask

DEFAULT_SAMPLES_PER_SHARD = 5000
# A few hundred MB a shard reads at disk speed and still gives a large set many shards to permute
DEFAULT_MAX_BYTES = 256 * 2**20
_MEMBER_OVERHEAD = 2 * 1024  # the two tar headers and the padding of one sample, at most


def class_folders(source: Path) -> _Index:
    """The images of one split stored as class folders: a folder or an uncompressed .tar.

    Raises:
        DataError: a compressed archive, or no image inside a class folder.
    """
    if source.is_dir():
        index = _classify(source, _walk(source)[0], strip_prefix=False)
    elif source.is_file() and _is_plain_tar(source):
        index = _index_tar(source)
    else:
        raise DataError(f"{source} is not a folder or an uncompressed .tar of class folders; "
                        "extract it first")
    if not index.members:
        raise DataError(f"no images in class folders under {source}; expected "
                        f"{source}/<class>/<image>")
    return index


def shard_paths(out_dir: Path, prefix: str) -> list[Path]:
    """The shards ``PREFIX-*.tar`` already in ``out_dir``, in name order."""
    return sorted(p for p in Path(out_dir).glob(f"{prefix}-*.tar") if p.is_file())


def _plan(sizes: Sequence[int], max_samples: int, max_bytes: int) -> list[range]:
    """Consecutive runs of samples, each within both limits (a sample larger than
    ``max_bytes`` gets a shard of its own)."""
    runs, start, used = [], 0, 0
    for i, size in enumerate(sizes):
        cost = size + _MEMBER_OVERHEAD
        if i > start and (i - start == max_samples or used + cost > max_bytes):
            runs.append(range(start, i))
            start, used = i, 0
        used += cost
    if start < len(sizes):
        runs.append(range(start, len(sizes)))
    return runs


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed: the same input, the same bytes
    tf.addfile(info, io.BytesIO(data))


def write_shards(source: Path | _Index, out_dir: Path, prefix: str, *,
                 classes: Sequence[str] | None = None,
                 max_samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
                 max_bytes: int = DEFAULT_MAX_BYTES, seed: int = 0, overwrite: bool = False,
                 report: Callable[[str, int, int], None] | None = None) -> list[Path]:
    """Writes one split of class folders as ``PREFIX-000000.tar``, ``PREFIX-000001.tar``, ...

    The samples are shuffled (seeded) before they are cut into shards: a reader streams each
    shard sequentially and mixes only within a small shuffle buffer, so shards written class by
    class would feed it one class at a time. Every shard is written to a hidden temporary file
    and renamed into place once all are complete, so an interrupted write leaves no shard; with
    ``overwrite`` the older ``PREFIX-*.tar`` the new set does not replace are removed.

    Args:
        source: a folder (or uncompressed .tar) of class folders, e.g. ``DIR/train``, or what
            ``class_folders`` returned for one (a caller that checked it first).
        out_dir: where the shards and ``classes.txt`` go (created).
        prefix: the shard names' prefix: ``train`` or ``test``.
        classes: class names in label order (the train split's, when writing the test split);
            None: the source's class folders, sorted.
        max_samples_per_shard: samples per shard, at most.
        max_bytes: bytes per shard, about (a larger image gets a shard of its own).
        seed: seeds the shuffle; the same seed and source give byte-identical shards.
        overwrite: replace existing ``PREFIX-*.tar`` shards (and a different classes.txt).
        report: ``(what, done, total)`` progress callback.

    Returns:
        The shards written, in order.

    Raises:
        MaeBenchError: a limit below 1; shards or another classes.txt in ``out_dir`` without
            ``overwrite``; class folders that are not among ``classes``.
    """
    if max_samples_per_shard < 1 or max_bytes < 1:
        raise MaeBenchError(f"samples per shard and bytes per shard must be at least 1, got "
                            f"{max_samples_per_shard} and {max_bytes}")
    out_dir = Path(out_dir)
    index = source if isinstance(source, _Index) else class_folders(Path(source))
    classes = list(classes) if classes is not None else sorted(set(index.class_names))
    check_destination(index, out_dir, prefix, classes, overwrite)
    ids = {c: i for i, c in enumerate(classes)}
    order = np.random.default_rng(seed).permutation(len(index.members)).tolist()
    sizes = (index.offsets[:, 1].tolist() if index.offsets is not None else
             [os.stat(index.root / m).st_size for m in index.members])
    runs = _plan([sizes[i] for i in order], max_samples_per_shard, max_bytes)
    width = max(8, len(str(len(order) - 1)))
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[tuple[str, Path]] = []  # (temporary file, final path)
    try:
        # a folder's images are files of their own; an archive's are read by offset
        with open(index.root, "rb") if index.offsets is not None else nullcontext() as archive:
            for n, run in enumerate(runs):
                final = out_dir / f"{prefix}-{n:06d}.tar"
                fd, tmp = tempfile.mkstemp(prefix=f".{final.name}-", suffix=".tmp", dir=out_dir)
                written.append((tmp, final))
                os.fchmod(fd, 0o666 & ~current_umask())  # as a plain open() would (mkstemp: 0600)
                with os.fdopen(fd, "wb") as fh, tarfile.open(fileobj=fh, mode="w",
                                                             format=tarfile.USTAR_FORMAT) as tf:
                    for position in run:
                        i = order[position]
                        key = f"{position:0{width}d}"
                        ext = Path(index.members[i]).suffix.lower()
                        _add(tf, f"{key}{ext}", _read(index, i, archive))
                        _add(tf, f"{key}.{LABEL_EXT}", str(ids[index.class_names[i]]).encode())
                        done = position + 1
                        if report is not None and (done % 256 == 0 or done == len(order)):
                            report(f"{prefix}: writing {len(runs)} shard(s)", done, len(order))
        for tmp, final in written:
            os.replace(tmp, final)
    except BaseException:
        for tmp, _ in written:
            Path(tmp).unlink(missing_ok=True)
        raise
    kept = {final for _, final in written}
    for stale in shard_paths(out_dir, prefix):  # an older, longer set (only with overwrite)
        if stale not in kept:
            stale.unlink()
    with atomic_file(out_dir / "classes.txt") as fh:
        fh.write("".join(f"{c}\n" for c in classes))
    return [final for _, final in written]


def check_destination(index: _Index, out_dir: Path, prefix: str, classes: Sequence[str],
                      overwrite: bool) -> None:
    """What ``write_shards`` checks before it writes anything: the source's class folders are
    among ``classes``; without ``overwrite``, ``out_dir`` holds no ``PREFIX-*.tar`` and no other
    classes.txt.

    Raises:
        DataError: a class folder not in ``classes``.
        MaeBenchError: shards or another class list in the way.
    """
    extra = sorted(set(index.class_names) - set(classes))
    if extra:
        raise DataError(f"class folders of {index.root} are not among the {len(classes)} "
                        f"classes of the train split: {', '.join(extra[:5])}"
                        f"{', ...' * (len(extra) > 5)}; use the same classes")
    if overwrite:
        return
    existing = shard_paths(out_dir, prefix)
    if existing:
        raise MaeBenchError(f"{out_dir} already holds {len(existing)} {prefix}-*.tar shard(s); "
                            "pass --overwrite to replace them, or choose another --out")
    listed = out_dir / "classes.txt"
    if listed.is_file() and listed.read_text(encoding="utf-8").splitlines() != list(classes):
        raise MaeBenchError(f"{listed} lists other classes than {prefix}'s source; pass "
                            "--overwrite to replace it, or choose another --out")


def _read(index: _Index, i: int, archive: io.BufferedReader | None) -> bytes:
    if archive is None:
        return (index.root / index.members[i]).read_bytes()
    offset, size = index.offsets[i]  # type: ignore[index]
    archive.seek(int(offset))
    return archive.read(int(size))
