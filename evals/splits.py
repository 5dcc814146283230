"""Seeded, stratified index splits: few-shot training subsets and the validation split that
hyper-parameters are chosen on (always carved from the training set, never from the test set).

Both keep every class present: a class of ``n_c`` samples gives ``round(fraction * n_c)`` of
them, at least 1. Which samples is decided by one seeded permutation, so a (labels, fraction,
seed) triple always names the same indices, on any machine.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mae_bench.errors import ConfigError


def _check_labels(labels: Tensor) -> Tensor:
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.numel() == 0:
        raise ConfigError(f"labels must be a non-empty 1-D tensor, got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ConfigError(f"labels must be integer class indices, got dtype {labels.dtype}")
    labels = labels.long().cpu()
    if int(labels.min()) < 0:
        raise ConfigError("a stratified split needs every sample labelled, but some labels are "
                          f"negative ({int(labels.min())}: unlabelled); drop those samples first")
    return labels


def _take_per_class(labels: Tensor, counts: Tensor, seed: int) -> Tensor:
    """The first ``counts[c]`` samples of each class c in a seeded random order.

    Returns:
        [M] bool mask over the samples, True for the taken ones.
    """
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(labels), generator=g)  # [N]
    order = perm[torch.sort(labels[perm], stable=True).indices]  # [N] grouped by class, shuffled
    sizes = torch.bincount(labels)  # [C]
    starts = torch.cumsum(sizes, 0) - sizes  # [C] where each class begins in ``order``
    sorted_labels = labels[order]  # [N]
    rank = torch.arange(len(labels)) - starts[sorted_labels]  # [N] position within its class
    taken = torch.zeros(len(labels), dtype=torch.bool)
    taken[order] = rank < counts[sorted_labels]
    return taken


def stratified_subset(labels: Tensor, fraction: float, seed: int) -> Tensor:
    """Indices of a seeded per-class subset: ``round(fraction * n_c)`` of each class, at least 1.

    Args:
        labels: [N] integer class indices (no unlabelled ``-1``).
        fraction: in (0, 1]; 1 returns every index.
        seed: chooses which samples; the same seed gives the same indices.

    Returns:
        [M] int64 indices into ``labels``, ascending.
    """
    if not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
        raise ConfigError(f"fraction must be in (0, 1], got {fraction!r}")
    labels = _check_labels(labels)
    sizes = torch.bincount(labels)  # [C]
    counts = torch.clamp(torch.round(sizes.double() * fraction).long(), min=1)  # [C]
    return torch.nonzero(_take_per_class(labels, counts, seed)).flatten()


def train_val_split(labels: Tensor, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Split a training set into fit and validation indices, stratified and seeded.

    Each class gives ``round(val_fraction * n_c)`` samples to validation, at least 1 and at
    most ``n_c - 1`` (so that every class is also fitted on).

    Args:
        labels: [N] integer class indices of the training set.
        val_fraction: in (0, 1).
        seed: chooses the validation samples.

    Returns:
        (fit indices, validation indices), each ascending int64, disjoint, covering [0, N).

    Raises:
        ConfigError: a bad fraction, or a class with a single sample (it cannot be in both).
    """
    if not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    labels = _check_labels(labels)
    sizes = torch.bincount(labels)  # [C]
    single = torch.nonzero(sizes == 1).flatten().tolist()
    if single:
        raise ConfigError(f"class {single[0]} has a single training sample, but a stratified "
                          "validation split needs at least 2 per class; drop or merge it, or "
                          "give more samples")
    counts = torch.round(sizes.double() * val_fraction).long()  # [C]
    counts = torch.minimum(torch.clamp(counts, min=1), sizes - 1)  # [C]
    is_val = _take_per_class(labels, counts, seed)  # [N]
    return torch.nonzero(~is_val).flatten(), torch.nonzero(is_val).flatten()
