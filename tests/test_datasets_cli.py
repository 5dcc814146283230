"""``mae-bench datasets``: "yes" means the data set loads from the folder (issue 28, item 15)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run_cli
from PIL import Image

RNG = np.random.default_rng(28)


@pytest.fixture(autouse=True)
def _sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MAE_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MAE_BENCH_DATA", raising=False)
    monkeypatch.setenv("COLUMNS", "1000")  # one line per row


def digit_folder(root: Path, per_class: int = 2) -> Path:
    """MNIST as image files: train/<digit>/*.png and test/<digit>/*.png, 28 px, mode L."""
    for split in ("train", "test"):
        for digit in "0123456789":
            for i in range(per_class):
                path = root / split / digit / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(RNG.integers(0, 256, (28, 28), np.uint8), "L").save(path)
    return root


def rows(out: str) -> dict[str, list[str]]:
    """name -> the cells of its first table line (found, detail, size, ch, classes, formats)."""
    table = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if cells and cells[0]:
            table[cells[0]] = cells[1:]
    return table


def test_an_mnist_image_folder_is_imagefolder_data_only(monkeypatch, capsys, tmp_path):
    data = digit_folder(tmp_path / "digits")
    code, out, _ = run_cli(monkeypatch, capsys, "datasets", "--data-dir", str(data))
    table = rows(out)
    assert code in (0, None) and out.endswith("\n")
    assert {name: cells[0] for name, cells in table.items()} == {
        "digits": "yes", "cifar10": "no", "cifar100": "no", "stl10": "no", "mnist": "no",
        "fashion-mnist": "no", "svhn": "no", "imagefolder": "yes", "imagenet": "no",
        "imagenet100": "no", "imagenette": "no", "shards": "no", "hf-disk": "no"}
    assert table["cifar10"][1].startswith(f"class folders in {data}/train (0, 1, 2, 3, 4, 5")
    assert table["imagefolder"][1:5] == [f"{data}: found train, test", "28", "1", "10"]


def test_a_folder_of_too_many_unreadable_images_is_not_usable(monkeypatch, capsys, tmp_path):
    data = digit_folder(tmp_path / "digits", per_class=10)
    for i in range(2):  # 2 of 102 train images: over the 1 % limit
        (data / "train/3" / f"broken-{i}.png").write_bytes(b"not a png")
    code, out, _ = run_cli(monkeypatch, capsys, "datasets", "--data-dir", str(data))
    found, detail = rows(out)["imagefolder"][:2]
    assert code in (0, None) and found == "no"
    assert detail.startswith(f"2 of 102 images in {data}/train could not be read (over 1 %)")
    (data / "train/3/broken-1.png").unlink()  # 1 of 101: usable, and the detail says so
    code, out, _ = run_cli(monkeypatch, capsys, "datasets", "--data-dir", str(data))
    found, detail = rows(out)["imagefolder"][:2]
    assert found == "yes"
    assert detail.startswith(f"{data}: found train, test; 1 unreadable image(s) in train")
