"""The ImageNet presets (``mae_bench/data/imagenet.py``): imagenet, imagenet100 and imagenette
read ImageNet-style class folders of fixed classes, label ids in sorted-wnid order."""

from __future__ import annotations

import importlib.util
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run_cli
from PIL import Image

from mae_bench.data import (
    DATASETS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ArrayDataset,
    StreamingDataset,
    load_dataset,
)
from mae_bench.data.classes import IMAGENET_WNIDS
from mae_bench.data.imagenet import IMAGENET100_WNIDS, IMAGENETTE_CLASSES
from mae_bench.errors import DataError

IMAGENETTE = tuple(IMAGENETTE_CLASSES)
TIMM_INFO = Path(importlib.util.find_spec("timm").submodule_search_locations[0]) / "data/_info"


@pytest.fixture(autouse=True)
def _sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MAE_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MAE_BENCH_DATA", raising=False)
    monkeypatch.setenv("COLUMNS", "1000")  # one line per table row


def class_tree(root: Path, codes: dict[str, int], splits: tuple[str, ...] = ("train", "val"),
               per_class: int = 1) -> Path:
    """ROOT/SPLIT/<wnid>/<i>.png, 8x8, every pixel (code, 255 - code, 7): the image says which
    class folder it came from."""
    for split in splits:
        for wnid, code in codes.items():
            for i in range(per_class):
                path = root / split / wnid / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                pixels = np.full((8, 8, 3), (code, 255 - code, 7), np.uint8)
                Image.fromarray(pixels).save(path)
    return root


def folder_codes(ds: ArrayDataset) -> list[int]:
    """Per image, the code its class folder wrote into it (its first pixel's red value)."""
    return ds.images[:, 0, 0, 0].tolist()


def test_the_presets_are_registered_after_imagefolder_with_imagenet_statistics():
    names = list(DATASETS)
    at = names.index("imagefolder")
    assert names[at + 1 : at + 4] == ["imagenet", "imagenet100", "imagenette"]
    assert {n: DATASETS[n].num_classes for n in names[at + 1 : at + 4]} == {
        "imagenet": 1000, "imagenet100": 100, "imagenette": 10}
    for name in ("imagenet", "imagenet100", "imagenette"):
        info = DATASETS[name]
        assert (info.channels, info.img_size, info.mean, info.std, info.splits) == (
            3, 224, IMAGENET_MEAN, IMAGENET_STD, ("train", "test"))
        assert info.notes and all(": " in note and "\n" not in note for note in info.notes)


def test_class_tables_agree_with_timm_and_each_other():
    timm_wnids = (TIMM_INFO / "imagenet_synsets.txt").read_text().split()
    assert IMAGENET_WNIDS == tuple(timm_wnids) == tuple(sorted(timm_wnids))
    assert len(set(IMAGENET100_WNIDS)) == 100 and list(IMAGENET100_WNIDS) == sorted(
        IMAGENET100_WNIDS)
    assert set(IMAGENET100_WNIDS) < set(IMAGENET_WNIDS)
    assert (IMAGENET100_WNIDS[0], IMAGENET100_WNIDS[-1]) == ("n01558993", "n13040303")
    assert list(IMAGENETTE) == sorted(IMAGENETTE) and set(IMAGENETTE) < set(IMAGENET_WNIDS)
    lemmas = dict(line.split("\t") for line in
                  (TIMM_INFO / "imagenet_synset_to_lemma.txt").read_text().splitlines())
    assert {w: lemmas[w].split(", ")[0] for w in IMAGENETTE} == IMAGENETTE_CLASSES


def test_imagenette_loads_in_sorted_wnid_order_from_folders_and_tars(tmp_path):
    codes = {w: 10 * (k + 1) for k, w in enumerate(IMAGENETTE)}  # label k wrote 10 (k + 1)
    root = class_tree(tmp_path / "imagenette2", dict(reversed(codes.items())), per_class=2)
    (root / "test").mkdir()  # as ImageNet's test/: unlabelled, so val/ is the test split
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "test" / "unlabelled.png")
    for split in ("train", "test"):
        ds = load_dataset("imagenette", split, root)
        assert isinstance(ds, ArrayDataset) and ds.classes == sorted(IMAGENETTE)
        assert ds.info is DATASETS["imagenette"]  # ImageNet's statistics, not the folder's
        assert len(ds) == 20 and folder_codes(ds) == [10 * (k + 1) for k in ds.labels.tolist()]
    tars = tmp_path / "tars"
    tars.mkdir()
    for split in ("train", "val"):
        with tarfile.open(tars / f"{split}.tar", "w") as tf:
            tf.add(root / split, arcname=split)
    from_tar = load_dataset("imagenette", "test", tars)
    assert from_tar.classes == sorted(IMAGENETTE)
    assert folder_codes(from_tar) == [10 * (k + 1) for k in from_tar.labels.tolist()]


def full_imagenet(root: Path, extra: tuple[str, ...]) -> Path:
    """train/: the 100 ImageNet-100 classes and ``extra`` others; val/: exactly the 100."""
    codes = {w: k for k, w in enumerate(IMAGENET100_WNIDS)}
    class_tree(root, {**codes, **{w: 200 + i for i, w in enumerate(extra)}}, ("train",))
    return class_tree(root, codes, ("val",))


def test_imagenet100_takes_its_100_classes_from_a_larger_folder(tmp_path):
    extra = ("n01440764", "n15075141", "n03888605")  # ImageNet's first and last, one between
    assert not set(extra) & set(IMAGENET100_WNIDS)
    root = full_imagenet(tmp_path / "imagenet", extra)
    train, val = (load_dataset("imagenet100", s, root) for s in ("train", "test"))
    for ds in (train, val):  # train/ holds 103 classes, val/ exactly the 100
        assert ds.classes == list(IMAGENET100_WNIDS) and len(ds) == 100
        assert folder_codes(ds) == ds.labels.tolist()  # label k is the k-th sorted wnid
    streamed = load_dataset("imagenet100", "train", root, max_in_memory_bytes=0)
    assert isinstance(streamed, StreamingDataset) and len(streamed) == 100
    assert streamed.classes == list(IMAGENET100_WNIDS)
    assert not any(w in streamed.where(i) for i in range(100) for w in extra)


def test_imagenet_reads_1000_class_folders_in_sorted_order(tmp_path):
    root = tmp_path / "imagenet"
    for wnid in IMAGENET_WNIDS:
        (root / "train" / wnid).mkdir(parents=True)
        (root / "train" / wnid / "x.JPEG").write_bytes(b"")  # streamed: never decoded here
    ds = load_dataset("imagenet", "train", root, max_in_memory_bytes=0)
    assert ds.classes == list(IMAGENET_WNIDS) and ds.labels.tolist() == list(range(1000))
    assert ds.where(0).endswith("train/n01440764/x.JPEG")


def test_a_folder_missing_classes_is_a_one_line_error(tmp_path):
    kept = IMAGENET100_WNIDS[3:]  # n01558993, n01692333, n01729322 missing
    root = class_tree(tmp_path / "partial", {**dict.fromkeys(kept, 1), "n01440764": 2},
                      ("train",))
    with pytest.raises(DataError) as err:
        load_dataset("imagenet100", "train", root)
    assert str(err.value) == (
        f"class folders in {root}/train lack 3 of the 100 imagenet100 classes (n01558993, "
        "n01692333, n01729322); give a folder that holds all of them (more class folders are "
        "left out)")
    tenth = class_tree(tmp_path / "tenth", dict.fromkeys(IMAGENETTE[:9], 1), ("train",))
    with pytest.raises(DataError) as err:
        load_dataset("imagenette", "train", tenth)
    assert str(err.value) == (
        f"class folders in {tenth}/train ({', '.join(IMAGENETTE[:9])}) are not the 10 imagenette "
        f"classes ({', '.join(IMAGENETTE)}...); read your own classes with the imagefolder data "
        "set (--dataset imagefolder)")


def test_datasets_lists_the_presets_and_explains_one(monkeypatch, capsys, tmp_path):
    root = class_tree(tmp_path / "imagenette2", dict.fromkeys(IMAGENETTE, 9))
    code, out, _ = run_cli(monkeypatch, capsys, "datasets", "--data-dir", str(root))
    rows = {cells[0]: cells[1:] for line in out.splitlines()
            if (cells := [c.strip() for c in line.split("│")[1:-1]]) and cells[0]}
    assert code in (0, None)
    assert rows["imagenette"][0] == "yes"
    assert rows["imagenette"][1].startswith(f"{root}: found train, test; its images are 8 px")
    assert rows["imagenette"][4] == "10" and rows["imagenet"][4] == "1000"
    assert rows["imagenet"][0] == rows["imagenet100"][0] == "no"
    assert rows["imagenet100"][1].startswith(f"class folders in {root}/train lack 100 of the 100")
    assert "'mae-bench datasets NAME' shows one data set in full" in out

    code, out, _ = run_cli(monkeypatch, capsys, "datasets", "imagenette", "--data-dir", str(root))
    sheet = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in out.splitlines()[1:])
    assert code in (0, None) and out.startswith("imagenette: Imagenette (fast.ai)")
    assert sheet["found"].startswith(f"yes: {root}: found train, test")
    assert "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2.tgz" in sheet["get it"]
    assert "(0.485, 0.456, 0.406), (0.229, 0.224, 0.225)" in out
    assert "n03888257 parachute" in sheet["names"]
    code, out, _ = run_cli(monkeypatch, capsys, "datasets", "imagenet")
    for needed in ("image-net.org", "valprep.sh", "PRETRAIN.md", "mae-bench shard DIR --out "
                   "SHARDS", "DataLoader workers", "0 = n01440764"):
        assert needed in out, needed
    code, out, _ = run_cli(monkeypatch, capsys, "datasets", "imagenet100")
    assert "solo/data/dataset_subset/imagenet100_classes.txt" in out
    assert "scripts/pretrain/imagenet-100/" in out
    code, _, err = run_cli(monkeypatch, capsys, "datasets", "imagenet1k")
    assert code == 2 and "unknown dataset 'imagenet1k'; valid names: digits" in err
