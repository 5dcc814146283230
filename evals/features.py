"""Frozen-encoder features: pooling, batched extraction, and an on-disk cache.

Features are what k-NN and the fast linear probe consume. They come from the encoder in eval mode
on deterministic views (resize to the model's image size, normalise with the data set's mean and
std), pooled as ``cls`` (the normed cls token) or ``mean`` (the mean of the normed patch tokens);
a run's ResNet or timm backbone gives its own pooled embedding (a CNN's global average pool,
named ``mean``), in eval mode: its BatchNorm layers use their running statistics.
An outside model (``evals.sources``) gets its own input size and normalisation, grayscale images
replicated to its three channels, and offers its own pooled output (``model``) beside them.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import weakref
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from evals.encoders import MODEL_POOL, Embedder, EncoderSource, model_for
from mae_bench.data.augment import eval_resize
from mae_bench.data.datasets import AnyDataset, ArrayDataset
from mae_bench.errors import ConfigError
from mae_bench.files import atomic_file
from mae_bench.models.attention import rule_path
from mae_bench.models.backbones import pooled
from mae_bench.models.vit import POOLS as VIT_POOLS
from mae_bench.models.vit import VisionTransformer, pool_name
from mae_bench.training.distributed import broadcast_from_main, gather_to_main, rank_and_world
from mae_bench.training.runtime import autocast

POOLS = tuple(VIT_POOLS)  # "cls", "mean": the names of mae_bench.models.vit, one home
ALL_POOLS = (*POOLS, MODEL_POOL)  # with an outside model's own pooled output


def pool_tokens(tokens: Tensor, pool: str) -> Tensor:
    """[N, 1+L, D] encoder tokens (cls first) -> [N, D] features."""
    return VIT_POOLS[pool_name(pool)](tokens)  # [N, D]


def encode(encoder: nn.Module, images: Tensor, pool: str) -> Tensor:
    """Normalised float images [N, C, H, W] -> pooled features [N, D] (no gradient tracking is
    set up here; callers wrap it in ``torch.no_grad()`` when the encoder is frozen). A ViT pools
    its tokens as ``pool`` says; any other backbone has one pooling, its own
    (``backbones.pooled``), which the caller has checked ``pool`` names."""
    if isinstance(encoder, VisionTransformer):
        return pool_tokens(encoder.forward_features(images), pool)
    return pooled(encoder, images)  # [N, D]


# --- extraction ------------------------------------------------------------------------------


def shard_range(n: int, rank: int, world_size: int) -> range:
    """The contiguous part of ``range(n)`` one of ``world_size`` processes extracts: equal parts
    (the last ones shorter), so that concatenating them in rank order gives back ``range(n)``."""
    per = -(-n // world_size)  # ceil
    return range(min(n, rank * per), min(n, (rank + 1) * per))


def _batches(dataset: AnyDataset, batch_size: int, img_size: int, num_workers: int,
             part: range) -> Iterator[tuple[Tensor, Tensor]]:
    """uint8 batches [B, C, S, S] of the images in ``part``, in dataset order (resized to
    ``img_size``), and their labels."""
    if isinstance(dataset, ArrayDataset):
        for start in range(part.start, part.stop, batch_size):
            stop = min(start + batch_size, part.stop)
            yield dataset.images[start:stop], dataset.labels[start:stop]
        return
    from torchvision.transforms import InterpolationMode, v2

    dataset.set_transform(v2.Resize((img_size, img_size), InterpolationMode.BICUBIC,
                                    antialias=True))
    subset = dataset if len(part) == len(dataset) else torch.utils.data.Subset(dataset, part)
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers)
    for images, labels in loader:
        yield images, torch.as_tensor(labels)
    dataset.check_bad_fraction()


def input_transform(dataset: AnyDataset, source: EncoderSource
                    ) -> tuple[int, tuple[float, ...], tuple[float, ...], int]:
    """How ``dataset``'s images are fed to ``source``: (size, mean, std, channels): the
    source's own input size, normalisation and channels where it declares them, else the data
    set's (a one-channel data set's statistics are repeated for a three-channel model)."""
    info = dataset.info
    channels = source.channels or info.channels
    mean = tuple(source.mean or info.mean)
    std = tuple(source.std or info.std)
    if len(mean) != channels:
        mean, std = tuple(mean[:1]) * channels, tuple(std[:1]) * channels
    return source.img_size or info.img_size, mean, std, channels


@torch.no_grad()
def extract_features(encoder: VisionTransformer | Embedder | None, dataset: AnyDataset, *,
                     pools: tuple[str, ...] = ("cls",), img_size: int | None = None,
                     mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                     channels: int | None = None, batch_size: int = 256,
                     device: torch.device = torch.device("cpu"), precision: str = "fp32",
                     num_workers: int = 4, shard: tuple[int, int] = (0, 1),
                     progress: Callable[[int, int], None] | None = None
                     ) -> tuple[dict[str, Tensor], Tensor]:
    """Features of every image of ``dataset``, in order, from a frozen encoder, for each pooling
    in ``pools`` from one forward pass.

    Args:
        encoder: the frozen encoder (set to eval mode here): a ViT, or an outside model's
            ``Embedder``; None gives raw pixels: the normalised image, flattened (the
            ``pixels`` reference row).
        dataset: an in-memory or streamed data set.
        pools: "cls" and / or "mean" (pixels: one entry, under the first name; an ``Embedder``:
            any of its ``pools``).
        img_size: the encoder's input size (images are resized to it; bicubic, antialiased when
            shrinking); default: the ViT's, or the data set's for pixels and an ``Embedder``.
        mean, std: per-channel normalisation in [0, 1] units (default: the data set's).
        channels: the encoder's input channels; a one-channel data set is replicated to them
            (default: the data set's).
        batch_size: images per forward pass.
        device: where the encoder runs.
        precision: "fp32", "bf16" or "fp16" autocast for the encoder; features are float32.
        num_workers: DataLoader workers for streamed data sets.
        shard: (rank, world size): extract only this process's contiguous part of the data set
            (``shard_range``); (0, 1) is all of it.
        progress: called with (images done, total) of this process's part.

    Returns:
        ({pool: float32 features [n, D] on the CPU}, int64 labels [n]) for the n images of the
        part, in dataset order.
    """
    for pool in pools:
        if pool not in POOLS and not isinstance(encoder, Embedder):
            raise ConfigError(f"unknown pool {pool!r}; valid: {', '.join(POOLS)}")
    info = dataset.info
    if img_size is None:
        img_size = (encoder.grid_size * encoder.patch_size
                    if isinstance(encoder, VisionTransformer) else info.img_size)
    channels = channels or info.channels
    mean = torch.tensor(mean or info.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(std or info.std, device=device).view(1, -1, 1, 1)
    if encoder is not None:
        encoder.eval().to(device)
    feats: dict[str, list[Tensor]] = {pool: [] for pool in pools}
    labels, done = [], 0
    part = shard_range(len(dataset), *shard)
    for images, batch_labels in _batches(dataset, batch_size, img_size, num_workers, part):
        x = eval_resize(images.to(device, non_blocking=True), img_size)  # [B, C, S, S] 0..255
        if x.shape[1] != channels:  # grayscale for an RGB model: the same plane per channel
            x = x.expand(-1, channels, -1, -1)  # [B, 3, S, S]
        x = (x / 255.0 - mean) / std
        if encoder is None:
            feats[pools[0]].append(x.flatten(1).float().cpu())  # [B, C*S*S]
        elif isinstance(encoder, Embedder):
            if encoder.channels_last:  # [B, C, S, S] in the layout the model's weights have
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, precision):
                out = encoder.embed(x)  # {pool: [B, D]}
            for pool in pools:
                feats[pool].append(out[pool].float().cpu())  # [B, D]
        else:
            with autocast(device, precision):
                tokens = encoder.forward_features(x)  # [B, 1+L, D]
            for pool in pools:
                feats[pool].append(pool_tokens(tokens, pool).float().cpu())  # [B, D]
        labels.append(batch_labels.cpu())
        done += images.shape[0]
        if progress is not None:
            progress(done, len(part))
    if not labels:  # an empty part (more processes than images)
        return {}, torch.zeros(0, dtype=torch.long)
    return {p: torch.cat(f) for p, f in feats.items() if f}, torch.cat(labels).long()


# --- cache -----------------------------------------------------------------------------------

# Bump when extraction changes meaning; old entries are then never read. 2: the precision and
# the attention kernel joined the key (version 1 served bf16 features to an fp32 eval).
CACHE_VERSION = 2
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# An in-memory data set's hash, kept while the object lives: an evaluation asks for it for its
# identity (eval_key) and again for each split's feature cache key, and hashing CIFAR-10's pixels
# twice is work done twice. The tensors' version counters tell an in-place change.
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def dataset_fingerprint(dataset: AnyDataset) -> str:
    """A content hash of a data set: its pixels and labels in memory, or its member list and
    labels when streamed."""
    if isinstance(dataset, ArrayDataset):
        version = (dataset.images._version, dataset.labels._version)
        known = _FINGERPRINTS.get(dataset)
        if known is not None and known[0] == version:
            return known[1]
    h = hashlib.blake2b(digest_size=16)
    h.update(dataset.labels.numpy().tobytes())
    if isinstance(dataset, ArrayDataset):
        h.update(str(tuple(dataset.images.shape)).encode())
        h.update(memoryview(dataset.images.contiguous().numpy()).cast("B"))
        _FINGERPRINTS[dataset] = (version, h.hexdigest())
    else:
        h.update(str(dataset.root.resolve()).encode())
        h.update(dataset._members.tobytes())
    return h.hexdigest()


def feature_cache_key(*, encoder_fingerprint: str, dataset: str, split: str,
                      data_fingerprint: str, pool: str, transform: str, precision: str | None,
                      attention: str | None) -> str:
    """The cache entry name: everything the features depend on, hashed. ``precision`` (the
    encoder's autocast) and ``attention`` (its kernel) change the features' rounding, so
    features of one are never served for the other; None where they do not apply (pixels,
    an outside model's own kernel)."""
    blob = json.dumps([CACHE_VERSION, encoder_fingerprint, dataset, split, data_fingerprint, pool,
                       transform, precision, attention])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def attention_kernel(source: EncoderSource, device: torch.device, precision: str) -> str | None:
    """The attention kernel ("fused" or "math") a mae-bench ViT runs on whole images on
    ``device`` in ``precision``; None for pixels and outside models (their kernel is their own).

    Evaluation never forces a kernel, so ``mae_bench.models.attention.rule_path`` decides it from
    the device, the precision and the sequence length: on a CPU, bf16 runs the explicit matmuls and
    fp32 the fused kernel; on a GPU both run fused, in different rounding than a CPU's math."""
    if not source.vit:
        return None
    tokens = 1 + (source.vit_kwargs["img_size"] // source.vit_kwargs["patch_size"]) ** 2
    return rule_path(device.type, _DTYPES[precision], tokens)


def default_cache_dir() -> Path:
    return Path(os.environ.get("MAE_BENCH_CACHE") or Path.home() / ".cache" / "mae-bench") / \
        "features"


def load_cached(cache_dir: Path, key: str) -> tuple[Tensor, Tensor] | None:
    """The cached (features, labels) for ``key``, or None (a damaged entry counts as absent)."""
    path = Path(cache_dir) / f"{key}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            return torch.from_numpy(z["features"]), torch.from_numpy(z["labels"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None


def save_cached(cache_dir: Path, key: str, features: Tensor, labels: Tensor) -> Path:
    """Write atomically: a temporary file renamed into place."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / f"{key}.npz"
    with atomic_file(final, "wb") as fh:
        np.savez(fh, features=features.numpy(), labels=labels.numpy())
    return final


@dataclass
class Features:
    """One split's features and where they came from."""

    features: Tensor  # float32 [N, D]
    labels: Tensor  # int64 [N]
    cached: bool  # read from the cache instead of computed
    seconds: float  # extraction (or cache read) time


def features_for(source: EncoderSource, dataset: AnyDataset, *, dataset_name: str, split: str,
                 pool: str = "cls", batch_size: int = 256,
                 device: torch.device = torch.device("cpu"), precision: str = "fp32",
                 cache_dir: Path | None = None, use_cache: bool = True, num_workers: int = 4,
                 progress: Callable[[int, int], None] | None = None) -> Features:
    """Features of ``dataset`` from ``source``, read from the cache when the same encoder
    weights, data, split, pooling, transform, precision and attention kernel were extracted
    before.

    Under torchrun every rank extracts its contiguous part of the data set and rank 0 gathers
    them, in order: rank 0 returns the features of the whole data set (the same as one process
    would), the other ranks only their own part (empty when rank 0 read the cache).
    """
    start = time.perf_counter()
    use_cache = use_cache and source.cacheable  # a plain callable's code is not in the key
    encoder = model_for(source)
    img_size, mean, std, channels = input_transform(dataset, source)
    transform = f"resize{img_size}-bicubic-aa-mean{list(mean)}-std{list(std)}"
    if channels != dataset.info.channels:
        transform += f"-replicate{channels}"
    data_fingerprint = dataset_fingerprint(dataset)

    # Pixels pass through no encoder: their features are the same in every precision.
    key_precision = precision if encoder is not None else None
    kernel = attention_kernel(source, device, precision)

    def key(pool_name: str) -> str:
        return feature_cache_key(encoder_fingerprint=source.fingerprint, dataset=dataset_name,
                                 split=split, data_fingerprint=data_fingerprint,
                                 pool=pool_name if encoder is not None else "pixels",
                                 transform=transform, precision=key_precision, attention=kernel)

    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    rank, world = rank_and_world()
    # Under torchrun rank 0 alone reads and writes the cache and decides: the others may see
    # another file system (multi-node) or a half-written entry.
    hit = load_cached(cache_dir, key(pool)) if use_cache and rank == 0 else None
    if broadcast_from_main(hit is not None):
        if hit is None:  # not rank 0: it has the features; nothing to extract here
            return Features(torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), True, 0.0)
        return Features(hit[0], hit[1], True, time.perf_counter() - start)
    # One forward pass gives every pooling; all are cached, so switching --pool is free.
    offered = source.pools if isinstance(encoder, Embedder) else POOLS
    pools = (pool,) if encoder is None else (pool, *(p for p in offered if p != pool))
    feats, labels = extract_features(encoder, dataset, pools=pools, img_size=img_size,
                                     mean=mean, std=std, channels=channels,
                                     batch_size=batch_size, device=device, precision=precision,
                                     num_workers=num_workers, shard=(rank, world),
                                     progress=progress)
    if world > 1:  # each rank extracted one contiguous part: put them back in order on rank 0
        parts = gather_to_main((feats, labels))
        if parts is None:
            return Features(feats.get(pool, torch.zeros(0, 0)), labels, False,
                            time.perf_counter() - start)
        parts = [(f, y) for f, y in parts if len(y)]
        feats = {name: torch.cat([f[name] for f, _ in parts]) for name in parts[0][0]}
        labels = torch.cat([y for _, y in parts])
    if use_cache:
        for name, values in feats.items():
            save_cached(cache_dir, key(name), values, labels)
    return Features(feats[pool], labels, False, time.perf_counter() - start)
