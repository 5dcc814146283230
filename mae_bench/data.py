"""Dataset registry: what each data set is, where its files are, and how to read them.

``load_dataset(name, split, data_dir)`` returns uint8 images [N, C, H, W] with int64 labels: an
``ArrayDataset`` held in memory (small sets; image folders are decoded once and cached as .npz), or
a ``StreamingDataset`` that decodes lazily in DataLoader workers (image folders too big for memory).
Nothing here touches the network: ``DatasetInfo.how_to_get`` tells the user where data comes from.
Every problem with the user's data is a one-line ``DataError`` naming the path and the fix.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mae_bench.errors import DataError

log = logging.getLogger("mae_bench.data")

CACHE_FORMAT = 1  # bump when the cached arrays change meaning; old cache files are then ignored
BAD_IMAGE_LIMIT = 0.01  # a split with more unreadable images than this fraction is an error
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR10_CLASSES = tuple("airplane automobile bird cat deer dog frog horse ship truck".split())
CIFAR100_CLASSES = tuple(
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus "
    "butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch "
    "crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo "
    "keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse "
    "mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy "
    "porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper "
    "snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television "
    "tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm".split()
)
STL10_CLASSES = tuple("airplane bird car cat deer dog horse monkey ship truck".split())
DIGIT_CLASSES = tuple(str(d) for d in range(10))
FASHION_CLASSES = tuple(
    "T-shirt/top|Trouser|Pullover|Dress|Coat|Sandal|Shirt|Sneaker|Bag|Ankle boot".split("|")
)


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
        transform: maps uint8 [C, H, W] to uint8 [C, h, w] of a fixed size.
    """

    def __init__(
        self,
        root: Path,
        members: list[str],
        labels: list[int],
        classes: list[str],
        info: DatasetInfo,
        offsets: np.ndarray | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
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

    def set_transform(self, transform: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        """Sets the uint8 CHW -> uint8 CHW transform applied to every image."""
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

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        worker = torch.utils.data.get_worker_info()
        slot = 0 if worker is None else 1 + worker.id % (_COUNT_SLOTS - 1)
        for step in range(len(self)):
            i = (index + step) % len(self)
            try:
                image = _open_rgb(self._read(i), self.where(i))
            except OSError as e:
                log.warning("skipping unreadable image %s (%s)", self.where(i), e)
                image = None
            self._counts[slot, 1] += 1
            if image is not None:
                chw = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # [3, H, W]
                return (chw if self.transform is None else self.transform(chw)), int(self.labels[i])
            self._counts[slot, 0] += 1
        raise DataError(f"no image in {self.root} could be read; check the warnings above")


# ---------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class _Options:
    cache_dir: Path
    max_in_memory_bytes: int


AnyDataset = ArrayDataset | StreamingDataset
# find(root) -> {split: where its files are}; cheap (names and sizes only), {} when nothing fits.
Finder = Callable[[Path], dict[str, Any]]
# load(info, split, found, options): found is what find returned (one split may need another).
Loader = Callable[[DatasetInfo, str, dict[str, Any], _Options], AnyDataset]


@dataclass(frozen=True)
class _Format:
    find: Finder
    load: Loader
    expected: str  # the layout ``find`` looks for, for error messages


DATASETS: dict[str, DatasetInfo] = {}
_FORMATS: dict[str, _Format] = {}
# Folders searched when neither --data-dir nor $MAE_BENCH_DATA/<name> (nor the cache) has data.
_SYSTEM_DIRS: dict[str, tuple[Path, ...]] = {
    "fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),),  # apt: dataset-fashion-mnist
}


def register_dataset(info: DatasetInfo, find: Finder, load: Loader, expected: str) -> DatasetInfo:
    """Adds a data set to the registry.

    Args:
        info: its description; ``info.name`` is the registry key.
        find: maps a data folder to ``{split: source}`` without decoding anything.
        load: ``(info, split, found, options) -> ArrayDataset | StreamingDataset``.
        expected: the files ``find`` looks for, quoted in error messages.
    """
    if info.name in DATASETS:
        raise ValueError(f"dataset {info.name!r} is registered twice")
    DATASETS[info.name] = info
    _FORMATS[info.name] = _Format(find, load, expected)
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
    """The data folder to read: it exists, is a folder and is not empty."""
    given = data_dir is not None
    root = Path(data_dir).expanduser() if given else default_data_dir(info.name)
    assert root is not None  # only embedded data sets have no folder
    origin = "data dir" if given else "default data dir (pass --data-dir or set MAE_BENCH_DATA)"
    if not root.exists():
        raise DataError(
            f"{origin} {root} for {info.name} does not exist; get it: {info.how_to_get}"
        )
    if not root.is_dir():
        raise DataError(f"{origin} {root} for {info.name} is a file; pass the folder that holds it")
    if next(root.iterdir(), None) is None:
        raise DataError(f"{origin} {root} for {info.name} is empty; get it: {info.how_to_get}")
    return root


def _find(info: DatasetInfo, root: Path) -> dict[str, Any]:
    found = _FORMATS[info.name].find(root)
    if not found:
        raise DataError(
            f"{root} does not hold {info.name}: expected {_FORMATS[info.name].expected}; "
            f"get it: {info.how_to_get}"
        )
    return found


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
) -> ArrayDataset | StreamingDataset:
    """Loads one split of a registered data set.

    Args:
        name: registry key (see ``DATASETS``).
        split: one of ``get_dataset_info(name).splits``.
        data_dir: the folder holding the files; None: ``default_data_dir(name)``.
        cache_dir: where decoded image folders (.npz) and extracted .tar.gz archives go;
            None: ``$MAE_BENCH_CACHE`` or ``~/.cache/mae-bench``. Sources are never written.
        max_in_memory_bytes: image folders whose decoded pixels exceed this are streamed.

    Returns:
        An ArrayDataset (uint8 [N, C, H, W] in memory) or, for large image folders, a
        StreamingDataset.
    """
    info = get_dataset_info(name)
    if split not in info.splits:
        raise DataError(
            f"unknown split {split!r} for {name}; valid splits: {', '.join(info.splits)}"
        )
    options = _Options(Path(cache_dir or _default_cache_dir()).expanduser(), max_in_memory_bytes)
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


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std in [0, 1] units of uint8 images [N, C, H, W]."""
    n, c = images.shape[:2]
    total, total_sq = np.zeros(c), np.zeros(c)
    step = max(1, 2**24 // max(1, int(np.prod(images.shape[1:]))))  # ~128 MB of float64 a chunk
    for start in range(0, n, step):
        chunk = images[start : start + step].astype(np.float64) / 255  # [n, C, H, W]
        total += chunk.sum(axis=(0, 2, 3))
        total_sq += np.square(chunk).sum(axis=(0, 2, 3))
    count = max(1, n * images.shape[2] * images.shape[3])
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _array_dataset(
    info: DatasetInfo, images: np.ndarray, labels: Any, classes: Any
) -> ArrayDataset:
    return ArrayDataset(
        torch.from_numpy(np.ascontiguousarray(images)),
        torch.as_tensor(np.asarray(labels, dtype=np.int64)),
        list(classes),
        info,
    )


# ---------------------------------------------------------------------------------- digits


def _load_digits(
    info: DatasetInfo, split: str, found: dict[str, Any], opts: _Options
) -> AnyDataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.images * 255 / 16).astype(np.uint8)[:, None]  # [1797, 1, 8, 8]
    train, test = train_test_split(
        np.arange(len(images)), test_size=0.2, stratify=digits.target, random_state=0
    )
    keep = train if split == "train" else test
    return _array_dataset(info, images[keep], digits.target[keep], DIGIT_CLASSES)


register_dataset(
    DatasetInfo(
        name="digits",
        description="scikit-learn's 1,797 handwritten digits, 8x8 grayscale: the embedded default",
        channels=1,
        img_size=8,  # native: patch-2 presets see 16 patches
        num_classes=10,
        mean=(0.3054,),  # train split, recomputed in tests/test_data.py
        std=(0.3760,),
        splits=("train", "test"),
        needs_data_dir=False,
        formats="embedded in scikit-learn (load_digits); stratified 80/20 split, random_state=0",
        how_to_get="nothing to get: it ships with scikit-learn",
    ),
    find=lambda root: {},
    load=_load_digits,
    expected="nothing (embedded)",
)


# ---------------------------------------------------------------------------------- cifar


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


def _tar_parts(name: str) -> list[str]:
    return [p for p in name.split("/") if p not in ("", ".")]


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
del _v, _cls, _mean, _std, _batch_files


# ---------------------------------------------------------------------------------- stl10

_STL10_FILES = {
    "train": ("train_X.bin", "train_y.bin"),
    "test": ("test_X.bin", "test_y.bin"),
    "unlabeled": ("unlabeled_X.bin", None),
}
_STL10_IMAGE_BYTES = 3 * 96 * 96


def _find_stl10(root: Path) -> dict[str, Any]:
    for folder in (root / "stl10_binary", root):
        found = {
            split: (folder / x, folder / y if y else None)
            for split, (x, y) in _STL10_FILES.items()
            if (folder / x).is_file() and (y is None or (folder / y).is_file())
        }
        if "train" in found and "unlabeled" in found:
            found["train+unlabeled"] = None
        if found:
            return found
    return {}


def _load_stl10(info: DatasetInfo, split: str, found: dict[str, Any], opts: _Options) -> AnyDataset:
    parts = [found[s] for s in split.split("+")]
    counts = []
    for x_path, _ in parts:
        size = x_path.stat().st_size
        if size == 0 or size % _STL10_IMAGE_BYTES:
            raise DataError(f"{x_path} has {size} bytes, not a multiple of 96*96*3: re-download it")
        counts.append(size // _STL10_IMAGE_BYTES)
    images = np.empty((sum(counts), 3, 96, 96), dtype=np.uint8)  # the one in-memory copy
    labels = np.full(sum(counts), -1, dtype=np.int64)
    start = 0
    for (x_path, y_path), n in zip(parts, counts, strict=True):
        stored = np.memmap(x_path, dtype=np.uint8, mode="r", shape=(n, 3, 96, 96))
        for i in range(0, n, 4096):  # chunks: the page cache, not our heap, holds the file
            chunk = stored[i : i + 4096]  # [n, 3, W, H]: each channel is stored column-major
            images[start + i : start + i + len(chunk)] = chunk.transpose(0, 1, 3, 2)
        del stored
        if y_path is not None:
            y = np.fromfile(y_path, dtype=np.uint8)
            if len(y) != n or y.min() < 1 or y.max() > 10:
                raise DataError(f"{y_path}: expected {n} labels in 1..10 for {x_path.name}")
            labels[start : start + n] = y.astype(np.int64) - 1
        start += n
    names_file = parts[0][0].parent / "class_names.txt"
    classes = names_file.read_text().split() if names_file.is_file() else STL10_CLASSES
    return _array_dataset(info, images, labels, classes)


register_dataset(
    DatasetInfo(
        name="stl10",
        description="STL-10: 96x96 colour, 5k labeled train, 8k test, 100k unlabeled, 10 classes",
        channels=3,
        img_size=96,
        num_classes=10,
        mean=(0.4467, 0.4398, 0.4066),
        std=(0.2603, 0.2566, 0.2713),
        splits=("train", "test", "unlabeled", "train+unlabeled"),
        needs_data_dir=True,
        formats="binary version: stl10_binary/ with train_X.bin, train_y.bin, test_X.bin, "
        "test_y.bin, unlabeled_X.bin",
        how_to_get="https://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz (extract it), or "
        "python -c 'import torchvision; torchvision.datasets.STL10(DIR, download=True)'",
    ),
    find=_find_stl10,
    load=_load_stl10,
    expected="stl10_binary/ with train_X.bin, train_y.bin, test_X.bin, test_y.bin "
    "(and unlabeled_X.bin)",
)


# ---------------------------------------------------------------------------------- mnist


def _find_idx(torchvision_folder: str, root: Path) -> dict[str, Any]:
    def locate(folder: Path, stem: str) -> Path | None:
        names = (stem, stem.replace("-idx", ".idx"))  # the second spelling is a common re-upload
        candidates = (folder / f"{n}{gz}" for n in names for gz in ("", ".gz"))
        return next((p for p in candidates if p.is_file()), None)

    for folder in (root, root / "raw", root / torchvision_folder / "raw"):
        found = {}
        for split, prefix in (("train", "train"), ("test", "t10k")):
            images = locate(folder, f"{prefix}-images-idx3-ubyte")
            labels = locate(folder, f"{prefix}-labels-idx1-ubyte")
            if images and labels:
                found[split] = (images, labels)
        if found:
            return found
    return {}


def _read_idx(path: Path) -> np.ndarray:
    """Parses an IDX file of uint8 (magic 0 0 8 ndim, big-endian uint32 dims, data)."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path} cannot be read ({e}); re-download it") from e
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise DataError(
            f"{path} is not an IDX file of uint8 (magic {raw[:4].hex()}); re-download it"
        )
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim]) if len(raw) >= 4 + 4 * ndim else ()
    data = np.frombuffer(raw, dtype=np.uint8, offset=min(len(raw), 4 + 4 * ndim))
    if len(dims) != ndim or data.size != int(np.prod(dims)):
        raise DataError(f"{path} holds {data.size} values, its header says {dims}: truncated?")
    return data.reshape(dims).copy()


def _load_idx(
    classes: tuple[str, ...], info: DatasetInfo, split: str, found: dict[str, Any], opts: _Options
) -> AnyDataset:
    images_path, labels_path = found[split]
    images, labels = _read_idx(images_path), _read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(
            f"{images_path} {images.shape} and {labels_path} {labels.shape} do not pair up as "
            "[N, H, W] images and [N] labels"
        )
    return _array_dataset(info, images[:, None], labels, classes)


for _name, _folder, _classes, _mean, _std, _desc, _get in (
    (
        "mnist",
        "MNIST",
        DIGIT_CLASSES,
        (0.1307,),
        (0.3081,),
        "MNIST: 70,000 handwritten digits",
        "python -c 'import torchvision; torchvision.datasets.MNIST(DIR, download=True)'",
    ),
    (
        "fashion-mnist",
        "FashionMNIST",
        FASHION_CLASSES,
        (0.2860,),
        (0.3530,),
        "Fashion-MNIST: 70,000 Zalando product images",
        "apt-get install dataset-fashion-mnist (lands in /usr/share/datasets/fashion-mnist), or "
        "python -c 'import torchvision; torchvision.datasets.FashionMNIST(DIR, download=True)'",
    ),
):
    register_dataset(
        DatasetInfo(
            name=_name,
            description=f"{_desc}, 28x28 grayscale, 10 classes",
            channels=1,
            img_size=28,
            num_classes=10,
            mean=_mean,
            std=_std,
            splits=("train", "test"),
            needs_data_dir=True,
            formats=f"IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-...; "
            f"optionally .gz) in DIR, DIR/raw or DIR/{_folder}/raw",
            how_to_get=_get,
        ),
        find=lambda root, folder=_folder: _find_idx(folder, root),
        load=lambda info, split, found, opts, c=_classes: _load_idx(c, info, split, found, opts),
        expected=f"train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
        f"t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz] in it, raw/ or {_folder}/raw/",
    )
del _name, _folder, _classes, _mean, _std, _desc, _get


# ---------------------------------------------------------------------------------- svhn

_SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat", "extra": "extra_32x32.mat"}


def _find_svhn(root: Path) -> dict[str, Any]:
    return {s: root / f for s, f in _SVHN_FILES.items() if (root / f).is_file()}


def _load_svhn(info: DatasetInfo, split: str, found: dict[str, Any], opts: _Options) -> AnyDataset:
    from scipy.io import loadmat

    path = found[split]
    try:
        mat = loadmat(path)
        x, y = mat["X"], mat["y"].ravel().astype(np.int64)  # X: [32, 32, 3, N]
    except Exception as e:  # scipy raises many types for a bad file
        raise DataError(
            f"{path} is not an SVHN .mat file with X and y ({e}); re-download it"
        ) from e
    if x.dtype != np.uint8 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
        raise DataError(f"{path}: X is {x.dtype} {x.shape}, expected uint8 [32, 32, 3, {len(y)}]")
    y[y == 10] = 0  # SVHN stores the digit 0 as label 10
    return _array_dataset(info, x.transpose(3, 2, 0, 1), y, DIGIT_CLASSES)


register_dataset(
    DatasetInfo(
        name="svhn",
        description="SVHN: street-view house-number digits, 32x32 colour, 10 classes",
        channels=3,
        img_size=32,
        num_classes=10,
        mean=(0.4377, 0.4438, 0.4728),
        std=(0.1980, 0.2010, 0.1970),
        splits=("train", "test", "extra"),
        needs_data_dir=True,
        formats="cropped-digit .mat files: train_32x32.mat, test_32x32.mat (extra_32x32.mat)",
        how_to_get="http://ufldl.stanford.edu/housenumbers/ (the 32x32 .mat files), or python -c "
        "'import torchvision; torchvision.datasets.SVHN(DIR, split=\"train\", download=True)'",
    ),
    find=_find_svhn,
    load=_load_svhn,
    expected="train_32x32.mat and test_32x32.mat",
)


# ---------------------------------------------------------------------------------- image folders

_SPLIT_NAMES = {"train": ("train",), "test": ("test", "val")}


def _find_image_splits(root: Path) -> dict[str, Path]:
    """{split: folder or archive} for ``train`` and ``test`` (or ``val``) entries in ``root``."""
    found = {}
    for split, names in _SPLIT_NAMES.items():
        for name in names:
            hits = [root / name] if (root / name).is_dir() else []
            hits += [
                root / f"{name}{s}" for s in ARCHIVE_SUFFIXES if (root / f"{name}{s}").is_file()
            ]
            if hits:
                found[split] = hits[0]
                break
    return found


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


def _header_size(data: bytes) -> tuple[int, int] | None:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception:  # not an image: the decode pass logs and counts it
        return None


def _open_rgb(data: bytes, where: str) -> Image.Image | None:
    """Decodes any PIL-readable image to RGB; None (logged) when it cannot be read."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")  # PIL warns when palette transparency meets RGB directly
            return im.convert("RGB")
    except Exception as e:  # PIL raises many types for broken files
        log.warning("skipping unreadable image %s (%s: %s)", where, type(e).__name__, e)
        return None


def _resize_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resizes so that ``size`` (w, h) is covered (the shorter side for a square), then crops the
    center."""
    if image.size == size:
        return image
    scale = max(size[0] / image.width, size[1] / image.height)
    w, h = max(size[0], round(image.width * scale)), max(size[1], round(image.height * scale))
    image = image.resize((w, h), Image.BILINEAR)  # PIL filters (antialiases) when shrinking
    left, top = (w - size[0]) // 2, (h - size[1]) // 2
    return image.crop((left, top, left + size[0], top + size[1]))


@dataclass
class _Decoded:
    images: torch.Tensor  # uint8 [N, 3, H, W]
    labels: torch.Tensor  # int64 [N]
    classes: list[str]
    bad_images: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _labels(
    index: _Index, class_order: tuple[str, ...] | None, info: DatasetInfo
) -> tuple[list[str], list[int]]:
    """Class names and per-image label ids; DataError when there are no images or (for CIFAR
    stored as image folders) the class folders are not the data set's classes."""
    if not index.members:
        raise DataError(
            f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in class folders under "
            f"{index.root}; expected {index.root}/<class>/<image>"
        )
    found = sorted(set(index.class_names))
    if class_order is not None and set(found) != set(class_order):
        raise DataError(
            f"class folders in {index.root} ({', '.join(found[:12])}{', ...' * (len(found) > 12)}) "
            f"are not the {len(class_order)} {info.name} classes ({', '.join(class_order[:10])}...)"
        )
    classes = list(class_order or found)
    ids = {c: i for i, c in enumerate(classes)}
    return classes, [ids[c] for c in index.class_names]


def _common_size(blobs: list[bytes], picks: list[int] | None = None) -> tuple[int, int]:
    """The most frequent (w, h) among the image headers (of ``picks`` only, if given)."""
    sizes = Counter(_header_size(blobs[i]) for i in (range(len(blobs)) if picks is None else picks))
    sizes.pop(None, None)
    return sizes.most_common(1)[0][0] if sizes else (1, 1)


def _sample(n: int) -> list[int]:
    return sorted({round(x) for x in np.linspace(0, n - 1, min(n, 32))})


def _decode(
    index: _Index, blobs: list[bytes], labels: list[int], size: tuple[int, int], budget: int
) -> tuple[np.ndarray, np.ndarray, int] | None:
    """Decodes every image to uint8 [N, 3, h, w] at the most frequent size (``size`` is a guess
    from a sample; a wrong guess costs one more pass). None if that size exceeds ``budget``."""
    while len(blobs) * 3 * size[0] * size[1] <= budget:
        images = np.empty((len(blobs), 3, size[1], size[0]), dtype=np.uint8)
        kept: list[int] = []
        native: Counter[tuple[int, int]] = Counter()
        for i, blob in enumerate(blobs):
            image = _open_rgb(blob, index.where(i))
            if image is not None:
                native[image.size] += 1
                images[len(kept)] = np.asarray(_resize_crop(image, size)).transpose(2, 0, 1)
                kept.append(i)
        bad = len(blobs) - len(kept)
        if bad > BAD_IMAGE_LIMIT * len(blobs):
            raise DataError(
                f"{bad} of {len(blobs)} images in {index.root} could not be read (over 1 %); "
                "fix or remove the files named in the warnings above"
            )
        if native.most_common(1)[0][0] == size:
            return images[: len(kept)], np.asarray(labels, dtype=np.int64)[kept], bad
        size = native.most_common(1)[0][0]
    return None


def _cache_path(info: DatasetInfo, source: Path, stamp: str, opts: _Options) -> Path:
    key = json.dumps([CACHE_FORMAT, info.name, str(source.resolve()), stamp])
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return opts.cache_dir / "arrays" / f"{info.name}-{source.name}-{digest}.npz"


def _read_cache(path: Path, budget: int) -> _Decoded | None:
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
            )
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        log.warning("ignoring unreadable cache file %s (%s)", path, e)
        return None


def _write_cache(path: Path, decoded: _Decoded) -> None:
    """Writes atomically (temp file + rename); a read-only cache only costs a warning."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
            np.savez(
                f,
                images=decoded.images.numpy(),
                labels=decoded.labels.numpy(),
                shape=np.array(decoded.images.shape),
                classes=np.array(decoded.classes),
                bad_images=decoded.bad_images,
                mean=decoded.mean,
                std=decoded.std,
            )
        os.replace(f.name, path)
    except OSError as e:
        log.warning("could not write cache file %s (%s); decoding again next time", path, e)


def _load_image_split(
    info: DatasetInfo, source: Path, class_order: tuple[str, ...] | None, opts: _Options
) -> _Decoded | StreamingDataset:
    """Decodes one split (a folder or an archive of class folders) into memory, through the
    cache, or returns a StreamingDataset when its pixels exceed ``opts.max_in_memory_bytes``."""
    budget = opts.max_in_memory_bytes
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
        index = index or _index_tar(source)
        classes, labels = _labels(index, class_order, info)
        picks = _sample(len(index.members))
        sample = _Index(index.root, [index.members[i] for i in picks], [], _rows(index, picks))
        size = _common_size(sample.read_all())
        fits = len(labels) * 3 * size[0] * size[1] <= budget
        decoded = _decode(index, index.read_all(), labels, size, budget) if fits else None
    else:  # a compressed tar: one pass reads it all, unless it is obviously too big
        index, blobs = _read_compressed_tar(source, budget)
        classes, labels = _labels(index, class_order, info)
        size = _common_size(blobs, _sample(len(blobs))) if blobs else (1, 1)
        decoded = None if blobs is None else _decode(index, blobs, labels, size, budget)
        if decoded is None:  # stream from an extracted copy, made once in the cache
            extracted = _extract(source, opts.cache_dir / "extracted" / cache.stem)
            index = _classify(extracted, _walk(extracted)[0], strip_prefix=True)
            classes, labels = _labels(index, class_order, info)
    if decoded is None:
        log.info("%s: %d images exceed %d bytes in memory; streaming", source, len(labels), budget)
        info = replace(info, num_classes=len(classes))
        return StreamingDataset(index.root, index.members, labels, classes, info, index.offsets)
    images, kept_labels, bad = decoded
    mean, std = _channel_stats(images)
    result = _Decoded(
        torch.from_numpy(images), torch.from_numpy(kept_labels), classes, bad, mean, std
    )
    _write_cache(cache, result)
    return result


def _rows(index: _Index, picks: list[int]) -> np.ndarray | None:
    return None if index.offsets is None else index.offsets[picks]


def _imagefolder_split(info: DatasetInfo, source: Path, opts: _Options) -> AnyDataset:
    result = _load_image_split(info, source, None, opts)
    if isinstance(result, StreamingDataset):
        return result
    h, w = result.images.shape[2:]
    info = replace(
        info, num_classes=len(result.classes), img_size=min(h, w), mean=result.mean, std=result.std
    )
    return ArrayDataset(result.images, result.labels, result.classes, info, result.bad_images)


def _load_imagefolder(
    info: DatasetInfo, split: str, found: dict[str, Any], opts: _Options
) -> AnyDataset:
    if "train" not in found:
        raise DataError(
            f"{found[split].parent} has {found[split].name} but no train/ (or train.tar[.gz]): "
            "imagefolder takes its class names and normalisation stats from the train split"
        )
    train = _imagefolder_split(info, found["train"], opts)
    if split == "train":
        return train
    test = _imagefolder_split(info, found[split], opts)
    if test.classes != train.classes:
        extra, missing = (
            set(test.classes) - set(train.classes),
            set(train.classes) - set(test.classes),
        )
        raise DataError(
            f"class folders of {found[split]} differ from {found['train']}: extra "
            f"{sorted(extra) or 'none'}, missing {sorted(missing) or 'none'}; use the same classes"
        )
    test.info = train.info  # the test split is normalised like the data the model trained on
    return test


register_dataset(
    DatasetInfo(
        name="imagefolder",
        description="your own images, one folder per class (ImageNet-style)",
        channels=3,
        img_size=224,
        num_classes=None,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        splits=("train", "test"),
        needs_data_dir=True,
        formats="train/ and test/ (or val/): class folders of jpg/png/bmp/webp/gif/tif images, "
        "or .tar/.tar.gz/.tgz archives of them",
        how_to_get="your own images: DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg "
        "(or DIR/train.tar, DIR/test.tar)",
    ),
    find=_find_image_splits,
    load=_load_imagefolder,
    expected="train/ and test/ (or val/) class folders, or train.tar[.gz] and test.tar[.gz]",
)
