"""Batches for training: uint8 images in a seeded order that depends only on (seed, epoch).

Because the order is a pure function of the seed and the epoch, a run resumed mid-epoch skips
exactly the batches it already saw and continues with the same ones as an uninterrupted run.

- In-memory data sets (``ArrayDataset``): a batch is one index-select from the uint8 tensor; the
  crop / flip / normalisation then run batched on the training device (``mae_bench.data.augment``).
- Streamed data sets (``StreamingDataset``): a DataLoader with worker processes reads each file
  and does the part of the view that ``pipeline`` gives the workers (``mae_bench.data.pipeline``:
  by default decode and cut the crop boxes); the rest (the resize, the photometric ops,
  normalisation) runs on the device (``augment.BatchViews.finish``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from mae_bench.data import ArrayDataset, StreamingDataset
from mae_bench.data.augment import ViewSpec, sample_transform
from mae_bench.data.pipeline import worker_transform


def epoch_order(n: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> Tensor:
    """The sample order of one epoch for one process, from torch's ``DistributedSampler``.

    The sampler is seeded with ``seed * 100_003`` and ``set_epoch(epoch)``: every process draws
    the same permutation of the data and takes every ``world_size``-th index from its rank on,
    dropping the tail that does not divide evenly (``drop_last``). In one process this is the
    plain seeded permutation. Materialising the order (rather than iterating the sampler inside
    a DataLoader) is what lets a resumed run skip exactly the batches it already saw.

    Returns:
        [n // world_size] int64 indices.
    """
    sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True,
                                 seed=seed * 100_003, drop_last=True)
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler), dtype=torch.int64)


class _ListSampler(Sampler[int]):
    def __init__(self, indices: Tensor):
        self.indices = indices.tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class TrainBatches:
    """Yields (images, labels [B]) for one epoch from a micro-batch offset.

    What ``images`` is depends on the data set and on ``views``:

    - in-memory data set: uint8 [B, C, H, W], the stored images (``views`` is not used here: the
      crops run batched on the device, ``BatchViews(spec)(images)`` per view);
    - streamed data set, ``views`` one ViewSpec: uint8 [B, C, s, s], cropped in the workers
      (the ``workers`` pipeline only; kept for older callers);
    - streamed data set, ``views`` a list of ViewSpecs: a list with one batch per spec, each
      view cropped independently to its own size (e.g. DINO's smaller local crops): uint8
      [B, C, s_i, s_i] (``workers`` pipeline) or the crops still to resize on the device
      (``crops.CropBatch`` / ``crops.EncodedView``); finish view i on the device with
      ``BatchViews(views[i]).finish``;
    - streamed data set, ``views`` None: uint8 [B, C, H, W] as decoded (same-size images only).

    Args:
        dataset: an in-memory or streamed data set.
        batch_size: images per micro-batch (per process).
        micro_per_epoch: micro-batches per epoch (the remainder of the data is dropped).
        seed: the run's seed.
        num_workers: DataLoader workers (streamed data sets only).
        views: the crop spec(s), applied in the workers for streamed data sets.
        pin_memory: pin host memory (when training on CUDA).
        rank: this process's rank.
        world_size: the number of processes.
        view: the former name of ``views`` (one spec); give one of the two.
        pipeline: how streamed views are split between the workers and the device
            (``mae_bench.data.pipeline.PIPELINES``; the default gives finished uint8 views, as
            before the split existed).
    """

    def __init__(self, dataset: ArrayDataset | StreamingDataset, batch_size: int,
                 micro_per_epoch: int, seed: int, num_workers: int = 0,
                 views: ViewSpec | list[ViewSpec] | None = None, pin_memory: bool = False,
                 rank: int = 0, world_size: int = 1, *, view: ViewSpec | None = None,
                 pipeline: str = "workers"):
        if view is not None:
            if views is not None:
                raise TypeError("TrainBatches: give views or view, not both")
            views = view
        self.dataset = dataset
        self.batch_size = batch_size
        self.micro_per_epoch = micro_per_epoch
        self.seed = seed
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.rank = rank
        self.world_size = world_size
        self.views = views
        self.streaming = isinstance(dataset, StreamingDataset)
        self.collate = None
        if self.streaming and isinstance(views, ViewSpec):
            dataset.set_transform(sample_transform(views))
        elif self.streaming and views is not None:
            transform, self.collate = worker_transform(views, pipeline)
            dataset.set_transform(transform)

    def epoch(self, epoch: int,
              start: int = 0) -> Iterator[tuple[Tensor | list[Tensor], Tensor]]:
        # a data set with its own order (tar shards: shard order plus a shuffle buffer) gives it
        custom = getattr(self.dataset, "epoch_order", None)
        order = (custom(self.seed, epoch, self.rank, self.world_size) if custom is not None
                 else epoch_order(len(self.dataset), self.seed, epoch, self.rank, self.world_size))
        order = order[start * self.batch_size:self.micro_per_epoch * self.batch_size]
        if not self.streaming:
            images, labels = self.dataset.images, self.dataset.labels
            for idx in order.split(self.batch_size):
                yield images.index_select(0, idx), labels.index_select(0, idx)
            return
        if hasattr(self.dataset.transform, "epoch_seed"):  # per-sample crop draws (pipeline.py)
            self.dataset.transform.epoch_seed = self.seed * 100_003 + epoch
        loader = DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=_ListSampler(order),
            num_workers=self.num_workers, pin_memory=self.pin_memory, drop_last=True,
            generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch),
            persistent_workers=False, collate_fn=self.collate,
        )
        for images, labels in loader:  # images: a tensor, or a list of them (several views)
            yield images, torch.as_tensor(labels)
