"""Tests for mae_bench/data/: every format written in its real on-disk layout, tiny and fast."""

from __future__ import annotations

import gzip
import logging
import os
import pickle
import struct
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mae_bench import data
from mae_bench.data import (
    DATASETS,
    ArrayDataset,
    StreamingDataset,
    dataset_status,
    default_data_dir,
    get_dataset_info,
    load_dataset,
)
from mae_bench.errors import DataError, MaeBenchError

RNG = np.random.default_rng(0)


# ------------------------------------------------------------------------------- fixture writers


def write_cifar10(root: Path, per_batch: int = 4) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """cifar-10-batches-py/ exactly like the original: protocol-2 pickled dicts, uint8 [N, 3072]."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, files in (
        ("train", [f"data_batch_{i}" for i in range(1, 6)]),
        ("test", ["test_batch"]),
    ):
        datas, labels = [], []
        for name in files:
            batch_data = RNG.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
            batch_labels = [int(x) for x in RNG.integers(0, 10, per_batch)]
            batch = {
                "batch_label": f"{name} of 5",
                "labels": batch_labels,
                "data": batch_data,
                "filenames": [f"img_{i}.png" for i in range(per_batch)],
            }
            (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
            datas.append(batch_data)
            labels += batch_labels
        out[split] = (np.concatenate(datas).reshape(-1, 3, 32, 32), np.array(labels))
    meta = {"num_cases_per_batch": per_batch, "label_names": list(data.CIFAR10_CLASSES)}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return out


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> None:
    """An IDX file byte by byte: magic 0 0 8 ndim, big-endian uint32 dims, uint8 data."""
    raw = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)


def write_mnist(folder: Path, gz: bool = False, n: tuple[int, int] = (5, 3)) -> dict:
    out = {}
    for split, prefix, count in (("train", "train", n[0]), ("test", "t10k", n[1])):
        images = RNG.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = RNG.integers(0, 10, count).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, gz)
        out[split] = (images, labels)
    return out


def write_stl10(folder: Path, counts=(3, 2, 2), names: bool = True) -> dict:
    """stl10_binary files: each image stored channel by channel, column-major (as the original)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, count in zip(("train", "test", "unlabeled"), counts, strict=True):
        if count == 0:
            continue
        images = RNG.integers(0, 256, (count, 3, 96, 96), dtype=np.uint8)
        (folder / f"{split}_X.bin").write_bytes(images.transpose(0, 1, 3, 2).tobytes())
        labels = RNG.integers(1, 11, count).astype(np.uint8)
        if split != "unlabeled":
            (folder / f"{split}_y.bin").write_bytes(labels.tobytes())
        out[split] = (images, labels.astype(np.int64) - 1 if split != "unlabeled" else None)
    if names:
        (folder / "class_names.txt").write_text("\n".join(data.STL10_CLASSES) + "\n")
    return out


def save_png(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


def write_image_split(split_dir: Path, classes: list[str], per_class: int, size: int = 8) -> None:
    for name in classes:
        for i in range(per_class):
            save_png(
                split_dir / name / f"{i:03d}.png", RNG.integers(0, 256, (size, size, 3), np.uint8)
            )


def tar_folder(folder: Path, archive: Path, prefix: str | None) -> None:
    """Adds files in sorted walk order so that the archive order equals the folder's."""
    mode = "w:gz" if archive.name.endswith(("gz", "tgz")) else "w"
    with tarfile.open(archive, mode) as tf:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = path.relative_to(folder).as_posix()
            tf.add(path, arcname=f"{prefix}/{rel}" if prefix else rel)


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(autouse=True)
def _no_user_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keeps every test away from the real ~/.cache and $MAE_BENCH_* folders."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MAE_BENCH_DATA", raising=False)
    monkeypatch.setenv("MAE_BENCH_CACHE", str(tmp_path / "cache"))


# ------------------------------------------------------------------------------- registry


EXPECTED = {  # name: (channels, img_size, mean, std)
    "digits": (1, 8, (0.3054,), (0.3760,)),
    "cifar10": (3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": (3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": (3, 96, (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "mnist": (1, 28, (0.1307,), (0.3081,)),
    "fashion-mnist": (1, 28, (0.2860,), (0.3530,)),
    "svhn": (3, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "imagefolder": (3, 224, data.IMAGENET_MEAN, data.IMAGENET_STD),
    "imagenet": (3, 224, data.IMAGENET_MEAN, data.IMAGENET_STD),
    "imagenet100": (3, 224, data.IMAGENET_MEAN, data.IMAGENET_STD),
    "imagenette": (3, 224, data.IMAGENET_MEAN, data.IMAGENET_STD),
    "shards": (3, 224, data.IMAGENET_MEAN, data.IMAGENET_STD),
    "hf-disk": (3, 224, data.IMAGENET_MEAN, data.IMAGENET_STD),
}


def test_registry_holds_every_dataset_with_consistent_fields() -> None:
    assert set(DATASETS) == set(EXPECTED)
    for name, info in DATASETS.items():
        channels, img_size, mean, std = EXPECTED[name]
        assert (info.name, info.channels, info.img_size, info.mean, info.std) == (
            name,
            channels,
            img_size,
            mean,
            std,
        )
        assert len(info.mean) == len(info.std) == info.channels
        assert {"train", "test"} <= set(info.splits)
        assert info.needs_data_dir == (name != "digits")
        for text in (info.description, info.formats, info.how_to_get):
            assert text and "\n" not in text
    assert DATASETS["stl10"].splits == ("train", "test", "unlabeled", "train+unlabeled")
    assert DATASETS["imagefolder"].num_classes is None
    assert DATASETS["cifar100"].num_classes == 100


def test_class_name_tables() -> None:
    assert len(data.CIFAR100_CLASSES) == 100 == len(set(data.CIFAR100_CLASSES))
    assert list(data.CIFAR100_CLASSES) == sorted(data.CIFAR100_CLASSES)  # the official order
    assert data.CIFAR10_CLASSES[0] == "airplane" and data.CIFAR10_CLASSES[9] == "truck"
    assert len(data.FASHION_CLASSES) == 10 and data.FASHION_CLASSES[9] == "Ankle boot"


def test_registering_a_name_twice_fails() -> None:
    with pytest.raises(ValueError, match="'digits' is registered twice"):
        data.register_dataset(DATASETS["digits"], lambda root: {}, data._load_digits, "x")


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(
        DataError, match=r"unknown dataset 'imagenet21k'; valid names: digits, cifar10"
    ):
        get_dataset_info("imagenet21k")
    with pytest.raises(MaeBenchError):  # the CLI catches this base class
        load_dataset("imagenet21k", "train")


def test_unknown_split_lists_valid_splits(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=r"unknown split 'val' for stl10; valid splits: train, test, unlabeled, "
    ):
        load_dataset("stl10", "val", tmp_path / "not-needed")


# ------------------------------------------------------------------------------- digits


def test_digits_split_is_stratified_and_pixels_scale_to_uint8() -> None:
    from sklearn.datasets import load_digits

    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert isinstance(train, ArrayDataset)
    assert train.images.shape == (1437, 1, 8, 8) and test.images.shape == (360, 1, 8, 8)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert train.images.is_contiguous() and int(train.images.max()) == 255
    per_class = train.labels.bincount() + test.labels.bincount()
    assert (test.labels.bincount() - 0.2 * per_class).abs().max() <= 1  # stratified 80/20
    ref = load_digits()
    ref_images = np.rint(ref.images * 255 / 16).astype(np.uint8)
    # every sample appears exactly once across the two splits, with its label
    key = {(img.tobytes(), int(y)) for img, y in zip(ref_images, ref.target, strict=True)}
    got = [
        (img[0].numpy().tobytes(), int(y))
        for ds in (train, test)
        for img, y in zip(ds.images, ds.labels, strict=True)
    ]
    assert set(got) <= key and len(got) == 1797
    assert torch.equal(load_dataset("digits", "train").images, train.images)  # deterministic
    assert train.classes == [str(d) for d in range(10)]


def test_digits_stats_are_the_train_split_stats() -> None:
    train = load_dataset("digits", "train")
    pixels = train.images.double() / 255
    assert abs(pixels.mean().item() - train.info.mean[0]) < 5e-5
    assert abs(pixels.std(unbiased=False).item() - train.info.std[0]) < 5e-5


def test_digits_needs_no_data_dir() -> None:
    assert default_data_dir("digits") is None
    assert dataset_status("digits", None)[0] is True


# ------------------------------------------------------------------------------- default dirs


def test_default_data_dir_env_home_and_system_copy(tmp_path: Path, monkeypatch) -> None:
    assert default_data_dir("cifar10") == tmp_path / "home/.cache/mae-bench/data/cifar10"
    monkeypatch.setenv("MAE_BENCH_DATA", str(tmp_path / "data"))
    assert default_data_dir("cifar10") == tmp_path / "data/cifar10"
    system = tmp_path / "usr-share-fashion"
    monkeypatch.setitem(data._SYSTEM_DIRS, "fashion-mnist", (system,))
    assert default_data_dir("fashion-mnist") == tmp_path / "data/fashion-mnist"  # none there yet
    write_mnist(system)
    assert default_data_dir("fashion-mnist") == system
    assert len(load_dataset("fashion-mnist", "train")) == 5  # found without --data-dir
    write_mnist(tmp_path / "data/fashion-mnist", n=(7, 2))
    assert default_data_dir("fashion-mnist") == tmp_path / "data/fashion-mnist"  # user's first
    assert len(load_dataset("fashion-mnist", "train")) == 7


def test_real_system_fashion_mnist_path_is_the_debian_one() -> None:
    assert data._SYSTEM_DIRS["fashion-mnist"] == (Path("/usr/share/datasets/fashion-mnist"),)


# ------------------------------------------------------------------------------- cifar


@pytest.mark.parametrize("layout", ["parent", "folder", "archive"])
def test_cifar10_batches_round_trip(tmp_path: Path, layout: str) -> None:
    src = tmp_path / "src"
    expected = write_cifar10(src)
    root = {"parent": src, "folder": src / "cifar-10-batches-py", "archive": tmp_path / "arch"}[
        layout
    ]
    if layout == "archive":
        root.mkdir()
        tar_folder(src, root / "cifar-10-python.tar.gz", prefix=None)
    for split, n in (("train", 20), ("test", 4)):
        ds = load_dataset("cifar10", split, root)
        assert isinstance(ds, ArrayDataset) and len(ds) == n
        assert ds.images.shape == (n, 3, 32, 32) and ds.images.dtype == torch.uint8
        assert np.array_equal(ds.images.numpy(), expected[split][0])
        assert np.array_equal(ds.labels.numpy(), expected[split][1])
        assert ds.classes == list(data.CIFAR10_CLASSES) and ds.info is DATASETS["cifar10"]
        assert ds.bad_images == 0


def test_cifar_md5_mismatch_warns_but_loads(tmp_path: Path, caplog) -> None:
    write_cifar10(tmp_path)
    with caplog.at_level(logging.WARNING, logger="mae_bench.data"):
        ds = load_dataset("cifar10", "test", tmp_path)
    assert len(ds) == 4
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("test_batch" in m and "40351d587109b95175f43aff81a1287e" in m for m in warned)
    assert any("batches.meta" in m for m in warned) and len(warned) == 2


def test_cifar_batch_with_bytes_keys_loads(tmp_path: Path) -> None:
    """Batches re-pickled with bytes keys (what encoding='bytes' readers see) load as well."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    pixels = RNG.integers(0, 256, (2, 3072), dtype=np.uint8)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": pixels, b"labels": [3, 7]}, 2))
    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps({b"data": pixels, b"labels": [1, 2]}))
    ds = load_dataset("cifar10", "test", tmp_path)
    assert ds.labels.tolist() == [3, 7] and np.array_equal(ds.images.numpy().reshape(2, -1), pixels)
    assert load_dataset("cifar10", "train", tmp_path).labels.tolist() == [1, 2] * 5  # protocol 5


def test_cifar100_uses_fine_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    expected = {}
    for split, n in (("train", 6), ("test", 3)):
        pixels = RNG.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine, coarse = (
            [int(x) for x in RNG.integers(20, 100, n)],
            [int(x) for x in RNG.integers(0, 20, n)],
        )
        batch = {
            "filenames": ["a.png"] * n,
            "batch_label": split,
            "fine_labels": fine,
            "coarse_labels": coarse,
            "data": pixels,
        }
        (folder / split).write_bytes(pickle.dumps(batch, protocol=2))
        expected[split] = (pixels.reshape(n, 3, 32, 32), fine)
    meta = {"fine_label_names": list(data.CIFAR100_CLASSES), "coarse_label_names": ["x"] * 20}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    for split in ("train", "test"):
        ds = load_dataset("cifar100", split, tmp_path)
        assert np.array_equal(ds.images.numpy(), expected[split][0])
        assert ds.labels.tolist() == expected[split][1]
        assert len(ds.classes) == 100 and ds.info.num_classes == 100


class _Evil:
    def __init__(self, victim: Path) -> None:
        self.victim = victim

    def __reduce__(self):
        return (os.remove, (str(self.victim),))


def test_cifar_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("still here")
    (tmp_path / "cifar-10-batches-py/test_batch").write_bytes(pickle.dumps(_Evil(victim)))
    with pytest.raises(DataError, match=r"test_batch is not a CIFAR python batch \(refusing"):
        load_dataset("cifar10", "test", tmp_path)
    assert victim.exists()


def test_cifar_malformed_batch_is_an_error(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    bad = {"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}
    (tmp_path / "cifar-10-batches-py/test_batch").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(DataError, match=r"test_batch lacks uint8 'data' \[N, 3072\]"):
        load_dataset("cifar10", "test", tmp_path)


def test_cifar_missing_train_batches_names_the_split(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py/data_batch_3").unlink()
    with pytest.raises(DataError, match=r"has no train split of cifar10 \(found: test\); expected"):
        load_dataset("cifar10", "train", tmp_path)


def test_cifar10_as_image_folders(tmp_path: Path, caplog) -> None:
    """The layout of the real copy on this machine: train/test class folders, tar.gz or not."""
    folders = tmp_path / "folders"
    write_image_split(folders / "train", list(data.CIFAR10_CLASSES), 2, size=32)
    write_image_split(folders / "test", list(data.CIFAR10_CLASSES), 1, size=32)
    archives = tmp_path / "archives"
    archives.mkdir()
    for split in ("train", "test"):
        tar_folder(folders / split, archives / f"{split}.tar.gz", prefix=split)
    before = files_under(archives)
    with caplog.at_level(logging.INFO, logger="mae_bench.data"):
        from_folders = load_dataset("cifar10", "train", folders, cache_dir=tmp_path / "c1")
    assert any("not the original python batches" in r.getMessage() for r in caplog.records)
    from_archive = load_dataset("cifar10", "train", archives, cache_dir=tmp_path / "c2")
    assert files_under(archives) == before  # nothing written next to the source
    for ds in (from_folders, from_archive):
        assert isinstance(ds, ArrayDataset) and ds.images.shape == (20, 3, 32, 32)
        assert ds.labels.tolist() == [i // 2 for i in range(20)]  # canonical ids: airplane=0
        assert ds.info is DATASETS["cifar10"] and ds.classes == list(data.CIFAR10_CLASSES)
    assert torch.equal(from_folders.images, from_archive.images)
    first = np.asarray(Image.open(folders / "train/airplane/000.png")).transpose(2, 0, 1)
    assert np.array_equal(from_folders.images[0].numpy(), first)
    assert len(load_dataset("cifar10", "test", archives, cache_dir=tmp_path / "c2")) == 10


def test_cifar_image_folders_with_other_classes_fail(tmp_path: Path) -> None:
    classes = [*data.CIFAR10_CLASSES[:9], "zebra"]
    write_image_split(tmp_path / "train", classes, 1)
    write_image_split(tmp_path / "test", classes, 1)
    with pytest.raises(DataError, match=r"train \(.*zebra\) are not the 10 cifar10 classes"):
        load_dataset("cifar10", "train", tmp_path)


# ------------------------------------------------------------------------------- stl10


@pytest.mark.parametrize("inside", [True, False])
def test_stl10_binary_all_splits(tmp_path: Path, inside: bool) -> None:
    folder = tmp_path / "stl10_binary" if inside else tmp_path
    expected = write_stl10(folder)
    for split in ("train", "test", "unlabeled"):
        ds = load_dataset("stl10", split, tmp_path)
        images, labels = expected[split]
        assert ds.images.shape == (len(images), 3, 96, 96) and ds.images.is_contiguous()
        assert np.array_equal(ds.images.numpy(), images)
        want = labels if labels is not None else np.full(len(images), -1)
        assert ds.labels.tolist() == want.tolist()
    both = load_dataset("stl10", "train+unlabeled", tmp_path)
    assert len(both) == 5 and both.labels.tolist()[3:] == [-1, -1]
    assert np.array_equal(both.images[3:].numpy(), expected["unlabeled"][0])
    assert both.classes == list(data.STL10_CLASSES)


def test_stl10_reads_like_torchvision(tmp_path: Path) -> None:
    """The stored layout, decoded the way torchvision's STL10 does, equals our images."""
    write_stl10(tmp_path, names=False)
    stored = np.fromfile(tmp_path / "train_X.bin", dtype=np.uint8).reshape(-1, 3, 96, 96)
    ds = load_dataset("stl10", "train", tmp_path)
    assert np.array_equal(ds.images.numpy(), np.transpose(stored, (0, 1, 3, 2)))
    assert ds.classes == list(data.STL10_CLASSES)


def test_stl10_missing_unlabeled_and_truncated_files(tmp_path: Path) -> None:
    write_stl10(tmp_path, counts=(2, 1, 0))
    with pytest.raises(DataError, match=r"has no unlabeled split of stl10 \(found: train, test\)"):
        load_dataset("stl10", "unlabeled", tmp_path)
    with pytest.raises(DataError, match=r"no train\+unlabeled split"):
        load_dataset("stl10", "train+unlabeled", tmp_path)
    with open(tmp_path / "test_X.bin", "ab") as f:
        f.write(b"\x00" * 10)
    with pytest.raises(DataError, match=r"test_X.bin has 27658 bytes, not a multiple of 96\*96\*3"):
        load_dataset("stl10", "test", tmp_path)


# ------------------------------------------------------------------------------- mnist


@pytest.mark.parametrize(
    ("name", "where", "gz"),
    [
        ("mnist", "", False),
        ("mnist", "raw", True),
        ("mnist", "MNIST/raw", False),
        ("fashion-mnist", "", True),
        ("fashion-mnist", "FashionMNIST/raw", False),
    ],
)
def test_idx_files_round_trip(tmp_path: Path, name: str, where: str, gz: bool) -> None:
    expected = write_mnist(tmp_path / where, gz=gz)
    for split in ("train", "test"):
        ds = load_dataset(name, split, tmp_path)
        images, labels = expected[split]
        assert ds.images.shape == (len(images), 1, 28, 28) and ds.images.dtype == torch.uint8
        assert np.array_equal(ds.images[:, 0].numpy(), images)
        assert ds.labels.tolist() == labels.tolist() and ds.info.channels == 1
    assert ds.classes[9] == ("9" if name == "mnist" else "Ankle boot")


def test_idx_bad_magic_and_truncation(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    images = tmp_path / "t10k-images-idx3-ubyte"
    raw = images.read_bytes()
    images.write_bytes(raw[:-5])
    with pytest.raises(DataError, match=r"holds 2347 values, its header says \(3, 28, 28\)"):
        load_dataset("mnist", "test", tmp_path)
    images.write_bytes(b"\x00\x00\x0d\x03" + raw[4:])  # float32 data: not ours
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte is not an IDX file of uint8"):
        load_dataset("mnist", "test", tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz cannot be read"):
        load_dataset("mnist", "test", tmp_path)


# ------------------------------------------------------------------------------- svhn


def test_svhn_mat_files(tmp_path: Path) -> None:
    from scipy.io import savemat

    x = RNG.integers(0, 256, (32, 32, 3, 4), dtype=np.uint8)  # the files' [H, W, C, N]
    y = np.array([[10], [1], [9], [10]], dtype=np.uint8)
    savemat(tmp_path / "train_32x32.mat", {"X": x, "y": y})
    ds = load_dataset("svhn", "train", tmp_path)
    assert ds.images.shape == (4, 3, 32, 32) and ds.images.is_contiguous()
    assert np.array_equal(ds.images[1].numpy(), x[..., 1].transpose(2, 0, 1))
    assert ds.labels.tolist() == [0, 1, 9, 0]
    (tmp_path / "test_32x32.mat").write_bytes(b"MATLAB? no")
    with pytest.raises(DataError, match=r"test_32x32.mat is not an SVHN .mat file"):
        load_dataset("svhn", "test", tmp_path)


# ------------------------------------------------------------------------------- image folders


def write_mixed_split(split_dir: Path) -> dict[str, np.ndarray]:
    """Two classes, every colour mode and file type, one odd size, plus files to ignore."""
    a, b = split_dir / "zebra", split_dir / "ant"
    rgb = RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    gray = RNG.integers(0, 256, (8, 8), dtype=np.uint8)
    rgba = RNG.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    save_png(a / "rgb.png", rgb)
    save_png(a / "gray.png", gray)
    save_png(a / "rgba.png", rgba)
    palette = Image.fromarray(rgb).quantize(colors=16)
    palette.save(a / "palette.gif")
    b.mkdir(parents=True)
    Image.new("CMYK", (8, 8), (255, 0, 0, 0)).save(b / "cyan.tif")
    Image.fromarray(rgb).save(b / "copy.BMP")
    Image.fromarray(rgb).save(b / "copy.webp", lossless=True)
    odd = np.zeros((12, 36, 3), np.uint8)  # 36 wide, 12 high: red, green and blue bands
    odd[:, :12, 0], odd[:, 12:24, 1], odd[:, 24:, 2] = 255, 255, 255
    save_png(b / "odd.png", odd)
    (b / "notes.txt").write_text("not an image, not counted")
    save_png(b / ".hidden.png", rgb)
    return {"rgb": rgb, "gray": gray, "rgba": rgba, "palette": np.asarray(palette.convert("RGB"))}


def test_imagefolder_modes_sizes_classes_and_stats(tmp_path: Path) -> None:
    ref = write_mixed_split(tmp_path / "train")
    write_mixed_split(tmp_path / "test")
    ds = load_dataset("imagefolder", "train", tmp_path)
    assert isinstance(ds, ArrayDataset) and ds.images.shape == (8, 3, 8, 8)
    assert ds.classes == ["ant", "zebra"] and ds.labels.tolist() == [0] * 4 + [1] * 4
    order = [
        "copy_bmp",
        "copy_webp",
        "cyan",
        "odd",
        "gray",
        "palette",
        "rgb",
        "rgba",
    ]  # sorted files
    got = {name: ds.images[i].numpy().transpose(1, 2, 0) for i, name in enumerate(order)}
    assert np.array_equal(got["rgb"], ref["rgb"])
    assert np.array_equal(got["copy_bmp"], ref["rgb"]) and np.array_equal(
        got["copy_webp"], ref["rgb"]
    )
    assert np.array_equal(got["gray"], np.repeat(ref["gray"][..., None], 3, axis=2))
    assert np.array_equal(got["rgba"], ref["rgba"][..., :3])  # alpha dropped, colours kept
    assert np.array_equal(got["palette"], ref["palette"])
    assert (got["cyan"] == [0, 255, 255]).all()
    odd = got["odd"]  # shorter side 12 -> 8, so 24x8, center-cropped to 8x8: the green band
    assert (odd[:, 2:6] == [0, 255, 0]).all() and (odd[..., 1] > 127).all()
    info = ds.info
    assert (info.num_classes, info.img_size, info.channels) == (2, 8, 3)
    pixels = ds.images.double() / 255
    assert np.allclose(info.mean, pixels.mean(dim=(0, 2, 3)).tolist(), atol=1e-7)
    assert np.allclose(info.std, pixels.std(dim=(0, 2, 3), unbiased=False).tolist(), atol=1e-7)
    test = load_dataset("imagefolder", "test", tmp_path)
    assert test.info == info and test.classes == ds.classes


def test_palette_with_transparency_converts_without_warnings(tmp_path: Path) -> None:
    rgb = RNG.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    palette = Image.fromarray(rgb).quantize(colors=8)
    (tmp_path / "train/a").mkdir(parents=True)
    palette.save(
        tmp_path / "train/a/t.png", transparency=bytes([0, 128, 255, 255, 255, 255, 255, 255])
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL warns on P -> RGB with byte transparency
        ds = load_dataset("imagefolder", "train", tmp_path)
    assert np.array_equal(
        ds.images[0].numpy().transpose(1, 2, 0), np.asarray(palette.convert("RGB"))
    )


def test_imagefolder_most_frequent_size_wins(tmp_path: Path) -> None:
    write_image_split(tmp_path / "train", ["a"], 3, size=6)
    save_png(tmp_path / "train/a/big.png", np.full((20, 20, 3), 77, np.uint8))
    save_png(tmp_path / "train/b/wide.png", np.full((6, 30, 3), 200, np.uint8))
    write_image_split(tmp_path / "val", ["a", "b"], 1, size=6)
    train = load_dataset("imagefolder", "train", tmp_path)
    assert train.images.shape == (5, 3, 6, 6) and train.info.img_size == 6
    assert (train.images[3] == 77).all() and (train.images[4] == 200).all()
    assert len(load_dataset("imagefolder", "test", tmp_path)) == 2  # val/ serves as test


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".tgz"])
@pytest.mark.parametrize("prefix", [True, False])
def test_imagefolder_archives_equal_folders(tmp_path: Path, suffix: str, prefix: bool) -> None:
    folders, archives = tmp_path / "folders", tmp_path / "archives"
    write_mixed_split(folders / "train")
    write_image_split(folders / "test", ["ant", "zebra"], 2)
    archives.mkdir()
    for split in ("train", "test"):
        tar_folder(folders / split, archives / f"{split}{suffix}", split if prefix else None)
    before = files_under(archives)
    want = load_dataset("imagefolder", "train", folders, cache_dir=tmp_path / "c1")
    got = load_dataset("imagefolder", "train", archives, cache_dir=tmp_path / "c2")
    assert torch.equal(got.images, want.images) and torch.equal(got.labels, want.labels)
    assert got.classes == want.classes and got.info == want.info
    test = load_dataset("imagefolder", "test", archives, cache_dir=tmp_path / "c2")
    assert test.labels.tolist() == [0, 0, 1, 1]
    assert files_under(archives) == before


def test_imagefolder_test_classes_must_match_train(tmp_path: Path) -> None:
    write_image_split(tmp_path / "train", ["cat", "dog"], 1)
    write_image_split(tmp_path / "test", ["cat", "emu"], 1)
    with pytest.raises(DataError, match=r"differ from .*train: extra \['emu'\], missing \['dog'\]"):
        load_dataset("imagefolder", "test", tmp_path)


def test_imagefolder_needs_train_and_class_folders(tmp_path: Path) -> None:
    write_image_split(tmp_path / "only-test" / "test", ["cat"], 1)
    with pytest.raises(DataError, match=r"has test but no train/ \(or train.tar\[.gz\]\)"):
        load_dataset("imagefolder", "test", tmp_path / "only-test")
    flat = tmp_path / "flat"
    save_png(flat / "train" / "loose.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(DataError, match=r"no images \(.*\) in class folders under .*flat/train"):
        load_dataset("imagefolder", "train", flat)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken/train.tar").write_bytes(b"\x00" * 10)
    with pytest.raises(DataError, match=r"broken/train.tar is not a readable tar archive"):
        load_dataset("imagefolder", "train", tmp_path / "broken")


def write_with_bad(split_dir: Path, good: int, bad: list[str]) -> None:
    for i in range(good):
        save_png(split_dir / f"c{i % 2}" / f"{i:03d}.png", np.full((2, 2, 3), i, np.uint8))
    png = split_dir / "big.png"
    save_png(png, RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    contents = {"empty": b"", "truncated": png.read_bytes()[:600], "text": b"hello, not a JPEG"}
    png.unlink()
    for kind in bad:
        (split_dir / "c0" / f"bad-{kind}.jpg").write_bytes(contents[kind])


@pytest.mark.parametrize("kind", ["empty", "truncated", "text"])
def test_unreadable_image_is_skipped_counted_and_logged(tmp_path: Path, caplog, kind: str) -> None:
    write_with_bad(tmp_path / "train", 100, [kind])
    with caplog.at_level(logging.WARNING, logger="mae_bench.data"):
        ds = load_dataset("imagefolder", "train", tmp_path)
    assert len(ds) == 100 and ds.bad_images == 1
    assert any(f"bad-{kind}.jpg" in r.getMessage() for r in caplog.records)


def test_more_than_one_percent_bad_is_an_error(tmp_path: Path) -> None:
    write_with_bad(tmp_path / "train", 100, ["empty", "truncated"])
    with pytest.raises(
        DataError, match=r"2 of 102 images in .*train could not be read \(over 1 %\)"
    ):
        load_dataset("imagefolder", "train", tmp_path)


# ------------------------------------------------------------------------------- cache


def count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    real = data.images._open_rgb

    def counting(blob: bytes, where: str):
        calls[0] += 1
        return real(blob, where)

    monkeypatch.setattr(data.images, "_open_rgb", counting)
    return calls


@pytest.mark.parametrize("archive", [False, True])
def test_second_load_hits_the_cache(tmp_path: Path, monkeypatch, archive: bool) -> None:
    src = tmp_path / "src"
    write_image_split(tmp_path / "folder/train" if archive else src / "train", ["a", "b"], 3)
    if archive:
        src.mkdir()
        tar_folder(tmp_path / "folder/train", src / "train.tar.gz", "train")
    calls, cache = count_decodes(monkeypatch), tmp_path / "cache"
    first = load_dataset("imagefolder", "train", src, cache_dir=cache)
    assert calls[0] == 6
    before = files_under(src)
    second = load_dataset("imagefolder", "train", src, cache_dir=cache)
    assert calls[0] == 6  # no decoding the second time
    assert torch.equal(first.images, second.images) and second.info == first.info
    assert files_under(src) == before
    cached = list((cache / "arrays").iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".npz"  # no temp files left behind
    changed = src / ("train.tar.gz" if archive else "train/a/000.png")
    os.utime(changed, ns=(1, 1))  # a new mtime is a new key
    load_dataset("imagefolder", "train", src, cache_dir=cache)
    assert calls[0] == 12
    if not archive:  # a renamed file (same size and mtime) is a new key too
        (src / "train/b/002.png").rename(src / "train/b/009.png")
        load_dataset("imagefolder", "train", src, cache_dir=cache)
        assert calls[0] == 18


def test_corrupt_cache_file_is_ignored(tmp_path: Path, monkeypatch, caplog) -> None:
    write_image_split(tmp_path / "src/train", ["a"], 2)
    load_dataset("imagefolder", "train", tmp_path / "src", cache_dir=tmp_path / "cache")
    (cache_file,) = (tmp_path / "cache/arrays").iterdir()
    cache_file.write_bytes(b"garbage")
    calls = count_decodes(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="mae_bench.data"):
        ds = load_dataset("imagefolder", "train", tmp_path / "src", cache_dir=tmp_path / "cache")
    assert len(ds) == 2 and calls[0] == 2
    assert any("ignoring unreadable cache file" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------- streaming


def crop4(x: torch.Tensor) -> torch.Tensor:
    return x[:, :4, :4]


@pytest.mark.multiprocess
def test_streaming_folder_counts_bad_images_across_workers(tmp_path: Path) -> None:
    for i in range(7):
        save_png(tmp_path / "train" / f"c{i % 2}" / f"{i}.png", np.full((6 + i, 5, 3), i, np.uint8))
    (tmp_path / "train/c0/1-bad.png").write_bytes(b"")  # sorts after 0.png in class c0
    ds = load_dataset("imagefolder", "train", tmp_path, max_in_memory_bytes=100)
    assert isinstance(ds, StreamingDataset) and len(ds) == 8
    assert ds.info.img_size == 224 and ds.info.mean == data.IMAGENET_MEAN
    assert ds.info.num_classes == 2 and ds.classes == ["c0", "c1"]
    ds.set_transform(crop4)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2)
    images, labels = zip(*loader, strict=True)
    images, labels = torch.cat(images), torch.cat(labels)
    assert images.shape == (8, 3, 4, 4) and images.dtype == torch.uint8
    # c0 holds 0.png, 1-bad.png, 2.png, 4.png, 6.png: the bad one is replaced by 2.png
    assert images[:, 0, 0, 0].tolist() == [0, 2, 2, 4, 6, 1, 3, 5]
    assert labels.tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert (ds.bad_images, ds.seen_images) == (1, 9)
    ds.check_bad_fraction()  # fewer than 100 seen: no verdict yet


def test_streaming_check_bad_fraction(tmp_path: Path) -> None:
    write_with_bad(tmp_path / "train", 100, ["empty", "text"])
    ds = load_dataset("imagefolder", "train", tmp_path, max_in_memory_bytes=10)
    assert isinstance(ds, StreamingDataset)
    ds.check_bad_fraction()
    for i in range(len(ds)):
        ds[i]
    # index 50 reads both bad files before a good one, index 51 the second again
    assert (ds.bad_images, ds.seen_images) == (3, 105)
    ds.check_bad_fraction(limit=0.05)
    with pytest.raises(
        DataError, match=r"3 of 105 images in .*train could not be read \(over 1%\)"
    ):
        ds.check_bad_fraction()


def test_streaming_plain_tar_reads_by_offset(tmp_path: Path) -> None:
    write_image_split(tmp_path / "folders/train", ["a", "b"], 2, size=5)
    (tmp_path / "arch").mkdir()
    tar_folder(tmp_path / "folders/train", tmp_path / "arch/train.tar", "train")
    want = load_dataset("imagefolder", "train", tmp_path / "folders")
    ds = load_dataset("imagefolder", "train", tmp_path / "arch", max_in_memory_bytes=10)
    assert isinstance(ds, StreamingDataset) and ds.root == tmp_path / "arch/train.tar"
    for i in range(4):
        image, label = ds[i]
        assert torch.equal(image, want.images[i]) and label == int(want.labels[i])
    clone = pickle.loads(pickle.dumps(ds))  # what spawn-based workers receive: no open file
    assert torch.equal(clone[3][0], want.images[3])


def test_streaming_targz_extracts_into_the_cache_only(tmp_path: Path) -> None:
    write_image_split(tmp_path / "folders/train", ["a", "b"], 2, size=5)
    (tmp_path / "arch").mkdir()
    tar_folder(tmp_path / "folders/train", tmp_path / "arch/train.tar.gz", "train")
    want = load_dataset("imagefolder", "train", tmp_path / "folders")
    cache = tmp_path / "cache"
    ds = load_dataset(
        "imagefolder", "train", tmp_path / "arch", cache_dir=cache, max_in_memory_bytes=10
    )
    assert isinstance(ds, StreamingDataset)
    assert ds.root.is_relative_to(cache / "extracted")
    assert files_under(tmp_path / "arch") == ["train.tar.gz"]
    assert [int(x) for x in ds.labels] == want.labels.tolist()
    assert all(torch.equal(ds[i][0], want.images[i]) for i in range(4))


# ------------------------------------------------------------------------------- bad folders


def test_missing_file_and_empty_data_dirs(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=r"^data dir .*nope for cifar10 does not exist; get it: https"
    ):
        load_dataset("cifar10", "train", tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match=r"file for mnist is a file; pass the folder that holds it"):
        load_dataset("mnist", "train", tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty for svhn is empty; get it: http"):
        load_dataset("svhn", "train", tmp_path / "empty")
    with pytest.raises(
        DataError,
        match=r"^default data dir \(pass --data-dir or set MAE_BENCH_DATA\) "
        r".*home/.cache/mae-bench/data/stl10 for stl10 does not exist",
    ):
        load_dataset("stl10", "train")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("cifar10", "cifar-10-batches-py/ (data_batch_1, "),
        ("cifar100", "cifar-100-python.tar.gz"),
        ("stl10", "stl10_binary/ with train_X.bin"),
        ("mnist", "train-images-idx3-ubyte[.gz]"),
        ("fashion-mnist", "FashionMNIST/raw/"),
        ("svhn", "train_32x32.mat and test_32x32.mat"),
        ("imagefolder", "train/ and test/ (or val/) class folders"),
    ],
)
def test_wrong_layout_says_what_was_expected(tmp_path: Path, name: str, expected: str) -> None:
    (tmp_path / "README.txt").write_text("wrong folder")
    with pytest.raises(DataError) as err:
        load_dataset(name, "train", tmp_path)
    message = str(err.value)
    assert message.startswith(f"{tmp_path} does not hold {name}: expected ")
    assert expected in message and "get it: " in message and "\n" not in message


# ------------------------------------------------------------------------------- status


def test_dataset_status_found_missing_and_cheap(tmp_path: Path, monkeypatch) -> None:
    write_cifar10(tmp_path / "cifar")
    write_stl10(tmp_path / "stl", counts=(1, 1, 0))
    write_image_split(tmp_path / "images/train", ["a"], 1)

    def no_decoding(*args, **kwargs):
        raise AssertionError("dataset_status must not decode")

    monkeypatch.setattr(data.images, "_open_rgb", no_decoding)
    monkeypatch.setattr(data.cifar, "_unpickle", no_decoding)
    assert dataset_status("cifar10", tmp_path / "cifar") == (
        True,
        f"{tmp_path}/cifar: found train, test",
    )
    ok, detail = dataset_status("stl10", tmp_path / "stl")
    assert ok and detail.endswith("found train, test; missing unlabeled, train+unlabeled")
    assert dataset_status("imagefolder", tmp_path / "images") == (
        True,
        f"{tmp_path}/images: found train; missing test",
    )
    ok, detail = dataset_status("svhn", tmp_path / "cifar")
    assert not ok and "does not hold svhn: expected train_32x32.mat" in detail
    ok, detail = dataset_status("mnist", None)
    assert not ok and "home/.cache/mae-bench/data/mnist for mnist does not exist" in detail


# --------------------------------------------------------------- issue 28: 15, 16, 18


def unreadable_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "unreadable image" in r.getMessage()]


def test_a_second_decode_pass_does_not_warn_again(tmp_path: Path, caplog) -> None:
    """A wrong size guess costs a second pass over the files; the unreadable one is named once."""
    write_with_bad(tmp_path / "train", 100, ["text"])
    index = data.index._classify(tmp_path / "train", data.index._walk(tmp_path / "train")[0],
                                 strip_prefix=False)
    blobs = index.read_all()
    with caplog.at_level(logging.WARNING, logger="mae_bench.data"):
        images, labels, *_ = data.images._decode(index, blobs, [0] * len(blobs), (5, 5), 2**30)
    assert images.shape == (100, 3, 2, 2) and len(labels) == 100  # the 2x2 of the files
    assert len(unreadable_warnings(caplog)) == 1


def test_loading_both_splits_in_one_command_warns_once(tmp_path: Path, caplog) -> None:
    """imagefolder's test split reads the train split (classes, channels, statistics); inside
    one command (``cache_writes_held``, as eval and pretrain run) that is not a second decode."""
    write_with_bad(tmp_path / "train", 100, ["truncated"])
    write_with_bad(tmp_path / "test", 10, [])
    with caplog.at_level(logging.WARNING, logger="mae_bench.data"), data.cache_writes_held():
        train = load_dataset("imagefolder", "train", tmp_path)
        test = load_dataset("imagefolder", "test", tmp_path)
    assert (train.bad_images, test.bad_images, len(test)) == (1, 0, 10)
    warned = unreadable_warnings(caplog)
    assert len(warned) == 1 and "bad-truncated.jpg" in warned[0]


def gray_folder(split_dir: Path, n: int) -> None:
    for i in range(n):
        save_png(split_dir / f"c{i % 2}" / f"{i:02d}.png", RNG.integers(0, 256, (8, 8), np.uint8))


def test_colour_files_in_a_gray_folder_are_named(tmp_path: Path, caplog) -> None:
    gray_folder(tmp_path / "train", 10)
    rgba = RNG.integers(0, 256, (8, 8, 4), np.uint8)
    save_png(tmp_path / "train/c1/stray.png", rgba)
    for attempt in ("decoded", "from the cache"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mae_bench.data"):
            ds = load_dataset("imagefolder", "train", tmp_path)
        assert ds.info.channels == 3 and ds.images.shape == (11, 3, 8, 8), attempt
        assert np.array_equal(ds.images[10].numpy().transpose(1, 2, 0), rgba[..., :3])
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warned == [
            f"{tmp_path}/train: 1 of 11 images are colour ({tmp_path}/train/c1/stray.png), so "
            "every image is read as 3 channels; convert those to grayscale (or remove them) to "
            "read the folder as 1 channel"
        ], attempt


def test_gray_images_in_a_colour_folder_are_not_worth_a_warning(tmp_path: Path, caplog) -> None:
    write_image_split(tmp_path / "train", ["a", "b"], 3)
    gray_folder(tmp_path / "train", 1)
    with caplog.at_level(logging.WARNING, logger="mae_bench.data"):
        ds = load_dataset("imagefolder", "train", tmp_path)
    assert ds.info.channels == 3 and len(ds) == 7 and not caplog.records


def test_colour_test_images_read_as_gray_are_named(tmp_path: Path, caplog) -> None:
    gray_folder(tmp_path / "train", 6)
    gray_folder(tmp_path / "test", 4)
    rgb = RNG.integers(0, 256, (8, 8, 3), np.uint8)
    save_png(tmp_path / "test/c0/colour.png", rgb)
    with caplog.at_level(logging.WARNING, logger="mae_bench.data"):
        test = load_dataset("imagefolder", "test", tmp_path)
    assert test.images.shape == (5, 1, 8, 8)
    luma = np.round(rgb.astype(float) @ [0.299, 0.587, 0.114])
    assert np.abs(test.images[2, 0].numpy() - luma).max() <= 1  # c0: 00, 02, colour
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == [f"{tmp_path}/test: 1 of 5 images are colour ({tmp_path}/test/c0/colour.png);"
                      " they are read as grayscale, like the train split"]


def test_mnist_given_an_image_folder_suggests_imagefolder(tmp_path: Path) -> None:
    gray_folder(tmp_path / "train", 4)
    gray_folder(tmp_path / "test", 2)
    with pytest.raises(DataError) as err:
        load_dataset("mnist", "train", tmp_path)
    message = str(err.value)
    assert message.startswith(f"{tmp_path} does not hold mnist: expected train-images-idx3-ubyte")
    assert "; it holds imagefolder data (--dataset imagefolder); get it: " in message
    write_cifar10(tmp_path / "batches")  # a fixed data set's files are named as such
    with pytest.raises(DataError, match=r"; it holds cifar10 data \(--dataset cifar10\); get"):
        load_dataset("svhn", "train", tmp_path / "batches")


def test_check_dataset_loads_what_the_layout_promises(tmp_path: Path) -> None:
    """An image folder of 28-px gray digits has the layout CIFAR image folders have; only
    loading tells that it is not CIFAR, and that a folder of too many bad files is unusable."""
    digits = tmp_path / "digits"
    for split, n in (("train", 3), ("test", 1)):
        for c in "0123456789":
            for i in range(n):
                save_png(digits / split / c / f"{i}.png", RNG.integers(0, 256, (28, 28), np.uint8))
    for name in ("cifar10", "cifar100"):
        assert dataset_status(name, digits)[0]  # the cheap look is fooled...
        check = data.check_dataset(name, digits)  # ...loading is not
        assert not check.usable and "(0, 1, 2, 3, 4, 5, 6, 7, 8, 9) are not the" in check.detail
        assert check.info is DATASETS[name]
    check = data.check_dataset("imagefolder", digits)
    assert check.usable and check.detail == f"{digits}: found train, test"
    assert (check.info.img_size, check.info.channels, check.info.num_classes) == (28, 1, 10)
    mnist = data.check_dataset("mnist", digits)
    assert not mnist.usable and "(--dataset imagefolder)" in mnist.detail

    write_with_bad(tmp_path / "bad/train", 100, ["empty", "text"])
    check = data.check_dataset("imagefolder", tmp_path / "bad")
    assert not check.usable and "2 of 102 images" in check.detail
    write_with_bad(tmp_path / "one/train", 100, ["text"])
    check = data.check_dataset("imagefolder", tmp_path / "one")
    assert check.usable and check.detail.endswith("; 1 unreadable image(s) in train skipped")
