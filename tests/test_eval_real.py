"""Slow checks of the evaluation protocols on real data (run with ``-m slow``).

Fashion-MNIST (lossless, Debian's ``dataset-fashion-mnist``): the pixels reference through
``mae-bench eval``, k-NN and the fast linear probe on all 60k x 10k images, compared with the
known strength of raw pixels on this data set and with scikit-learn on the same features.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from mae_bench.cli import main

pytestmark = pytest.mark.slow

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def run_cli(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["mae-bench", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_pixels_reference_on_fashion_mnist(tmp_path, monkeypatch):
    common = ["--checkpoint", "pixels", "--dataset", "fashion-mnist", "--no-progress",
              "--results-dir", str(tmp_path / "res"), "--cache-dir", str(tmp_path / "cache")]
    assert run_cli(monkeypatch, "eval", "--protocol", "knn", "--k", "10,20", *common) == 0
    assert run_cli(monkeypatch, "eval", "--protocol", "fewshot", "--label-fraction", "0.05",
                   *common) == 0
    rows = [json.loads(line)
            for line in (tmp_path / "res" / "results.jsonl").read_text().splitlines()]
    value = {(r["protocol"], r["metric"], r.get("k")): r["value"] for r in rows}
    # Weighted cosine k-NN on raw Fashion-MNIST pixels: about 85 % (published k-NN baselines on
    # pixels are 84-86 %); mAP@R far below top-1, as for any pixel space.
    assert 83.0 < value[("knn", "top1", 20)] < 88.0
    assert value[("knn", "map@r", None)] < value[("knn", "top1", 20)]
    # A linear probe on 5 % of the labels (3,000 images) of raw pixels: about 80 %.
    assert 75.0 < value[("fewshot", "top1", None)] < 85.0
    assert np.isfinite([r["value"] for r in rows]).all()
