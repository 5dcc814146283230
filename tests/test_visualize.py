"""Tests for mae_bench/app/visualize.py and ``mae-bench visualize``: a grid from the run's own
image folder, and a folder whose images the run cannot take refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run_cli
from PIL import Image

from mae_bench.config import RunConfig
from mae_bench.methods.engine import pretrain

pytestmark = pytest.mark.usefixtures("one_thread")
RNG = np.random.default_rng(0)


def image_folder(root: Path, channels: int, per_class: int = 4) -> Path:
    """train/ and test/ with two classes of 8-px images: grayscale (1) or RGB (3)."""
    shape = (8, 8) if channels == 1 else (8, 8, 3)
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = RNG.integers(0, 256, shape, dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


@pytest.fixture(scope="module", autouse=True)
def own_cache(tmp_path_factory):
    """Decoded image folders go to this module's own cache, not the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MAE_BENCH_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def gray_run(tmp_path_factory, own_cache) -> Path:
    """An MAE run pretrained on a folder of grayscale images: a 1-channel encoder."""
    base = tmp_path_factory.mktemp("vis")
    data = image_folder(base / "gray", channels=1)
    cfg = RunConfig().replace(model={"arch": "vit_micro_patch2", "img_size": 8},
                              data={"dataset": "imagefolder", "data_dir": str(data)},
                              train={"epochs": 1, "batch_size": 8})
    pretrain(cfg, base / "run", max_steps=1, progress=False)
    return base / "run"


def test_a_grid_from_the_runs_own_folder(monkeypatch, capsys, tmp_path, gray_run):
    png = tmp_path / "grid.png"
    code, out, err = run_cli(monkeypatch, capsys, "visualize", "--checkpoint", str(gray_run),
                             "--out", str(png), "--num-images", "2")
    assert code in (0, None), err
    assert out.strip() == f"wrote {png}"
    with Image.open(png) as im:
        assert im.size == (800, 400)  # 4 columns x 2 rows at 2 inches, 100 dpi


def test_a_folder_of_other_channels_is_one_line(monkeypatch, capsys, tmp_path, gray_run):
    """A 1-channel run drawing from RGB images: one line and exit 2, as eval, no traceback."""
    rgb = image_folder(tmp_path / "rgb", channels=3)
    png = tmp_path / "grid.png"
    code, out, err = run_cli(monkeypatch, capsys, "visualize", "--checkpoint", str(gray_run),
                             "--data-dir", str(rgb), "--out", str(png))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and out == "" and not png.exists()
    assert lines == [f"error: {gray_run} takes 1-channel images but imagefolder in {rgb} has 3; "
                     "draw from 1-channel images (--data-dir)"]
