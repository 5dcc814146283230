"""benchmarks/host_memory.py: arms in fresh processes, the setting in force where asked."""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.multiprocess]  # every check runs in a fresh interpreter

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "host_memory.py"


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "gnu_get_libc_version"),
                    reason="the setting exists on glibc only")
def test_each_mode_runs_in_its_own_process_and_the_report_says_so(tmp_path):
    md = tmp_path / "host.md"
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--arch", "vit_micro_patch4", "--batch-size", "4",
         "--tasks", "mae", "--precisions", "fp32", "--impls", "mae-bench", "--rounds", "1",
         "--warmup", "1", "--steps", "1", "--markdown", str(md)],
        capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = md.read_text()
    assert "retain in force: True" in text  # the child of the retain arm made the setting
    rows = [ln for ln in text.splitlines() if ln.startswith("| mae-bench | mae | fp32 |")]
    assert [r.split("|")[4].strip() for r in rows] == ["retain", "default"]
    assert all(float(r.split("|")[5]) > 0 for r in rows)


def test_an_unknown_implementation_is_a_one_line_error():
    out = subprocess.run([sys.executable, str(SCRIPT), "--impls", "timm"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: unknown task, precision or implementation ['timm']; valid: mae, simclr / fp32, "
        "bf16 / mae-bench, engine, lightly"]
