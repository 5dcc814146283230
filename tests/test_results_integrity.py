"""Results that never mislead (issue 21): one trainer per run folder; stores and run folders that
cannot be written refused before any work; numbers shown before they are written; filters and
exports that treat numbers as numbers; rows that say what made them; resume bookkeeping."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cli_helpers import run_cli

from mae_bench.config import RunConfig
from mae_bench.errors import ConfigError
from mae_bench.methods.engine import pretrain

MICRO = RunConfig().replace(model={"arch": "vit_micro_patch2"},
                            train={"batch_size": 8, "epochs": 1, "device": "cpu"})


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_a_second_trainer_is_refused_naming_the_holder_and_nothing_changes(tmp_path):
    from mae_bench.files import LOCK_FILE, FolderLock

    run = tmp_path / "run"
    pretrain(MICRO, run, max_steps=1, progress=False)
    assert not (run / LOCK_FILE).exists()  # released at the end of the run
    holder = FolderLock(run)
    holder.claim()  # another trainer, as far as the folder can tell
    before = _listing(run)
    try:
        with pytest.raises(ConfigError, match=rf"--out {run} is in use: process {os.getpid()} "
                                              "is training in it"):
            pretrain(MICRO, run, max_steps=2, progress=False)
        with pytest.raises(ConfigError, match="is in use"):  # a new folder's first run too
            FolderLock(run).claim()
    finally:
        holder.release()
    assert _listing(run) == {k: v for k, v in before.items() if not k.endswith(LOCK_FILE)}
    assert pretrain(MICRO, run, max_steps=2, progress=False).step == 2  # free again


def test_the_lock_is_released_when_training_fails(tmp_path):
    from mae_bench.files import FolderLock

    run = tmp_path / "run"
    bad = MICRO.replace(train={"lr": 1e30, "precision": "fp32"})  # a non-finite loss
    with pytest.raises(Exception, match="non-finite"):
        pretrain(bad, run, max_steps=4, progress=False)
    FolderLock(run).claim()  # nobody holds it


def test_cli_second_pretrain_is_one_line_exit_2(monkeypatch, capsys, tmp_path):
    from mae_bench.files import FolderLock

    run = tmp_path / "run"
    holder = FolderLock(run)
    holder.claim()
    try:
        code, _, err = run_cli(monkeypatch, capsys, "pretrain", "--arch", "vit_micro_patch2",
                               "--batch-size", "8", "--max-steps", "1", "--out", str(run),
                               "--no-progress")
    finally:
        holder.release()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "is in use: process" in lines[0], err


def test_an_unwritable_out_or_store_is_refused_before_any_work(monkeypatch, capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    code, _, err = run_cli(monkeypatch, capsys, "pretrain", "--arch", "vit_micro_patch2",
                           "--batch-size", "8", "--max-steps", "1",
                           "--out", str(blocker / "run"), "--no-progress")
    assert code == 2 and err.strip().startswith("error: --out") and "cannot write" in err, err
    code, out, err = run_cli(monkeypatch, capsys, "eval", "--protocol", "knn", "--checkpoint",
                             "pixels", "--results-dir", str(blocker / "res"), "--no-progress")
    assert code == 2 and "cannot write the results store" in err and "Traceback" not in err
    assert err.count("\n") == 1 and out == ""  # refused before the features were computed
    assert blocker.read_text() == "not a folder\n"


def test_eval_prints_its_numbers_before_a_failing_write(monkeypatch, capsys, tmp_path):
    import mae_bench.app.evaluation as evaluation

    def full_disk(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(evaluation, "append_rows", full_disk)
    code, out, err = run_cli(monkeypatch, capsys, "eval", "--protocol", "knn", "--checkpoint",
                             "pixels", "--k", "10", "--results-dir", str(tmp_path / "res"),
                             "--no-progress")
    assert code == 2 and "No space left on device" in err and "Traceback" not in err
    assert "top1" in out  # the table came first


def test_results_filters_compare_numbers_and_csv_exports_numbers(monkeypatch, capsys, tmp_path):
    import pandas as pd

    from mae_bench.results import append_rows, make_row

    store = tmp_path / "res"
    base = dict(method="mae", arch="vit_micro_patch2", dataset="digits", protocol="knn",
                metric="top1", run_id="r")
    append_rows(store, [make_row(value=v, k=20, seed=s, **base) for s, v in enumerate([60, 64])]
                + [make_row(value=50.0, k=10, seed=0, **base)])
    csv = tmp_path / "t.csv"
    code, out, _ = run_cli(monkeypatch, capsys, "results", "--results-dir", str(store),
                           "--where", "k=20", "--export", str(csv))
    assert code in (0, None) and "62.00 ± 2.83 (n=2)" in out and "50.00" not in out
    table = pd.read_csv(csv)
    assert len(table) == 1 and table["mean"].dtype.kind == "f"
    assert table["mean"].iloc[0] == 62.0 and table["n"].iloc[0] == 2
    assert table["ci95_low"].iloc[0] < 62.0 < table["ci95_high"].iloc[0]


def test_knn_k_above_the_training_set_is_worded_for_the_cli(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "eval", "--protocol", "knn", "--checkpoint",
                           "pixels", "--label-fraction", "0.01", "--k", "20", "--results-dir",
                           str(tmp_path / "res"), "--no-progress")
    assert code == 2 and "--k 20 is more neighbours than the" in err and "ks=" not in err, err


def test_resume_keeps_the_first_command_and_counts_throughput_over_the_whole_run(
        tmp_path, monkeypatch):
    import json
    import sys

    run = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["mae-bench", "pretrain", "--out", str(run)])
    pretrain(MICRO, run, max_steps=1, progress=False)
    monkeypatch.setattr(sys, "argv", ["mae-bench", "pretrain", "--resume", str(run)])
    result = pretrain(MICRO, run, max_steps=2, progress=False)
    info = json.loads((run / "run.json").read_text())
    assert info["command"] == f"mae-bench pretrain --out {run}"
    assert [s["command"] for s in info["segments"]] == [
        f"mae-bench pretrain --out {run}", f"mae-bench pretrain --resume {run}"]
    assert [s["start_step"] for s in info["segments"]] == [0, 1]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["images_per_second"] == pytest.approx(2 * 8 / summary["train_seconds"])
    assert result.images_per_second == summary["images_per_second"]
    assert "segment_images_per_second" in summary


def test_rows_of_two_image_folders_are_never_averaged_together(monkeypatch, capsys, tmp_path):
    import numpy as np
    from PIL import Image

    from mae_bench.results import aggregate, read_results

    rng = np.random.default_rng(0)
    for name in ("folder-a", "folder-b"):
        for split in ("train", "test"):
            for c in ("x", "y"):
                for i in range(12):
                    path = tmp_path / name / split / c / f"{i}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).save(path)
        code, _, err = run_cli(monkeypatch, capsys, "eval", "--protocol", "knn", "--checkpoint",
                               "pixels", "--k", "5", "--dataset", "imagefolder", "--data-dir",
                               str(tmp_path / name), "--results-dir", str(tmp_path / "res"),
                               "--cache-dir", str(tmp_path / "cache"), "--no-progress")
        assert code in (0, None), err
    rows = read_results(tmp_path / "res")
    top1 = rows[rows["metric"] == "top1"]
    assert set(top1["data_dir"]) == {str((tmp_path / n).resolve())
                                     for n in ("folder-a", "folder-b")}
    assert (aggregate(top1)["n"] == 1).all()  # two groups of one, not one "n=2"


def _folder(root: Path, size: int, gray: bool, per_class: int = 10) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for c in ("x", "y"):
            for i in range(per_class):
                path = root / split / c / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                shape = (size, size) if gray else (size, size, 3)
                Image.fromarray(rng.integers(0, 256, shape, np.uint8)).save(path)
    return root


def test_a_grayscale_folder_stays_one_channel_and_a_colour_one_three(tmp_path):
    from mae_bench.data import load_dataset

    gray = load_dataset("imagefolder", "test", _folder(tmp_path / "g", 12, gray=True),
                        cache_dir=tmp_path / "cache")
    colour = load_dataset("imagefolder", "train", _folder(tmp_path / "c", 12, gray=False),
                          cache_dir=tmp_path / "cache")
    assert gray.images.shape[1:] == (1, 12, 12) and gray.info.channels == 1
    assert len(gray.info.mean) == 1
    assert colour.images.shape[1:] == (3, 12, 12) and colour.info.channels == 3


def test_the_random_reference_is_built_for_the_folder_as_loaded(monkeypatch, capsys, tmp_path):
    import json

    data = _folder(tmp_path / "g", 12, gray=True)
    res = tmp_path / "res"
    code, _, err = run_cli(monkeypatch, capsys, "eval", "--protocol", "knn", "--checkpoint",
                           "random", "--arch", "vit_micro_patch2", "--k", "5", "--dataset",
                           "imagefolder", "--data-dir", str(data), "--results-dir", str(res),
                           "--cache-dir", str(tmp_path / "cache"), "--no-progress")
    assert code in (0, None), err
    rows = [json.loads(line) for line in (res / "results.jsonl").read_text().splitlines()]
    assert rows and all(r["arch"] == "vit_micro_patch2" for r in rows)
    # 12-px, 1-channel inputs: 36 patches of 2 px (the registry's default would be 224 px RGB)
    from mae_bench.app.evaluation import EvalSpec, load_inputs

    inputs = load_inputs(EvalSpec(protocol="knn", checkpoint="random", arch="vit_micro_patch2",
                                  dataset="imagefolder", data_dir=str(data),
                                  cache_dir=str(tmp_path / "cache")))
    assert (inputs.source.img_size, inputs.source.channels) == (12, 1)
    sized = load_inputs(EvalSpec(protocol="knn", checkpoint="random", arch="vit_micro_patch2",
                                 dataset="imagefolder", data_dir=str(data), img_size=16,
                                 cache_dir=str(tmp_path / "cache")))
    assert sized.source.img_size == 16


def test_datasets_shows_what_it_found_in_a_folder(monkeypatch, capsys, tmp_path):
    data = _folder(tmp_path / "g", 12, gray=True)
    monkeypatch.setenv("MAE_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "250")
    code, out, _ = run_cli(monkeypatch, capsys, "datasets", "--data-dir", str(data))
    line = next(ln for ln in out.splitlines()
                if [c.strip() for c in ln.split("│")[1:2]] == ["imagefolder"])
    cells = [c.strip() for c in line.split("│")]
    assert code in (0, None) and cells[4:7] == ["12", "1", "2"], line


def test_a_one_class_folder_is_flagged(monkeypatch, capsys, tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(2)
    for split in ("train", "test"):
        for i in range(8):
            path = tmp_path / "one" / split / "only" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).save(path)
    code, out, err = run_cli(monkeypatch, capsys, "eval", "--protocol", "knn", "--checkpoint",
                             "pixels", "--k", "5", "--dataset", "imagefolder", "--data-dir",
                             str(tmp_path / "one"), "--results-dir", str(tmp_path / "res"),
                             "--cache-dir", str(tmp_path / "cache"), "--no-progress")
    assert code in (0, None) and "warning: the training set has 1 class" in out + err


def test_a_torn_line_is_one_warning_line_in_the_cli(monkeypatch, capsys, tmp_path):
    from mae_bench.results import append_rows, make_row

    store = tmp_path / "res"
    append_rows(store, [make_row(value=50.0, run_id="r", method="mae", arch="a", dataset="d",
                                 protocol="knn", metric="top1")])
    with open(store / "results.jsonl", "a") as fh:
        fh.write('{"run_id": "r", "meth')  # a crash mid-write
    code, out, err = run_cli(monkeypatch, capsys, "results", "--results-dir", str(store))
    assert code in (0, None) and "50.00" in out
    assert "warning: skipped 1 unreadable line(s)" in err
    assert "UserWarning" not in err and ".py:" not in err


def test_report_axes_do_not_make_cliffs_and_list_every_command(tmp_path):
    from mae_bench.app.report import MIN_Y_SPAN, _y_range, build_report
    from mae_bench.results import append_rows, make_row

    low, high = _y_range([70.0, 70.15], [[0.0, 0.0], [0.0, 0.0]], bars=False)
    assert high - low >= MIN_Y_SPAN and low < 70.0 and high > 70.15
    assert _y_range([99.0], [[0.5], [2.0]], bars=False)[1] == 100.0  # never above 100 %
    assert _y_range([40.0], [[1.0], [1.0]], bars=True)[0] == 0.0
    store = tmp_path / "res"
    append_rows(store, [make_row(value=50.0, run_id="r", method="mae", arch="a", dataset="d",
                                 protocol="knn", metric="top1",
                                 command="mae-bench eval --protocol knn --checkpoint runs/r",
                                 pretrain_command="mae-bench pretrain --out runs/r")])
    md = build_report(store, tmp_path / "report").markdown.read_text()
    assert "mae-bench pretrain --out runs/r" in md
    assert "mae-bench eval --protocol knn --checkpoint runs/r" in md


def test_rows_name_the_weights_and_a_resized_input(monkeypatch, capsys, tmp_path):
    import json

    run = tmp_path / "run"
    pretrain(MICRO, run, max_steps=1, progress=False)
    data = _folder(tmp_path / "g", 12, gray=True)
    res = tmp_path / "res"
    base = ["eval", "--protocol", "knn", "--k", "5", "--results-dir", str(res),
            "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    assert run_cli(monkeypatch, capsys, *base, "--checkpoint", str(run))[0] in (0, None)
    assert run_cli(monkeypatch, capsys, *base, "--checkpoint", "random", "--arch",
                   "vit_micro_patch2", "--dataset", "imagefolder", "--data-dir", str(data),
                   "--img-size", "16")[0] in (0, None)
    rows = [json.loads(line) for line in (res / "results.jsonl").read_text().splitlines()]
    of_run = [r for r in rows if r["method"] == "mae"]
    of_random = [r for r in rows if r["method"] == "random"]
    assert of_run and all(len(r["weights"]) == 12 and "img_size" not in r for r in of_run)
    assert of_random and all(r["img_size"] == 16 and "weights" not in r for r in of_random)


def test_two_recipes_at_one_seed_are_two_groups_not_a_mean():
    """Finding 1: two fine-tunes that differ only in their recipe (here Mixup) were averaged
    into "35.00 ± 8.20 (n=2)"; every knob is a field, so they stay apart."""
    from mae_bench.results import aggregate, make_row

    base = dict(run_id="r", method="mae", arch="a", dataset="d", protocol="finetune",
                metric="top1", seed=0, epochs=4, recipe="auto")
    rows = pd_frame([make_row(value=29.2, ft_mixup=0.8, **base),
                     make_row(value=40.8, ft_mixup=0.0, **base)])
    agg = aggregate(rows)
    assert sorted(agg["mean"]) == [29.2, 40.8] and (agg["n"] == 1).all()


def pd_frame(rows):
    import pandas as pd

    return pd.DataFrame.from_records(rows)
