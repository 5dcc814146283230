"""Tests for mae_bench/app/visualize.py and ``mae-bench visualize``: a grid from the run's own
image folder, and a folder whose images the run cannot take refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
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


# --- MAE's masked siblings: their masks, SimMIM's reconstructions ------------------------------


def _sibling_run(base: Path, method: str) -> Path:
    data = image_folder(base / f"rgb-{method}", channels=3)
    cfg = RunConfig().replace(model={"arch": "vit_micro_patch2", "img_size": 8},
                              data={"dataset": "imagefolder", "data_dir": str(data)},
                              train={"method": method, "epochs": 1, "batch_size": 8},
                              ssl={"proj_hidden_dim": 32, "proj_dim": 16, "out_dim": 24})
    pretrain(cfg, base / method, max_steps=1, progress=False)
    return base / method


@pytest.mark.parametrize(("method", "name", "columns"), [
    ("simmim", "reconstructions.png", 5), ("ijepa", "masks.png", 3), ("ibot", "masks.png", 3),
    ("data2vec2", "masks.png", 3)])
def test_a_siblings_grid_shows_its_training_mask(monkeypatch, capsys, tmp_path, method, name,
                                                  columns):
    """The grid's mask is the one a training step draws (``display_mask``); SimMIM, which
    predicts pixels, adds its reconstruction; the default file name says which."""
    run = _sibling_run(tmp_path, method)
    code, out, err = run_cli(monkeypatch, capsys, "visualize", "--checkpoint", str(run),
                             "--num-images", "2")
    assert code in (0, None), err
    assert "".join(out.split()) == f"wrote{run / name}"  # rich may wrap the long path
    with Image.open(run / name) as im:
        assert im.size == (200 * columns, 400)  # 2 inches a column and a row, 100 dpi


def test_mask_ratio_for_a_sibling_without_one_and_a_run_without_masks_are_one_line(
        monkeypatch, capsys, tmp_path):
    ijepa = _sibling_run(tmp_path, "ijepa")
    code, out, err = run_cli(monkeypatch, capsys, "visualize", "--checkpoint", str(ijepa),
                             "--mask-ratio", "0.5")
    assert code == 2 and " ".join(err.split()) == (
        "error: --mask-ratio: a 'ijepa' run has no mask ratio (its masks are blocks of its own "
        "knobs); leave it out")
    simclr = _sibling_run(tmp_path, "simclr")
    code, out, err = run_cli(monkeypatch, capsys, "visualize", "--checkpoint", str(simclr))
    assert code == 2 and " ".join(err.split()) == (
        f"error: {simclr} holds a 'simclr' run, which draws no mask; visualize needs a run of a "
        "masked method (mae, simmim, ijepa, ibot, data2vec2)")
    assert not list(simclr.glob("*.png")) and not list(ijepa.glob("*.png"))


def test_a_simmim_grid_at_another_mask_ratio_masks_that_share(tmp_path):
    from mae_bench.app.visualize import load_masked_run, with_mask_ratio

    run = _sibling_run(tmp_path, "simmim")
    cfg, method = load_masked_run(run)
    other = with_mask_ratio(cfg, method, 0.25, 3)
    assert all(torch.equal(a, b) for a, b in zip(method.state_dict().values(),
                                                  other.state_dict().values(), strict=True))
    imgs = torch.zeros(3, 3, 8, 8)
    shares = [float((m.display_mask(imgs, torch.Generator().manual_seed(0)) == 1).float().mean())
              for m in (method, other)]
    assert shares[0] > shares[1] > 0
