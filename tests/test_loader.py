"""Training batches: the sample order is a pure function of (seed, epoch), and streamed data sets
give one batch per view, each cropped to its view's size (resized in the workers or on the device,
by the pipeline)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mae_bench.data import ArrayDataset, StreamingDataset, get_dataset_info, load_dataset
from mae_bench.data.augment import ViewSpec, sample_transform
from mae_bench.data.crops import CropBatch, EncodedView
from mae_bench.data.loader import TrainBatches, epoch_order
from mae_bench.data.pipeline import PIPELINES

GLOBAL, LOCAL = ViewSpec(8), ViewSpec(4, scale=(0.05, 0.4))


@pytest.fixture(autouse=True)
def _no_user_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keeps every test away from the real ~/.cache and $MAE_BENCH_* folders."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MAE_BENCH_DATA", raising=False)
    monkeypatch.setenv("MAE_BENCH_CACHE", str(tmp_path / "cache"))


def _streamed(root: Path, n: int = 12) -> tuple[StreamingDataset, list[int]]:
    """An image folder of ``n`` PNGs of mixed sizes, streamed. Channel 0 of image i is the
    constant 20 i + 3, so any crop of it names its image; channels 1-2 are noise, so crops differ.

    Returns:
        The data set and, per index, its image's channel-0 value.
    """
    rng = np.random.default_rng(0)
    for i in range(n):
        array = rng.integers(0, 256, (10 + i % 3, 12, 3), np.uint8)
        array[..., 0] = 20 * i + 3
        path = root / "train" / f"c{i % 2}" / f"{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)
    ds = load_dataset("imagefolder", "train", root, max_in_memory_bytes=100)
    assert isinstance(ds, StreamingDataset)
    return ds, [int(ds[j][0][0, 0, 0]) for j in range(len(ds))]


def _epoch(batches: TrainBatches, epoch: int, start: int = 0) -> list:
    """One epoch's batches, the views as uint8 [B, C, s, s] (resized here when the pipeline
    leaves the resize to the device)."""
    specs = batches.views if isinstance(batches.views, list) else [batches.views]
    out = []
    for views, labels in batches.epoch(epoch, start):
        if isinstance(views, list):
            views = [v.resize(s.img_size, s.interpolation)
                     if isinstance(v, CropBatch | EncodedView) else v
                     for v, s in zip(views, specs, strict=True)]
        out.append((views, labels))
    return out


@pytest.mark.multiprocess
@pytest.mark.parametrize("pipeline", PIPELINES)
def test_streamed_views_give_one_batch_per_view_in_the_seeded_order(tmp_path: Path,
                                                                    pipeline: str) -> None:
    ds, value = _streamed(tmp_path)
    batches = TrainBatches(ds, 4, 3, seed=5, num_workers=2, views=[GLOBAL, GLOBAL, LOCAL],
                           pipeline=pipeline)
    first = _epoch(batches, 0)
    order = epoch_order(len(ds), 5, 0)
    assert len(first) == 3
    for b, (views, labels) in enumerate(first):
        assert isinstance(views, list) and len(views) == 3
        assert [tuple(v.shape) for v in views] == [(4, 3, 8, 8), (4, 3, 8, 8), (4, 3, 4, 4)]
        assert all(v.dtype == torch.uint8 for v in views)
        idx = order[4 * b:4 * b + 4]
        assert torch.equal(labels, ds.labels[idx])
        want = torch.tensor([value[i] for i in idx.tolist()], dtype=torch.uint8)  # [4]
        for v in views:  # every view of a sample is a crop of that sample
            assert torch.equal(v[:, 0], want.view(4, 1, 1).expand(4, *v.shape[2:]))
        assert not torch.equal(views[0], views[1])  # two independent crops of each image
    # with workers, the crops are a function of (seed, epoch) too
    again = _epoch(batches, 0)
    for (a, la), (b, lb) in zip(first, again, strict=True):
        assert torch.equal(la, lb) and all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    other = _epoch(TrainBatches(ds, 4, 3, seed=5, views=[GLOBAL, LOCAL], pipeline=pipeline), 1)
    assert [b[1].tolist() for b in other] != [b[1].tolist() for b in first]  # no workers
    # crops drawn per sample: the same with or without workers
    alone = _epoch(TrainBatches(ds, 4, 3, seed=5, views=[GLOBAL, GLOBAL, LOCAL],
                                pipeline=pipeline), 0)
    for (a, _), (b, _) in zip(first, alone, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_resuming_mid_epoch_continues_with_the_same_samples(tmp_path: Path, pipeline: str) -> None:
    ds, value = _streamed(tmp_path)
    batches = TrainBatches(ds, 4, 3, seed=1, views=[GLOBAL, LOCAL], pipeline=pipeline)

    def names(run: list) -> list[list[int]]:
        return [views[1][:, 0, 0, 0].tolist() for views, _ in run]

    whole = _epoch(batches, 2)
    resumed = _epoch(batches, 2, start=1)
    assert names(resumed) == names(whole)[1:]
    # and with the very same crops (drawn per sample)
    for (a, _), (b, _) in zip(resumed, whole[1:], strict=True):
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert sorted(sum(names(whole), [])) == sorted(value)  # 12 images, 3 batches of 4: each once


def test_one_spec_gives_one_tensor_and_view_still_works(tmp_path: Path) -> None:
    ds, _ = _streamed(tmp_path, n=8)
    # one at a time: TrainBatches sets the (shared) data set's transform
    for spec, batches in ((GLOBAL, lambda: TrainBatches(ds, 4, 2, seed=0, views=GLOBAL)),
                          (LOCAL, lambda: TrainBatches(ds, 4, 2, seed=0, view=LOCAL))):
        images, labels = next(batches().epoch(0))
        assert isinstance(images, torch.Tensor) and images.dtype == torch.uint8
        assert images.shape == (4, 3, spec.img_size, spec.img_size)
    with pytest.raises(TypeError, match="give views or view, not both"):
        TrainBatches(ds, 4, 2, seed=0, views=GLOBAL, view=GLOBAL)


def test_in_memory_batches_are_the_stored_images_whatever_the_views() -> None:
    images = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8)
    ds = ArrayDataset(images, torch.arange(40) % 3, ["a", "b", "c"], get_dataset_info("digits"))
    batches = TrainBatches(ds, 16, 2, seed=3, views=[GLOBAL, LOCAL])
    order = epoch_order(len(ds), 3, 0)
    for b, (images, labels) in enumerate(batches.epoch(0)):
        idx = order[16 * b:16 * b + 16]
        assert torch.equal(images, ds.images[idx]) and torch.equal(labels, ds.labels[idx])


def test_multi_view_transform_survives_pickling() -> None:
    """Spawn-based DataLoader workers receive the transform pickled."""
    transform = pickle.loads(pickle.dumps(sample_transform([GLOBAL, LOCAL])))
    crops = transform(torch.randint(0, 256, (3, 10, 12), dtype=torch.uint8))
    assert isinstance(crops, tuple)
    assert [tuple(c.shape) for c in crops] == [(3, 8, 8), (3, 4, 4)]


def test_epoch_order_splits_one_permutation_between_ranks_like_distributed_sampler() -> None:
    # One process: the plain seeded permutation, so runs and checkpoints from before the
    # DistributedSampler keep their order (exact resume across versions).
    perm = torch.randperm(101, generator=torch.Generator().manual_seed(7 * 100_003 + 3))
    assert torch.equal(epoch_order(101, 7, 3), perm)
    # Three processes: rank r takes every third index of the same permutation from r on, the
    # 2 left over are dropped; together they cover the rest exactly once.
    parts = [epoch_order(101, 7, 3, rank, 3) for rank in range(3)]
    for rank, part in enumerate(parts):
        assert torch.equal(part, perm[rank:99:3])
    assert sorted(torch.cat(parts).tolist()) == sorted(perm[:99].tolist())
    # set_epoch: another epoch is another permutation.
    assert not torch.equal(epoch_order(101, 7, 4), perm)
