"""The command line: one-line errors with exit code 2 and nothing written; the happy paths."""

import subprocess
import sys

import pytest
from cli_helpers import run_cli
from PIL import Image

TINY = ["--arch", "vit_micro_patch2", "--img-size", "8", "--batch-size", "64", "--no-progress"]




@pytest.mark.parametrize("args, message", [
    (["--dataset", "imagenet-1m"], "unknown dataset 'imagenet-1m'"),
    (["--arch", "vit_gigantic"], "vit_gigantic"),
    (["--method", "supervised"],
     "unknown method 'supervised'; valid methods: byol, dino, mae, mocov3, simclr"),
    (["--mask-ratio", "0.99"], "mask_ratio=0.99"),
    (["--mask-ratio", "1.5"], "--mask-ratio must be strictly between 0 and 1, got 1.5"),
    (["--img-size", "9"], "image size 9 is not divisible by the patch size 2"),
    (["--mask-strategy", "checkers"], "checkers"),
    (["--mask-strategy", "grid", "--mask-ratio", "0.6"], "0.6"),
    (["--precision", "fp16", "--device", "cpu"], "fp16 needs a CUDA device"),
    (["--precision", "int4"], "unknown precision 'int4'"),
    (["--epochs", "0"], "--epochs must be > 0, got 0"),
])
def test_pretrain_usage_errors(monkeypatch, capsys, tmp_path, args, message):
    out_dir = tmp_path / "run"
    code, _, err = run_cli(monkeypatch, capsys, "pretrain", *TINY, "--out", str(out_dir), *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0]
    assert "Traceback" not in err
    assert not out_dir.exists()  # nothing written


def test_missing_data_dir_is_named(monkeypatch, capsys, tmp_path):
    missing = tmp_path / "no-such-folder"
    code, _, err = run_cli(monkeypatch, capsys, "pretrain", "--dataset", "cifar10",
                           "--data-dir", str(missing), "--out", str(tmp_path / "run"))
    assert code == 2 and str(missing) in err and len(err.strip().splitlines()) == 1


def test_bad_config_file(monkeypatch, capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train: {epochz: 3}\n")
    code, _, err = run_cli(monkeypatch, capsys, "pretrain", "--config", str(cfg))
    assert code == 2 and "unknown key(s) epochz" in err


def test_visualize_missing_checkpoint(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "visualize", "--checkpoint",
                           str(tmp_path / "nothing"))
    assert code == 2 and "nothing does not exist" in err


def test_pretrain_resume_and_visualize(monkeypatch, capsys, tmp_path):
    run = tmp_path / "run"
    code, out, _ = run_cli(monkeypatch, capsys, "pretrain", *TINY, "--epochs", "2",
                           "--max-steps", "3", "--out", str(run))
    assert code in (0, None) and "stopped at step 3/44" in out
    # the same command again resumes automatically and finishes
    code, out, _ = run_cli(monkeypatch, capsys, "pretrain", *TINY, "--epochs", "2",
                           "--out", str(run))
    assert code in (0, None) and "finished" in out
    summary = (run / "summary.json").read_text()
    # once more: nothing left to do; the result and the run's record stay as they were
    code, out2, _ = run_cli(monkeypatch, capsys, "pretrain", *TINY, "--epochs", "2",
                            "--out", str(run))
    assert code in (0, None) and "finished" in out2
    assert out2.split("final loss ")[1][:6] == out.split("final loss ")[1][:6]
    assert (run / "summary.json").read_text() == summary
    png = tmp_path / "grid.png"
    code, out, _ = run_cli(monkeypatch, capsys, "visualize", "--checkpoint", str(run),
                           "--out", str(png), "--num-images", "3")
    assert code in (0, None) and png.stat().st_size > 1000
    with Image.open(png) as im:
        width, height = im.size
    assert width == 800 and height == 600  # 4 columns x 3 rows at 2 inches, 100 dpi


def test_datasets_lists_every_dataset(monkeypatch, capsys):
    from mae_bench.data import DATASETS

    code, out, _ = run_cli(monkeypatch, capsys, "datasets")
    assert code in (0, None)
    for name in DATASETS:
        assert name in out
    digits_row = next(line for line in out.splitlines() if "digits" in line)
    assert "yes" in digits_row


def test_python_dash_m_is_the_same_cli():
    res = subprocess.run([sys.executable, "-m", "mae_bench", "pretrain", "--help"],
                         capture_output=True, text=True, check=True)
    assert "--mask-ratio" in res.stdout and "--resume" in res.stdout
