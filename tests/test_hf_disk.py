"""hf-disk: a Hugging Face ``save_to_disk`` folder streamed with its stored image bytes
(mae_bench/data/hf_disk.py)."""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from mae_bench.data import load_dataset
from mae_bench.data.hf_disk import HFDiskDataset
from mae_bench.data.loader import TrainBatches, epoch_order
from mae_bench.errors import DataError

SIZE = 8


@pytest.fixture(autouse=True)
def _no_user_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MAE_BENCH_DATA", raising=False)
    monkeypatch.setenv("MAE_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    datasets.disable_progress_bars()


def encoded(value: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((SIZE, SIZE, 3), value, np.uint8)).save(buf, fmt)
    return buf.getvalue()


def saved(root: Path, label_feature: Any = None,
          labels: list[int] | None = None, test_split: str = "test") -> list[bytes]:
    """A DatasetDict of 12 train and 4 test images (PNG and JPEG) saved to ``root``; returns
    the train images' bytes."""
    labels = labels or [i % 3 for i in range(12)]
    blobs = [encoded(20 * i, ("PNG", "JPEG")[i % 2]) for i in range(12)]
    features = datasets.Features({
        "img": datasets.Image(),
        "label": label_feature or datasets.ClassLabel(names=["ant", "bee", "cat"]),
        "caption": datasets.Value("string"),
    })
    train = datasets.Dataset.from_dict(
        {"img": [{"bytes": b, "path": None} for b in blobs], "label": labels,
         "caption": [f"image {i}" for i in range(12)]}, features=features)
    datasets.DatasetDict({"train": train, test_split: train.select(range(4))}).save_to_disk(
        str(root))
    return blobs


def test_the_stored_bytes_and_labels_are_read_undecoded(tmp_path):
    blobs = saved(tmp_path / "hf", test_split="validation")
    ds = load_dataset("hf-disk", "train", tmp_path / "hf")
    assert isinstance(ds, HFDiskDataset) and len(ds) == 12
    assert [ds._read(i) for i in range(12)] == blobs  # the stored bytes, not re-encoded
    assert ds.labels.tolist() == [i % 3 for i in range(12)]
    assert ds.classes == ["ant", "bee", "cat"] and ds.info.num_classes == 3
    assert ds.where(5) == f"{tmp_path}/hf/train[5]"
    image, label = ds[2]
    assert label == 2 and image.shape == (3, SIZE, SIZE) and int(image[0, 0, 0]) == 40
    test = load_dataset("hf-disk", "test", tmp_path / "hf")  # the validation split
    assert len(test) == 4 and test.root == tmp_path / "hf" / "validation"


def test_train_batches_match_the_seeded_order(tmp_path):
    saved(tmp_path / "hf")
    ds = load_dataset("hf-disk", "train", tmp_path / "hf")
    batches = TrainBatches(ds, batch_size=4, micro_per_epoch=3, seed=1)
    got = list(batches.epoch(0))
    order = epoch_order(12, 1, 0)
    for k, (images, labels) in enumerate(got):
        idx = order[4 * k:4 * k + 4].tolist()
        assert labels.tolist() == [i % 3 for i in idx]
        expected = [torch.from_numpy(np.array(Image.open(io.BytesIO(ds._read(i))).convert("RGB")))
                    .permute(2, 0, 1) for i in idx]
        assert torch.equal(images, torch.stack(expected))
    resumed = list(batches.epoch(0, start=1))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed, got[1:], strict=True))


@pytest.mark.multiprocess
def test_workers_reopen_the_files_and_read_the_same_batches(tmp_path):
    saved(tmp_path / "hf")
    ds = load_dataset("hf-disk", "train", tmp_path / "hf")
    ds._read(0)  # opened here first: a forked worker must not reuse this process's handle
    one = list(TrainBatches(ds, 4, 3, seed=2).epoch(1))
    two = list(TrainBatches(ds, 4, 3, seed=2, num_workers=2).epoch(1))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(one, two, strict=True))


def test_plain_integer_labels_name_classes_by_number(tmp_path):
    saved(tmp_path / "hf", datasets.Value("int64"), labels=[i % 5 for i in range(12)])
    ds = load_dataset("hf-disk", "test", tmp_path / "hf")
    assert ds.classes == ["0", "1", "2", "3", "4"]  # the train split's labels count too


def test_bad_folders_are_one_line(tmp_path, monkeypatch):
    saved(tmp_path / "hf", datasets.Value("int64"), labels=[-1] + [0] * 11)
    with pytest.raises(DataError) as err:
        load_dataset("hf-disk", "train", tmp_path / "hf")
    assert str(err.value) == (f"{tmp_path}/hf/train[0] has label -1: unlabelled rows cannot be "
                              "trained or evaluated here; filter them out and save again")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.txt").write_text("x")
    with pytest.raises(DataError, match=r"/plain does not hold hf-disk: expected a save_to_disk "
                                        r"folder: dataset_dict.json with train and test"):
        load_dataset("hf-disk", "train", tmp_path / "plain")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if it were not installed
    with pytest.raises(DataError) as err:
        load_dataset("hf-disk", "test", tmp_path / "hf")
    assert str(err.value) == ("--dataset hf-disk reads with Hugging Face datasets, which is not "
                              "installed: pip install 'mae-bench[hf-datasets]'")


def test_a_missing_label_column_is_named(tmp_path):
    data = datasets.Dataset.from_dict(
        {"image": [{"bytes": encoded(1, "PNG"), "path": None}], "fine_label": [0]},
        features=datasets.Features({"image": datasets.Image(),
                                    "fine_label": datasets.Value("int64")}))
    data.save_to_disk(str(tmp_path / "one"))  # a single Dataset: the train split
    with pytest.raises(DataError) as err:
        load_dataset("hf-disk", "train", tmp_path / "one")
    assert str(err.value) == (f"{tmp_path}/one has no 'label' column (columns: image, "
                              "fine_label); rename yours with rename_column(NAME, 'label') and "
                              "save it again")
