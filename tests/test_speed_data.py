"""``mae-bench speed --data-only`` (mae_bench/app/speed_data.py) and the folder of ImageNet-sized
JPEGs it measures by default (mae_bench/data/sample_photos.py). No assertion on any timing (this
machine is shared): the numbers must agree with each other and count what was asked."""

from __future__ import annotations

import re
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run_cli
from PIL import Image

from mae_bench.app.speed_data import DataSpeedSpec, _children_cpu, run_data_speed
from mae_bench.data import load_dataset
from mae_bench.data.sample_photos import (
    HEIGHT,
    STAMP,
    WIDTH,
    default_sample_dir,
    draw_size,
    make_jpeg_folder,
)
from mae_bench.errors import DataError


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """24 train JPEGs in 2 classes (and 2 test ones), shared by the benchmark tests."""
    return make_jpeg_folder(tmp_path_factory.mktemp("jpegs"), n_images=24, classes=2).root


def test_the_folder_is_deterministic_imagenet_sized_and_reused(tmp_path):
    a = make_jpeg_folder(tmp_path / "a", n_images=30, classes=3, seed=1)
    b = make_jpeg_folder(tmp_path / "b", n_images=30, classes=3, seed=1)
    assert (a.train_images, a.test_images, a.reused) == (30, 3, False)
    files = _files(a.root)
    assert files == _files(b.root) and len(files) == 33  # byte for byte, train and test
    assert sorted(p.name for p in (a.root / "test").iterdir()) == [
        "class_000", "class_001", "class_002"]
    sizes = []
    for path in (a.root / "train").rglob("*.jpg"):
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            sizes.append(im.size)
    assert all(WIDTH[0] <= w <= WIDTH[1] and HEIGHT[0] <= h <= HEIGHT[1] for w, h in sizes)
    assert any(w > h for w, h in sizes) and any(w < h for w, h in sizes)
    # a second call with the same parameters reuses the folder, untouched
    mtimes = {p: p.stat().st_mtime_ns for p in a.root.rglob("*")}
    again = make_jpeg_folder(a.root, n_images=30, classes=3, seed=1)
    assert again.reused and {p: p.stat().st_mtime_ns for p in a.root.rglob("*")} == mtimes
    # other parameters: redone, with other bytes; the stamp names them
    other = make_jpeg_folder(a.root, n_images=30, classes=3, seed=2)
    assert not other.reused and _files(a.root) != files
    assert '"seed": 2' in (a.root / STAMP).read_text()


def test_drawn_sizes_are_imagenet_like():
    rng = np.random.default_rng(0)
    sizes = [draw_size(rng) for _ in range(2000)]
    assert all(WIDTH[0] <= w <= WIDTH[1] and HEIGHT[0] <= h <= HEIGHT[1] for w, h in sizes)
    common = Counter(sizes).most_common(2)
    assert [s for s, _ in common] == [(500, 375), (375, 500)]  # 4:3 landscape, then portrait
    assert 0.3 < common[0][1] / len(sizes) < 0.5
    assert 0.6 < sum(max(s) == 500 for s in sizes) / len(sizes) < 0.85


def test_the_generator_never_writes_into_a_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("x")
    with pytest.raises(DataError, match="was not made by make_jpeg_folder"):
        make_jpeg_folder(tmp_path, n_images=2, classes=1)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_the_default_folder_lies_in_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MAE_BENCH_CACHE", str(tmp_path))
    assert default_sample_dir(1000) == tmp_path / "sample-jpegs" / "n1000"


def test_the_folder_streams_as_an_imagefolder(folder):
    dataset = load_dataset("imagefolder", "train", folder, max_in_memory_bytes=0)
    image, label = dataset[0]
    assert len(dataset) == 24 and dataset.classes == ["class_000", "class_001"]
    assert image.dtype == torch.uint8 and image.shape[0] == 3 and label == 0


def _ratio_line(markdown: str, where: str) -> tuple[float, float, float]:
    """(ours, torchvision, ratio) as the Markdown's ratio line prints them."""
    m = re.search(rf"^- data path, {re.escape(where)}: mae-bench ([\d,]+) img/s per [^,]+, "
                  r"torchvision ([\d,]+): (\d+\.\d\d)x$", markdown, re.M)
    assert m, markdown
    return float(m[1].replace(",", "")), float(m[2].replace(",", "")), float(m[3])


def test_in_process_numbers_agree_with_each_other(folder):
    spec = DataSpeedSpec(data_dir=folder, img_size=32, batch_size=4, images=8, warmup=1,
                         rounds=2, workers=(0,), device="cpu", command="mae-bench speed -x")
    out = run_data_speed(spec)
    (r,) = out.results
    assert r.workers == 0 and r.baseline is not None
    for s in (r.ours, r.baseline):
        assert s.images == 8 and len(s.rounds) == 2
        assert all(t.loader_images == 8 and t.worker_peak_mib is None for t in s.rounds)
        assert s.images_per_second > 0 and s.loader_cpu_per_image > 0 and s.spread is not None
        # on the CPU the whole path's cores count the device-side work too
        assert s.cores_per_1000 == pytest.approx(
            1000 * (s.loader_cpu_per_image + s.main_cpu_per_image))
        assert s.main_peak_mib is not None and s.main_peak_mib > 0
    assert r.ratio_per_core == pytest.approx(r.ours.images_per_core_second
                                             / r.baseline.images_per_core_second)
    assert r.ratio_whole == pytest.approx(r.baseline.cpu_per_image / r.ours.cpu_per_image)
    ours, base, ratio = _ratio_line(out.markdown, "in-process (0 workers)")
    assert ratio == pytest.approx(r.ratio_per_core, abs=0.006)
    assert ours == pytest.approx(r.ours.images_per_core_second, abs=0.5)
    assert base == pytest.approx(r.baseline.images_per_core_second, abs=0.5)
    assert "```\nmae-bench speed -x\n```" in out.markdown
    assert "Versions: torch " in out.markdown and "libjpeg-turbo: " in out.markdown
    assert "Image sizes: 24 of 24 images read: width " in out.markdown
    assert "| 0 | mae-bench |" in out.markdown and "| 0 | torchvision |" in out.markdown
    assert "whole path (loading + device-side work on the CPU)" in out.markdown


@pytest.mark.multiprocess
def test_worker_cpu_is_what_the_reaped_workers_burned():
    """getrusage(RUSAGE_CHILDREN) after the DataLoader's workers exit counts their CPU time."""

    class Burn(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 6

        def __getitem__(self, i: int) -> int:
            end = time.process_time() + 0.04  # 40 ms of this worker's CPU
            while time.process_time() < end:
                pass
            return i

    before = _children_cpu()
    assert len(list(torch.utils.data.DataLoader(Burn(), batch_size=2, num_workers=1))) == 3
    burned = _children_cpu() - before
    assert 0.24 <= burned < 0.24 + 1.5, burned


@pytest.mark.multiprocess
def test_with_workers_the_cpu_covers_every_image_they_decoded(folder):
    spec = DataSpeedSpec(data_dir=folder, img_size=32, batch_size=4, images=8, warmup=1,
                         rounds=1, workers=(1,), device="cpu")
    (r,) = run_data_speed(spec).results
    for s in (r.ours, r.baseline):
        (t,) = s.rounds
        assert t.loader_images == 12  # one warm-up batch and two timed ones
        assert t.loader_cpu_seconds > 0 and t.worker_peak_mib is not None


def test_without_an_image_folder_only_mae_bench_is_measured_and_it_says_so(folder, tmp_path):
    for split in ("train", "test"):  # the same images as archives: ours streams them
        with tarfile.open(tmp_path / f"{split}.tar", "w") as tar:
            for path in sorted((folder / split).rglob("*.jpg")):
                tar.add(path, arcname=str(path.relative_to(folder / split)))
    spec = DataSpeedSpec(data_dir=tmp_path, img_size=32, batch_size=4, images=4, rounds=1,
                         workers=(0,), device="cpu")
    out = run_data_speed(spec)
    (r,) = out.results
    assert r.baseline is None and r.ratio_per_core is None and r.ours.images == 4
    assert "- torchvision's path was not measured: " in out.markdown
    assert "give --baseline-dir DIR" in out.markdown and "x\n" not in out.markdown


def test_the_command_prints_the_ratio_and_writes_markdown(folder, tmp_path, monkeypatch,
                                                          capsys):
    code, out, err = run_cli(
        monkeypatch, capsys, "speed", "--data-only", "--data-dir", str(folder), "--img-size",
        "32", "--batch-size", "4", "--images", "4", "--workers", "0", "--rounds", "1",
        "--device", "cpu", "--markdown", str(tmp_path / "d.md"), "--no-progress")
    assert code == 0, err
    assert re.search(r"^data path, in-process \(0 workers\): .* \d+\.\d\dx$", out, re.M), out
    text = (tmp_path / "d.md").read_text()
    assert "mae-bench speed --data-only --data-dir" in text
    _ratio_line(text, "in-process (0 workers)")


@pytest.mark.parametrize("args, message", [
    (("--data-only", "--workers", "-1"), "error: --workers must be >= 0, got -1"),
    (("--data-only", "--workers", "1,x"), "error: --workers takes whole numbers"),
    (("--data-only", "--images", "0"), "error: --images must be >= 1, got 0"),
    (("--data-only", "--methods", "mae"), "error: --methods does not apply to --data-only"),
    (("--workers", "2"), "error: --workers is an option of --data-only"),
    (("--data-only", "--pipeline", "gpu"), "error: unknown --pipeline 'gpu'; valid: auto, "
     "device-resize, device-decode, workers"),
    (("--pipeline", "workers"), "error: --pipeline is an option of --data-only"),
    (("--data-only", "--dataset", "digits"), "error: --dataset digits is held in memory, not "
     "streamed"),
    (("--data-only", "--data-dir", "{tmp}/nothing"), "error: data dir {tmp}/nothing for "
     "imagefolder does not exist"),
    (("--data-only", "--data-dir", "{tmp}", "--baseline-dir", "{tmp}"),
     "error: --baseline-dir {tmp} has no train/ folder"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.setenv("MAE_BENCH_CACHE", str(tmp_path / "cache"))
    args = [a.format(tmp=tmp_path) for a in args]
    code, out, err = run_cli(monkeypatch, capsys, "speed", *args, "--img-size", "32",
                             "--no-progress")
    assert code == 2
    assert err.strip().startswith(message.format(tmp=tmp_path)), err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cache").exists()  # nothing generated
