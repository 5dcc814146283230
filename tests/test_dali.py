"""The ``dali`` pipeline (mae_bench/data/dali.py): NVIDIA DALI decodes each view's box and resizes
it, on the CPU here (``device_id=None``: no GPU needed); the boxes and flips are the workers'
torchvision draws, so the views match the ``device-decode`` path within interpolation tolerance.
What DALI refuses goes the ``device-decode`` way; without DALI, one line says how to install it."""

from __future__ import annotations

import io
import logging
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mae_bench.config import RunConfig
from mae_bench.data import sample_photos
from mae_bench.data.augment import ViewSpec
from mae_bench.data.pipeline import ReadBoxes, collate_encoded, worker_transform
from mae_bench.errors import DataError
from mae_bench.methods.engine import pretrain

try:
    import nvidia.dali  # noqa: F401

    HAVE_DALI = True
except ImportError:
    HAVE_DALI = False
# The [test] extra installs DALI on Linux x86_64 (CI's platform); elsewhere it has no wheels.
needs_dali = pytest.mark.skipif(not HAVE_DALI, reason="NVIDIA DALI has no wheel for this platform")

SPECS = [ViewSpec(24), ViewSpec(16, scale=(0.05, 0.4), interpolation="bilinear")]


def _jpegs(n: int = 12) -> list[bytes]:
    """Photographs of ImageNet sizes (sample_photos draws them from scikit-learn's two)."""
    photos, rng = sample_photos._photos(), np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        sample_photos._draw_image(photos, rng).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _views(data: list[bytes], decoder: str, specs=SPECS) -> list[torch.Tensor]:
    transform = ReadBoxes(specs)
    transform.epoch_seed = 3
    views, _ = collate_encoded([(transform(d, f"img{i}", i), i) for i, d in enumerate(data)],
                               decoder=decoder)
    return [v.to("cpu").resize(s.img_size, s.interpolation)
            for v, s in zip(views, specs, strict=True)]


@needs_dali
def test_dali_views_are_the_device_decode_views_within_interpolation_tolerance() -> None:
    """The same boxes and flips; DALI's antialiased cubic / linear resize against torchvision's:
    a tenth of a level on average, far below what the two kernels differ by (bicubic against
    bilinear of the same crop), and a view flipped the wrong way would be far off."""
    data = _jpegs()
    dali_views, reference = _views(data, "dali"), _views(data, "torchvision")
    other_kernel = _views(data, "torchvision", [ViewSpec(24, interpolation="bilinear"),
                                                 ViewSpec(16, scale=(0.05, 0.4))])
    for got, want, other in zip(dali_views, reference, other_kernel, strict=True):
        assert got.shape == want.shape and got.dtype == torch.uint8
        diff = float((got.float() - want.float()).abs().mean())
        assert diff < 0.4, diff
        assert diff < float((other.float() - want.float()).abs().mean()) / 2
        assert float((got.flip(-1).float() - want.float()).abs().mean()) > 10 * diff


@needs_dali
def test_what_dali_refuses_is_decoded_the_device_decode_way(caplog) -> None:
    data = _jpegs(6)
    broken = [*data[:3], data[3][: len(data[3]) // 3], *data[4:]]  # the header reads
    with caplog.at_level(logging.WARNING, logger="mae_bench.data"):
        got = _views(broken, "dali")
    assert "DALI could not decode a file of this batch" in caplog.text
    want = _views(broken, "torchvision")  # the broken file replaced by a readable one
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    png = io.BytesIO()
    Image.open(io.BytesIO(data[0])).save(png, format="PNG")  # decoded in the worker
    mixed = [png.getvalue(), *data[1:]]
    got, want = _views(mixed, "dali"), _views(mixed, "torchvision")
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_without_dali_the_pipeline_is_a_one_line_error(monkeypatch, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import fails as if not installed
    with pytest.raises(DataError) as e:
        worker_transform(SPECS, "dali")
    message = str(e.value)
    assert "\n" not in message and "pip install 'mae-bench[dali]'" in message
    assert message.startswith("--pipeline dali needs NVIDIA DALI, which is not installed: ")
    # pretraining stops before it writes anything into the run folder
    for i, data in enumerate(_jpegs(4)):
        (tmp_path / "data" / "train" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / "train" / f"c{i % 2}" / f"{i}.jpg").write_bytes(data)
    cfg = RunConfig().replace(
        model={"arch": "vit_micro_patch4", "img_size": 16},
        data={"dataset": "imagefolder", "data_dir": str(tmp_path / "data"), "num_workers": 0,
              "stream": True, "pipeline": "dali"},
        train={"epochs": 1, "batch_size": 2})
    with pytest.raises(DataError, match="needs NVIDIA DALI"):
        pretrain(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "config.yaml").exists()
