"""Slow: pretraining on the real CIFAR-10 copy (JPEG q75) through the CLI."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

CIFAR10_JPEG = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg75"


def test_pretrain_on_real_cifar10_then_visualize(tmp_path):
    assert CIFAR10_JPEG.is_dir(), f"the shared CIFAR-10 copy is missing: {CIFAR10_JPEG}"
    run = tmp_path / "run"
    env = {"MAE_BENCH_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "mae_bench", "pretrain", "--dataset", "cifar10", "--data-dir",
           str(CIFAR10_JPEG), "--arch", "vit_micro_patch4", "--batch-size", "64",
           "--max-steps", "5", "--log-every", "1", "--no-progress", "--out", str(run)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert "stopped at step 5/" in res.stdout
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    run_info = json.loads((run / "run.json").read_text())
    assert run_info["img_size"] == 32 and run_info["effective_batch"] == 64
    png = tmp_path / "grid.png"
    res = subprocess.run([sys.executable, "-m", "mae_bench", "visualize", "--checkpoint",
                          str(run), "--out", str(png), "--num-images", "2"],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert png.stat().st_size > 1000
