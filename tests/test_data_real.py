"""Slow checks of mae_bench/data.py on the real data of this machine (run with ``-m slow``).

- CIFAR-10 (JPEG q75, ImageFolder layout in tar.gz archives): /work/shared/data/cifar10-jpeg75,
  read-only; decoded into a temporary cache.
- Fashion-MNIST, Debian's copy of the original IDX files: ``apt-get install -y
  dataset-fashion-mnist`` puts them in /usr/share/datasets/fashion-mnist.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mae_bench import data
from mae_bench.data import ArrayDataset, default_data_dir, load_dataset

pytestmark = pytest.mark.slow

# ../shared beside the checkout, as in development and in CI
CIFAR10_JPEG = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg75"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def channel_means(images: torch.Tensor) -> np.ndarray:
    """Per-channel means in uint8 units, without a float copy of the whole tensor."""
    n, _, h, w = images.shape
    return (images.sum(dim=(0, 2, 3), dtype=torch.float64) / (n * h * w)).numpy()


def test_real_cifar10_jpeg_copy_decodes_then_hits_the_cache(tmp_path: Path, monkeypatch) -> None:
    before = sorted(p.name for p in CIFAR10_JPEG.iterdir())
    seconds, loaded = {}, {}
    for split, n, per_class in (("train", 50000, 5000), ("test", 10000, 1000)):
        start = time.perf_counter()
        ds = load_dataset("cifar10", split, CIFAR10_JPEG, cache_dir=tmp_path)
        seconds[split] = time.perf_counter() - start
        assert isinstance(ds, ArrayDataset) and ds.images.shape == (n, 3, 32, 32)
        assert ds.images.dtype == torch.uint8 and ds.images.is_contiguous()
        assert ds.labels.bincount(minlength=10).tolist() == [per_class] * 10
        assert ds.classes == list(data.CIFAR10_CLASSES) and ds.bad_images == 0
        loaded[split] = ds
    # the README's training-set channel means (125.3, 123.0, 113.9)
    assert np.allclose(channel_means(loaded["train"].images), [125.3, 123.0, 113.9], atol=0.5)
    assert seconds["train"] < 60, f"decoding 50k JPEGs took {seconds['train']:.1f} s"

    calls = [0]
    real = data.images._open_rgb

    def counting(blob: bytes, where: str):
        calls[0] += 1
        return real(blob, where)

    monkeypatch.setattr(data.images, "_open_rgb", counting)
    start = time.perf_counter()
    again = load_dataset("cifar10", "train", CIFAR10_JPEG, cache_dir=tmp_path)
    cached = time.perf_counter() - start
    assert calls[0] == 0 and torch.equal(again.images, loaded["train"].images)
    assert torch.equal(again.labels, loaded["train"].labels)
    assert sorted(p.name for p in CIFAR10_JPEG.iterdir()) == before  # read-only source untouched
    print(
        f"\nreal CIFAR-10 load: train {seconds['train']:.1f} s, test {seconds['test']:.1f} s "
        f"(decoding); train again {cached:.2f} s (cache)"
    )


def test_real_fashion_mnist_from_the_debian_package(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MAE_BENCH_DATA", str(tmp_path / "nothing-here"))
    assert default_data_dir("fashion-mnist") == FASHION_MNIST, (
        "needs the Debian package: apt-get install -y dataset-fashion-mnist"
    )
    train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.labels.bincount().tolist() == [6000] * 10
    assert test.labels.bincount().tolist() == [1000] * 10
    pixels = train.images.double() / 255
    assert abs(pixels.mean().item() - train.info.mean[0]) < 5e-4
    assert abs(pixels.std().item() - train.info.std[0]) < 5e-4
    assert train.classes[0] == "T-shirt/top"
